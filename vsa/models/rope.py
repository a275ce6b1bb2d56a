"""3D rotary position embedding (RoPE) for a (T, H, W) token grid.

The head dim D is split over the three axes: h and w get 2 * (D // 6) channels each and t the rest
(D=64: 24/20/20, D=128: 44/42/42; all even). Channels are rotated in adjacent pairs (2i, 2i+1); the
pair's angle is position_along_axis * theta ** (-2i / d_axis). Angles are built in raster order; the
model permutes them into tile-major order together with the tokens.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim given to the (t, h, w) axes."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles `[T*H*W, head_dim // 2]` (float32) of every token, in raster order."""
    T, H, W = grid
    coords = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    parts = []
    for coord, dim in zip(coords, rope_axis_dims(head_dim), strict=True):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(coord.reshape(-1, 1).to(torch.float64) * inv_freq)
    return torch.cat(parts, dim=-1).to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, S, H, D]` by per-token angles given as cos/sin `[S, D // 2]` (in fp32)."""
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
