"""Rebuilding a VideoDiT from a training checkpoint (no training config needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from vsa.models import DiTConfig, VideoDiT
from vsa.training.module import CHECKPOINT_KEY


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of a `vsa` training run, with a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<run folder>/"
                                "checkpoints/last.ckpt of a training run")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
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
                          device: torch.device | str | None = None) -> VideoDiT:
    """A VideoDiT in eval mode with the weights of a checkpoint dict (`read_checkpoint`), built
    on `device` (default: the CPU). The dict is not modified, so one read serves several models."""
    spec = checkpoint[CHECKPOINT_KEY]
    with torch.device(device or "cpu"):  # built where it runs: no init on the CPU, then a copy
        model = VideoDiT(DiTConfig(**spec["dit_config"]))
    model.load_state_dict(model_state(checkpoint, ema))
    model.sparsity, model.topk = spec.get("sparsity"), spec.get("topk")
    return model.eval()


def load_model(path: str | Path, ema: bool = True) -> tuple[VideoDiT, dict]:
    """(VideoDiT in eval mode on the CPU, the checkpoint's sampling spec)."""
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint, ema), checkpoint[CHECKPOINT_KEY]
