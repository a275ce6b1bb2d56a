"""Attention backends behind one interface, chosen by name.

    backend = build_backend("vsa", width=768, n_heads=12, head_dim=64, gates="adapt")
    o = backend(q, k, v, AttentionContext(layout, sparsity=0.875, x_norm=h))

`BACKENDS` is a plain dict from name to class; a new backend is one more entry.
"""

from __future__ import annotations

from vsa.attention.base import AttentionBackend, AttentionContext
from vsa.attention.full import FullAttention
from vsa.attention.static import GratB, GratX, SlidingTileAttention, StaticPatternAttention
from vsa.attention.video_sparse import VideoSparseAttention

BACKENDS: dict[str, type[AttentionBackend]] = {
    "full": FullAttention,
    "vsa": VideoSparseAttention,
    "grat_b": GratB,
    "grat_x": GratX,
    "sta": SlidingTileAttention,
}


def build_backend(name: str, width: int, n_heads: int, head_dim: int,
                  **options) -> AttentionBackend:
    """Instantiate the backend registered as `name` (options go to its constructor)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known backends: {sorted(BACKENDS)}")
    try:
        return BACKENDS[name](width, n_heads, head_dim, **options)
    except TypeError as err:
        raise TypeError(f"bad options {options} for attention backend {name!r}: {err}") from None


__all__ = ["AttentionBackend", "AttentionContext", "BACKENDS", "FullAttention", "GratB", "GratX",
           "SlidingTileAttention", "StaticPatternAttention", "VideoSparseAttention", "build_backend"]
