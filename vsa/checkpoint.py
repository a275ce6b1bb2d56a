"""The checkpoint schema of `vsa`: what a training checkpoint holds besides Lightning's own
entries, and rebuilding a VideoDiT from one (no training config needed).

- `CHECKPOINT_KEY` ("vsa"): the entry that holds the sampling spec (`sampling_spec`): the
  DiTConfig, the latent shape, the codec, the timestep shift recipe, the fps and the sparsity.
- "state_dict": Lightning's; the model's weights under "model." (with EMAWeightAveraging, the
  average, and "current_model_state" the raw weights).

Written by `vsa.training` (`VideoDiffusionModule.on_save_checkpoint`), read by training (resume,
`init_from`), sampling, eval and the scaling diagnostics.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import torch

from vsa.models import DiTConfig, VideoDiT
from vsa.models.wan import WanVideoModel, is_wan_config, wan_from_config

CHECKPOINT_KEY = "vsa"  # the checkpoint entry of the sampling spec (the name is part of the format)
RUN_CONFIG_DIR = ".hydra"  # a run folder's saved training config: <run>/.hydra/config.yaml


def sampling_spec(model: VideoDiT, latent_shape, codec: dict, timesteps: dict, fps: int) -> dict:
    """What a sampler needs besides the weights (stored under CHECKPOINT_KEY in every checkpoint)."""
    return {
        "dit_config": dataclasses.asdict(model.cfg),
        "latent_shape": None if latent_shape is None else list(latent_shape),
        "codec": dict(codec),
        "timesteps": dict(timesteps),
        "fps": fps,
        "sparsity": model.sparsity,
        "topk": model.topk,
    }


def find_data_config(ckpt_path: str | Path) -> Path | None:
    """The training config saved in the run folder of a checkpoint <run>/checkpoints/*.ckpt:
    <run>/.hydra/config.yaml, or None where there is none."""
    path = Path(ckpt_path).expanduser().resolve().parent.parent / RUN_CONFIG_DIR / "config.yaml"
    return path if path.is_file() else None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names: the file itself, or for a run folder its
    `checkpoints/last.ckpt` (or a `last.ckpt` directly inside it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint folder {path} holds no checkpoints/last.ckpt; pass a run "
                                "folder of train.py that has saved a checkpoint, or a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<run folder> or "
                                "<run folder>/checkpoints/last.ckpt of a training run")
    return path


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint dict of a `vsa` training run (`path`: a file or a run folder), with one clear
    error for anything else. `mmap`: map the tensors instead of reading them (cheap look-ups)."""
    path = find_checkpoint(path)
    try:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives
            raise ValueError("not a file written by torch.save")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # not a torch file, truncated, or pickling something not plain data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in reason or "weights_only" in reason:
            reason = "it holds objects other than tensors and plain data"
        raise ValueError(f"{path} is not a readable checkpoint of vsa.training ({reason[:120]}); pass "
                         "the checkpoints/last.ckpt that train.py wrote, and do not load a file of "
                         "unknown origin with pickle") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of vsa.training (no {CHECKPOINT_KEY!r} entry); "
                         "train with `python train.py` to get one")
    return checkpoint


def model_state(checkpoint: dict, ema: bool = True) -> dict[str, torch.Tensor]:
    """The VideoDiT weights: the EMA ones when `ema` (with EMAWeightAveraging, `state_dict` holds
    the average and `current_model_state` the raw weights), else the raw ones."""
    state = checkpoint["state_dict"]
    if not ema and "current_model_state" in checkpoint:
        state = checkpoint["current_model_state"]
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def model_from_checkpoint(checkpoint: dict, ema: bool = True,
                          device: torch.device | str | None = None) -> VideoDiT | WanVideoModel:
    """A VideoDiT (a `vsa.models.wan.WanVideoModel` for a Wan finetune) in eval mode with the
    weights of a checkpoint dict (`read_checkpoint`), built on `device` (default: the CPU). The
    dict is not modified, so one read serves several models."""
    spec = checkpoint[CHECKPOINT_KEY]
    if is_wan_config(spec["dit_config"]):  # a finetuned diffusers Wan (vsa.models.wan)
        model = wan_from_config(spec["dit_config"]).to(device or "cpu")
    else:
        with torch.device(device or "cpu"):  # built where it runs: no init on the CPU, then a copy
            model = VideoDiT(DiTConfig(**spec["dit_config"]))
    model.load_state_dict(model_state(checkpoint, ema))
    model.sparsity, model.topk = spec.get("sparsity"), spec.get("topk")
    return model.eval()


def load_model(path: str | Path, ema: bool = True) -> tuple[VideoDiT | WanVideoModel, dict]:
    """(VideoDiT in eval mode on the CPU, the checkpoint's sampling spec)."""
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint, ema), checkpoint[CHECKPOINT_KEY]


def load_guide(path: str | Path, spec: dict, ema: bool = True) -> VideoDiT | WanVideoModel:
    """Autoguidance's weaker model from checkpoint `path`, refused (ValueError, with the fix) unless it
    was trained on the latent shape of the model whose sampling spec is `spec`."""
    guide, guide_spec = load_model(path, ema)
    if list(guide_spec["latent_shape"]) != list(spec["latent_shape"]):
        raise ValueError(f"the guide's latent shape {list(guide_spec['latent_shape'])} is not the "
                         f"model's {list(spec['latent_shape'])}; give a checkpoint of the same run")
    return guide
