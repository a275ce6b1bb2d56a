"""What a pattern does to quality: the validation loss under training's fixed protocol, and the
drift of its decoded videos from the reference's. (The validation batches come from
`vsa.training.validation_data`.)"""

from __future__ import annotations

import math

import torch

from vsa.diffusion import validation_loss
from vsa.models import VideoDiT


def protocol_loss(model: VideoDiT, batches: list, info: dict, chunk: int | None = None) -> float:
    """`val/loss` of training: the fixed protocol per batch (seed + batch index), weighted mean."""
    total = count = 0.0
    for index, (x0, cond) in enumerate(batches):
        loss = validation_loss(model, x0, cond, seed=info["seed"] + index, n_t=info["n_t"],
                               batch_size=chunk)
        total += loss * x0.shape[0]
        count += x0.shape[0]
    return total / count


def video_drift(pixels: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative L2 of decoded videos against the reference, and PSNR (dB) of the clamped pixels
    (range [-1, 1], peak-to-peak 2); PSNR is None (infinite) when the clamped pixels are equal."""
    x, ref = pixels.double(), reference.double()
    rel_l2 = float((x - ref).norm() / ref.norm().clamp_min(1e-300))
    mse = float((x.clamp(-1, 1) - ref.clamp(-1, 1)).square().mean())
    psnr = None if mse == 0.0 else 10.0 * math.log10(4.0 / mse)
    return {"rel_l2": rel_l2, "psnr_db": psnr}
