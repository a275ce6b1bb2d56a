"""A fixed validation protocol, so validation losses are comparable across runs and models.

The loss is the flow-matching MSE averaged over a fixed grid of times (midpoints of n_t equal
bins of [0, 1], unshifted: every noise level weighs the same, whatever a run's training shift)
with noise drawn from a CPU generator seeded per time point (identical on every device). The
model runs in eval mode (no condition dropout) without gradients. This is the metric of the
scaling sweeps.
"""

from __future__ import annotations

import torch
from torch import nn

from vsa.diffusion.flow import interpolate, velocity_target


def validation_t_grid(n_t: int = 8) -> torch.Tensor:
    """The fixed times (i + 0.5) / n_t, i = 0 .. n_t - 1."""
    if n_t < 1:
        raise ValueError(f"n_t must be >= 1, got {n_t}")
    return (torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t


def validation_noise(shape: torch.Size | tuple, seed: int, index: int) -> torch.Tensor:
    """The fixed noise of time point `index`: a CPU draw seeded with (seed, index)."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
    return torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def validation_losses(model: nn.Module, x0: torch.Tensor, cond: dict | None = None, seed: int = 0,
                      n_t: int = 8, batch_size: int | None = None) -> torch.Tensor:
    """Flow-matching MSE at each fixed time, shape [n_t] (fp64, on the CPU).

    `cond` holds model keyword arguments batched like x0 (labels, text, ...); `batch_size`
    splits x0 into chunks to bound memory without changing the result beyond rounding.
    """
    cond = cond or {}
    for key, value in cond.items():
        if value is not None and value.shape[0] != x0.shape[0]:
            raise ValueError(f"cond[{key!r}] has batch {value.shape[0]}, x0 has {x0.shape[0]}")
    chunk = batch_size or x0.shape[0]
    was_training = model.training
    model.eval()
    try:
        losses = []
        for i, t_value in enumerate(validation_t_grid(n_t).tolist()):
            noise = validation_noise(x0.shape, seed, i).to(device=x0.device, dtype=x0.dtype)
            sq_err = 0.0
            for start in range(0, x0.shape[0], chunk):
                x0_c, noise_c = x0[start:start + chunk], noise[start:start + chunk]
                cond_c = {k: None if v is None else v[start:start + chunk] for k, v in cond.items()}
                t = torch.full((x0_c.shape[0],), t_value, device=x0.device, dtype=torch.float32)
                v = model(interpolate(x0_c, noise_c, t), t, **cond_c)
                err = v.double() - velocity_target(x0_c, noise_c).double()
                sq_err += float(err.square().sum())
            losses.append(sq_err / x0.numel())
        return torch.tensor(losses, dtype=torch.float64)
    finally:
        model.train(was_training)


def validation_loss(model: nn.Module, x0: torch.Tensor, cond: dict | None = None, seed: int = 0,
                    n_t: int = 8, batch_size: int | None = None) -> float:
    """The protocol's scalar: mean of `validation_losses` over the fixed time grid."""
    return float(validation_losses(model, x0, cond, seed, n_t, batch_size).mean())
