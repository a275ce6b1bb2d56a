"""The one attention interface every backend implements.

A backend receives q, k, v as `[B, S, H, D]` (the layout the qkv projection produces), with the S
tokens already in tile-major order, plus an `AttentionContext` that carries what a structured or
sparse backend needs to know: the tile layout, the current sparsity / top-k and the block's
normalised input (from which VSA projects its gates). Backends that ignore some fields simply do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vsa.layout import TileLayout


@dataclass(frozen=True)
class AttentionContext:
    """Per-call information for an attention backend.

    layout:    tile layout of the token grid; q/k/v tokens are in its tile-major order.
    sparsity:  fraction of key tiles each query tile skips (VSA); read every call, so a schedule can
               change it during training. Ignored when `topk` is given.
    topk:      number of key tiles each query tile keeps (VSA); overrides `sparsity`.
    x_norm:    the block's normalised (and modulated) input `[B, S, width]`, for gate projections.
    prepared:  what the backend's `prepare(layout, batch)` returned (e.g. a static pattern's tile
               map), built by the caller outside compiled code; None: the backend builds it.
    x_proj:    the backend's `input_projection()` applied to x_norm `[B, S, out_features]`,
               computed by the caller in the same matmul as its qkv projection; None: the backend
               applies its projection to x_norm itself.
    """

    layout: TileLayout
    sparsity: float | None = None
    topk: int | None = None
    x_norm: torch.Tensor | None = None
    prepared: tuple[torch.Tensor, ...] | None = None
    x_proj: torch.Tensor | None = None


class AttentionBackend(nn.Module):
    """Self-attention core: `forward(q, k, v, ctx) -> o`, all of q, k, v, o in `[B, S, H, D]`.

    One instance lives in each transformer block, so a backend may own parameters (VSA's gates).
    Subclasses are constructed as `Backend(width, n_heads, head_dim, **options)`.

    A backend also describes itself, so that FLOP accounting, presets and sampling need no list
    of backend names (a new backend is one more entry in `BACKENDS`); the class-level answers
    take the backend's options as a dict:

    - `needs_sparsity`: it reads ctx.sparsity / ctx.topk, and cannot run without one of them.
    - `needs_gates`: it projects learned gates from ctx.x_norm; `swap_in_options` gives the
      options for swapping it into a model trained without it (train dense, sample sparse).
    - `gate_weights`: matmul weights per token of its own projections (FLOPs, parameter counts);
      `param_variants`: option sets that change its parameter count (the preset table).
    - `kv_tokens` / `coarse_flops`: L_kv_eff and the extra FLOPs of docs/design.md's formula.
    - `kept_fraction`: the fraction of (query, key) token pairs it computes on a layout.
    """

    needs_sparsity: bool = False
    needs_gates: bool = False
    param_variants: dict[str, dict] = {"": {}}  # label -> options; "": the backend's defaults

    def __init__(self, width: int, n_heads: int, head_dim: int):
        super().__init__()
        if n_heads * head_dim != width:
            raise ValueError(
                f"attention width {width} != n_heads {n_heads} * head_dim {head_dim}; "
                "pick a width that is a multiple of the head dim"
            )
        self.width = width
        self.n_heads = n_heads
        self.head_dim = head_dim

    @classmethod
    def swap_in_options(cls, options: dict) -> dict:
        """Options for this backend swapped into a trained model that did not train it."""
        return dict(options)

    @classmethod
    def gate_weights(cls, width: int, **options) -> int:
        """Matmul weights per token of the backend's own projections (none by default)."""
        return 0

    @classmethod
    def kv_tokens(cls, grid, tile, order: str, options: dict, sparsity: float | None = None,
                  topk: int | None = None) -> float:
        """Key tokens each query token attends to, on average, for the token grid `grid` cut into
        `tile`s in `order` (L_kv_eff of the FLOP formula): all of them by default."""
        return math.prod(grid)

    @classmethod
    def coarse_flops(cls, grid, tile, width: int) -> float:
        """FLOPs per layer beyond 4 x L x L_kv_eff x width (VSA's coarse stage); none by default."""
        return 0.0

    @classmethod
    def kept_fraction(cls, layout: TileLayout, options: dict, sparsity: float | None = None,
                      topk: int | None = None) -> float:
        """Fraction of (query, key) token pairs computed on `layout`: all by default."""
        return 1.0

    def prepare(self, layout: TileLayout, batch: int) -> tuple[torch.Tensor, ...] | None:
        """Tensors the backend derives from the layout and batch size alone, for
        `AttentionContext.prepared`. A model builds them once per forward before its blocks run,
        because building them (cached host-side work) cannot be traced by a fullgraph
        torch.compile of a block. None (the default): nothing to prepare."""
        return None

    def input_projection(self) -> nn.Linear | None:
        """The backend's own linear projection of ctx.x_norm (VSA's gates), for a caller whose qkv
        projection reads the same tensor: it may stack both weights into one matmul and pass the
        backend's share as `ctx.x_proj`. None (the default): the backend projects nothing."""
        return None

    def reset_parameters(self) -> None:
        """(Re)initialise the backend's own parameters; the model calls it after its own init."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(q, k, v, ctx)")

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     ctx: AttentionContext) -> None:
        """Raise a clear error when q/k/v do not match each other, the heads or the layout."""
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(
                f"q, k, v must share one shape [B, S, H, D]; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        _, seq, heads, dim = q.shape
        if (heads, dim) != (self.n_heads, self.head_dim):
            raise ValueError(
                f"q has {heads} heads of dim {dim} but the backend was built for {self.n_heads} "
                f"heads of dim {self.head_dim}"
            )
        if seq != ctx.layout.seq_len:
            raise ValueError(
                f"q has {seq} tokens but the layout {ctx.layout.grid} has {ctx.layout.seq_len}; "
                "pass the layout of the token grid the tokens came from"
            )

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, head_dim={self.head_dim}"
