"""Training-free structured attention backends: GRAT-B, GRAT-X and sliding tile attention (STA).

Each query tile attends (exact softmax) to the key tiles of a static map computed from the tile
geometry (`vsa.ops.patterns`), on the same block-sparse kernel as VSA's fine stage, forward and
backward, so a pattern can be swapped into a model trained with full attention (sample with GRAT)
or finetuned. The group size of GRAT is the model's tile (`DiTConfig.tile`, e.g. (4, 8, 8) = 256
tokens as GRAT used for video); ragged edge tiles work as for VSA. No parameters; the context's
sparsity / top-k are ignored.

    model.set_attention("grat_b", radius=[1, 1, 1])   # 3x3x3 tiles
    model.set_attention("grat_x", lines=False)        # tiles sharing the t, row or column index
    model.set_attention("sta", window=[3, 3, 3])      # sliding tile window, full at the borders
"""

from __future__ import annotations

import torch

from vsa.attention.base import AttentionBackend, AttentionContext
from vsa.layout import TileLayout
from vsa.ops import check_dtypes, check_impl, fine_attention, patterns


class StaticPatternAttention(AttentionBackend):
    """Block-sparse attention over a static tile map (see the module docstring).

    Subclasses set `pattern` (a name in `vsa.ops.patterns.PATTERNS`) and pass the pattern's options
    to `__init__`. `impl`: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    """

    pattern: str = ""

    def __init__(self, width: int, n_heads: int, head_dim: int, impl: str | None = None, **options):
        super().__init__(width, n_heads, head_dim)
        self.impl = check_impl(impl)
        # Validated now (a bad config fails when the model is built, not mid-forward), normalised
        # and hashable: the key of the map cache.
        self.options = tuple(sorted(patterns.pattern_options(self.pattern, **options).items()))

    @classmethod
    def kv_tokens(cls, grid, tile, order: str, options: dict, sparsity=None, topk=None) -> float:
        """The kept fraction of real (query, key) token pairs of the tile map, times L."""
        layout = TileLayout(grid, tile, order=order)
        return cls.kept_fraction(layout, options) * layout.seq_len

    @classmethod
    def kept_fraction(cls, layout: TileLayout, options: dict, sparsity=None, topk=None) -> float:
        """The kept fraction of real (query, key) token pairs of the tile map on `layout`."""
        options = {k: v for k, v in dict(options).items() if k != "impl"}
        layout = layout.to("cpu")
        return patterns.kept_token_fraction(layout, *patterns.build_map(cls.pattern, layout, **options))

    def block_map(self, layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The map of this pattern on `layout`: q2k_idx int32 [n_tiles, K], q2k_cnt int32 [n_tiles]."""
        return patterns.build_map(self.pattern, layout, **dict(self.options))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        self.check_inputs(q, k, v, ctx)
        check_dtypes(q, k, v)
        layout = ctx.layout.to(q.device)
        idx, cnt = ctx.prepared if ctx.prepared is not None else self.prepare(layout, q.shape[0])
        return fine_attention(q, k, v, layout, idx, cnt, impl=self.impl)

    def prepare(self, layout: TileLayout, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The map as the kernel reads it, [batch, heads, n_tiles, K] + [batch, heads, n_tiles]
        on the layout's device (cached: every block and step shares one copy)."""
        return patterns.batched_map(self.pattern, layout, batch, self.n_heads, **dict(self.options))

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{super().extra_repr()}, pattern={self.pattern}" + (f", {opts}" if opts else "")


class GratB(StaticPatternAttention):
    """GRAT-B: each query tile attends to the key tiles within `radius` tiles on every axis
    (radius 1 = 3x3x3 tiles; clipped at the borders)."""

    pattern = "grat_b"

    def __init__(self, width: int, n_heads: int, head_dim: int, radius=(1, 1, 1),
                 impl: str | None = None):
        super().__init__(width, n_heads, head_dim, impl=impl, radius=radius)


class GratX(StaticPatternAttention):
    """GRAT-X: each query tile attends to the key tiles sharing its time index, tile-row or
    tile-column (`lines=False`), or only to the three lines of tiles through it (`lines=True`)."""

    pattern = "grat_x"

    def __init__(self, width: int, n_heads: int, head_dim: int, lines: bool = False,
                 impl: str | None = None):
        super().__init__(width, n_heads, head_dim, impl=impl, lines=lines)


class SlidingTileAttention(StaticPatternAttention):
    """STA: a window of `window` tiles per axis around each query tile, shifted inward at the
    borders so every query tile keeps the full window."""

    pattern = "sta"

    def __init__(self, width: int, n_heads: int, head_dim: int, window=(3, 3, 3),
                 impl: str | None = None):
        super().__init__(width, n_heads, head_dim, impl=impl, window=window)
