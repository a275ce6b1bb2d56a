"""Encode a folder of videos into safetensors latent shards for `vsa.data.LatentShardDataset`.

    python scripts/encode_latents.py --src data/clips --dst data/latents --codec space_to_depth \
        --frames 16 --height 64 --width 64 --shard-size 256
    python scripts/encode_latents.py --src data/clips --dst data/latents_wan --codec vae \
        --vae-path ./weights --vae-subfolder vae --frames 17 --height 256 --width 256 --device cuda \
        --text-encoder ./weights --text-max-length 512

Each video gives one clip (the centred one: the dataset in eval mode). Labels are stored when the
folder's metadata has them, captions as JSON in each shard's metadata. With --text-encoder (a local
transformers text encoder or diffusers pipeline folder, `vsa.data.text`), each caption's embeddings
and mask are stored too (`text_emb` [N, L, D], `text_mask` [N, L]), for text-conditioned models, and
the empty prompt's in `<dst>/null_text/null_text.safetensors` (a Wan finetune's CFG null text).
Unreadable videos are skipped and listed at the end; nothing is duplicated to fill their place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

try:
    import vsa  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsa.data.codecs import build_codec
from vsa.data.latents import write_latent_shard
from vsa.data.text import TextEncoder, save_null_text
from vsa.data.videos import VideoFolderDataset

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _ReadableItems(Dataset):
    """Items of a VideoFolderDataset with their index; None for unreadable files (no substitution)."""

    def __init__(self, videos: VideoFolderDataset) -> None:
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int):
        item = self.videos.try_load(index)
        return None if item is None else (index, item)


def _collate(batch: list):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    indices = [i for i, _ in batch]
    videos = torch.stack([item["video"] for _, item in batch])
    labels = torch.stack([item["label"] for _, item in batch])
    captions = [item.get("caption", "") for _, item in batch]
    return indices, videos, labels, captions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder of video files (+ optional metadata.csv/.jsonl)")
    p.add_argument("--dst", required=True, help="output folder for shard-XXXXX.safetensors")
    p.add_argument("--codec", choices=("identity", "space_to_depth", "vae"), default="identity")
    p.add_argument("--factor", type=int, nargs=3, default=(1, 2, 2), metavar=("FT", "FH", "FW"),
                   help="space_to_depth folding factor")
    p.add_argument("--vae-path", help="local folder of a diffusers VAE (for --codec vae)")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae-path holding config.json")
    p.add_argument("--text-encoder", help="local folder of a text encoder: store caption embeddings")
    p.add_argument("--text-max-length", type=int, default=512, help="tokens per caption (padded/truncated)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--backend", choices=("auto", "decord", "av"), default="auto")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=8, help="clips per codec call")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding videos")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of latents")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --dst")
    args = p.parse_args(argv)
    for name in ("frames", "height", "width", "stride", "shard_size", "batch_size", "text_max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.codec == "vae" and not args.vae_path:
        p.error("--codec vae needs --vae-path: the local folder of a diffusers VAE "
                "(e.g. downloaded with `huggingface-cli download <repo> --local-dir ...`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _encode(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _encode(args: argparse.Namespace) -> int:
    """Decode, encode and write the shards; returns the exit code."""
    dst = Path(args.dst)
    existing = sorted(dst.glob("*.safetensors")) if dst.is_dir() else []
    if existing and not args.overwrite:
        print(f"error: {dst} already holds {len(existing)} shards; pass --overwrite to replace them "
              f"or choose another --dst", file=sys.stderr)
        return 2
    videos = VideoFolderDataset(args.src, args.frames, args.height, args.width, stride=args.stride,
                                backend=args.backend, train=False)
    if args.codec == "identity":
        codec = build_codec("identity")
    elif args.codec == "space_to_depth":
        codec = build_codec("space_to_depth", factor=tuple(args.factor))
    else:
        codec = build_codec("vae", path=args.vae_path, subfolder=args.vae_subfolder)
    codec = codec.to(args.device).eval()
    text_encoder = None
    if args.text_encoder:
        if not videos.has_captions:
            raise ValueError(f"--text-encoder needs captions, but {args.src} has none: add a `caption` "
                             "column to its metadata.csv / metadata.jsonl")
        text_encoder = TextEncoder.from_folder(args.text_encoder, args.text_max_length).to(args.device)
    codec.latent_shape((3, args.frames, args.height, args.width))  # fail early on bad sizes
    meta = {"codec": args.codec, "source": str(Path(args.src).resolve()), "frames": str(args.frames),
            "height": str(args.height), "width": str(args.width), "stride": str(args.stride)}
    if args.codec == "space_to_depth":
        meta["factor"] = json.dumps(list(args.factor))
    if videos.classes:
        meta["classes"] = json.dumps(videos.classes)
    if args.codec == "vae":
        meta["vae_path"] = str(Path(args.vae_path).resolve())
    if text_encoder is not None:
        meta["text_encoder"] = text_encoder.source
        null_path = save_null_text(dst, text_encoder)  # the empty prompt: Wan's CFG null condition
        meta["null_text"] = str(null_path.relative_to(dst))
    for old in existing:
        old.unlink()

    loader = DataLoader(_ReadableItems(videos), batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=_collate)
    buffer: dict[str, list] = {"latents": [], "labels": [], "captions": [], "text_emb": [], "text_mask": []}
    shards, encoded, start = 0, 0, time.time()

    def flush(final: bool) -> None:
        nonlocal shards
        while buffer["latents"] and (final or len(buffer["latents"]) >= args.shard_size):
            take = min(args.shard_size, len(buffer["latents"]))
            latents = torch.stack(buffer["latents"][:take])
            labels = torch.stack(buffer["labels"][:take]) if videos.has_labels else None
            shard_meta = dict(meta)
            if videos.has_captions:
                shard_meta["captions"] = json.dumps(buffer["captions"][:take])
            text = {}
            if text_encoder is not None:
                text = {"text_emb": torch.stack(buffer["text_emb"][:take]),
                        "text_mask": torch.stack(buffer["text_mask"][:take])}
            write_latent_shard(dst / f"shard-{shards:05d}.safetensors", latents, labels=labels,
                               metadata=shard_meta, **text)
            shards += 1
            for key in buffer:
                del buffer[key][:take]

    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            _, video, labels, captions = batch
            z = codec.encode(video.to(args.device)).to("cpu", DTYPES[args.dtype])
            buffer["latents"].extend(z.unbind(0))
            buffer["labels"].extend(labels.unbind(0))
            buffer["captions"].extend(captions)
            if text_encoder is not None:
                emb, mask = text_encoder(captions)
                buffer["text_emb"].extend(emb.to("cpu", DTYPES[args.dtype]).unbind(0))
                buffer["text_mask"].extend(mask.cpu().unbind(0))
            encoded += z.shape[0]
            flush(final=False)
    flush(final=True)
    skipped = videos.skipped_files
    print(f"encoded {encoded} clips of {len(videos)} videos into {shards} shards in {dst} "
          f"({time.time() - start:.1f} s, codec={args.codec}, latent shape "
          f"{list(codec.latent_shape((3, args.frames, args.height, args.width)))})")
    if skipped:
        lines = [f"  {name}: {why}" for name, why in skipped.items()]
        print(f"skipped {len(skipped)} unreadable videos:", *lines, sep="\n")
    if encoded == 0:
        print(f"error: no video under {args.src} could be decoded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
