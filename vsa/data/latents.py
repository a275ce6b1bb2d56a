"""Precomputed latents stored as safetensors shards, and the writer that makes them.

A shard is one `*.safetensors` file holding N samples:

    latents    float [N, C, T, H, W]   (required)
    labels     int64 [N]               (optional; -1 = no label)
    text_emb   float [N, L, D_txt]     (optional)
    text_mask  bool  [N, L]            (optional; True = a real token; all True if absent)

plus string metadata (`vsa_format`, and e.g. the codec and, as JSON, the captions). Shards are
written atomically: to a hidden temporary file in the same folder, flushed to disk, then renamed, so
a crash never leaves a half-written `*.safetensors` behind.

    write_latent_shard("latents/shard-00000.safetensors", z, labels=y)
    ds = LatentShardDataset("latents")
    ds[0]   # dict(latents=[C, T, H, W], label=int64[, text_emb=[L, D], text_mask=[L]][, caption=str])
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

FORMAT = "vsa-latent-shard-v1"


def _check_tensor(name: str, value, ndim: int, n: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} has {value.shape[0]} samples but latents has {n}; pass one row per sample")
    return value


def write_latent_shard(
    path: str | Path,
    latents: torch.Tensor,
    labels: torch.Tensor | None = None,
    text_emb: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one shard atomically (temporary file, fsync, rename) and return its path.

    Args:
        path: destination ending in `.safetensors` (its folder is created if needed).
        latents: float [N, C, T, H, W]; labels: integer [N]; text_emb: float [N, L, D];
        text_mask: bool or 0/1 [N, L] (needs text_emb); metadata: extra string key/values.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"shard path must end in .safetensors, got {path}")
    latents = _check_tensor("latents", latents, 5, None)
    n = latents.shape[0]
    if n < 1 or not latents.is_floating_point():
        raise ValueError(f"latents must be a floating tensor with at least one sample, got "
                         f"{latents.dtype} of shape {tuple(latents.shape)}")
    tensors = {"latents": latents}
    if labels is not None:
        labels = _check_tensor("labels", labels, 1, n)
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        tensors["labels"] = labels.to(torch.int64)
    if text_mask is not None and text_emb is None:
        raise ValueError("text_mask was given without text_emb; pass the embeddings it masks")
    if text_emb is not None:
        text_emb = _check_tensor("text_emb", text_emb, 3, n)
        if not text_emb.is_floating_point():
            raise TypeError(f"text_emb must be a floating tensor, got {text_emb.dtype}")
        tensors["text_emb"] = text_emb
        if text_mask is not None:
            text_mask = _check_tensor("text_mask", text_mask, 2, n)
            if text_mask.shape[1] != text_emb.shape[1]:
                raise ValueError(f"text_mask has {text_mask.shape[1]} tokens but text_emb has "
                                 f"{text_emb.shape[1]}; they must match")
            tensors["text_mask"] = text_mask.to(torch.bool)
    meta = {"vsa_format": FORMAT}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        meta[key] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class LatentShardDataset(Dataset):
    """All samples of the `*.safetensors` shards in `root`, in shard-name order.

    Shards must agree on the latent shape [C, T, H, W], on which optional tensors they hold and on
    the text shape [L, D]; this is checked when the dataset is built (headers only, no data read).
    Latents and text embeddings are returned as `dtype` (None keeps the stored dtype). `metadata`
    holds the first shard's string metadata (e.g. `codec`, `frames`, `classes` from the encoder).
    """

    def __init__(self, root: str | Path, dtype: torch.dtype | None = torch.float32) -> None:
        self.root = Path(root).expanduser()
        self.dtype = dtype
        if not self.root.is_dir():
            raise FileNotFoundError(f"latent folder {self.root} does not exist; encode videos into it "
                                    f"with `python scripts/encode_latents.py --src VIDEOS --dst {self.root}`")
        self.shards = sorted(self.root.glob("*.safetensors"))
        if not self.shards:
            raise FileNotFoundError(f"no *.safetensors shards in {self.root}; encode videos into it with "
                                    f"`python scripts/encode_latents.py --src VIDEOS --dst {self.root}`")
        counts, self.captions = [], []
        reference: dict | None = None
        for shard in self.shards:
            info = self._inspect(shard)
            if reference is None:
                reference = info
            elif {k: v for k, v in info.items() if k not in ("n", "captions", "meta")} != \
                    {k: v for k, v in reference.items() if k not in ("n", "captions", "meta")}:
                raise ValueError(f"shard {shard.name} holds {self._describe(info)} but {self.shards[0].name} "
                                 f"holds {self._describe(reference)}; all shards in {self.root} must match")
            counts.append(info["n"])
            self.captions.append(info["captions"])
        self.sample_shape: tuple[int, ...] = reference["latent_shape"]
        self.keys: tuple[str, ...] = reference["keys"]
        self.metadata: dict[str, str] = reference["meta"]  # first shard's, e.g. codec and clip size
        self.has_captions = all(c is not None for c in self.captions)
        self._ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @staticmethod
    def _describe(info: dict) -> str:
        return f"keys {list(info['keys'])}, latents {list(info['latent_shape'])}, text {info['text_shape']}"

    @staticmethod
    def _inspect(shard: Path) -> dict:
        """Sample count, keys and per-sample shapes of one shard, from its header."""
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = tuple(sorted(f.keys()))
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                meta = f.metadata() or {}
        except Exception as exc:
            raise ValueError(f"cannot read shard {shard}: {exc}; re-create it with "
                             f"scripts/encode_latents.py or delete it") from exc
        if "latents" not in shapes or len(shapes["latents"]) != 5:
            raise ValueError(f"shard {shard} has no 5-D `latents` tensor (keys: {list(keys)}); it was not "
                             f"written by write_latent_shard")
        n = shapes["latents"][0]
        for key, shape in shapes.items():
            if shape[0] != n:
                raise ValueError(f"shard {shard}: `{key}` has {shape[0]} rows but `latents` has {n}")
        captions = json.loads(meta["captions"]) if "captions" in meta else None
        if captions is not None and len(captions) != n:
            raise ValueError(f"shard {shard}: {len(captions)} captions for {n} samples")
        meta.pop("captions", None)
        return {"n": n, "keys": keys, "latent_shape": shapes["latents"][1:],
                "text_shape": shapes.get("text_emb", (None,))[1:], "captions": captions, "meta": meta}

    def __len__(self) -> int:
        return self._ends[-1]

    def _handle(self, shard_index: int):
        if self._pid != os.getpid():  # a forked worker opens its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard_index not in self._handles:
            self._handles[shard_index] = safe_open(str(self.shards[shard_index]), framework="pt")
        return self._handles[shard_index]

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latent samples")
        index %= len(self)
        s = bisect.bisect_right(self._ends, index)
        row = index - (self._ends[s - 1] if s else 0)
        f = self._handle(s)
        latents = f.get_slice("latents")[row : row + 1][0]
        item = {"latents": latents if self.dtype is None else latents.to(self.dtype)}
        label = int(f.get_slice("labels")[row : row + 1][0]) if "labels" in self.keys else -1
        item["label"] = torch.tensor(label, dtype=torch.int64)
        if "text_emb" in self.keys:
            emb = f.get_slice("text_emb")[row : row + 1][0]
            item["text_emb"] = emb if self.dtype is None else emb.to(self.dtype)
            if "text_mask" in self.keys:
                item["text_mask"] = f.get_slice("text_mask")[row : row + 1][0]
            else:
                item["text_mask"] = torch.ones(emb.shape[0], dtype=torch.bool)
        if self.has_captions:
            item["caption"] = self.captions[s][row]
        return item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open safetensors handles cannot be pickled (spawned workers)
        return state

    def __repr__(self) -> str:
        return (f"LatentShardDataset(root={str(self.root)!r}, shards={len(self.shards)}, "
                f"samples={len(self)}, latent_shape={list(self.sample_shape)}, keys={list(self.keys)})")
