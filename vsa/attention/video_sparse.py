"""Video Sparse Attention (VSA) as an attention backend.

The kernel (`vsa.ops.video_sparse_attention`) computes the coarse and the fine stage and combines
them as O = O_c * G_c + O_f * G_f. This backend owns the gates, per-token per-channel linear
projections of the block's normalised input, in one of the two variants of the paper:

- "pretrain": G_c and G_f come from ONE projection `width -> 2 * width`, split in two. Weights get
  the model's usual xavier init; the biases start at G_c = 0, G_f = 1 so the initial output is
  centred on fine (block-sparse) attention and the coarse path is mixed in as it learns.
- "adapt":    for finetuning a dense checkpoint. G_c is a zero-initialised projection `width ->
  width` and G_f is fixed to 1 (passed as None). At sparsity 0 the output then equals dense
  attention exactly, so training can start from the dense model and anneal the sparsity up.

The sparsity (or top-k) is read from the context on every call, so a schedule can change it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vsa.attention.base import AttentionBackend, AttentionContext
from vsa.layout import TileLayout
from vsa.ops import resolve_topk, video_sparse_attention

GATE_VARIANTS = ("pretrain", "adapt")


class VideoSparseAttention(AttentionBackend):
    """Coarse + top-k fine block-sparse attention with learned gates (see module docstring)."""

    needs_sparsity = True
    needs_gates = True
    param_variants = {gates: {"gates": gates} for gates in ("adapt", "pretrain")}

    def __init__(self, width: int, n_heads: int, head_dim: int, gates: str = "pretrain"):
        super().__init__(width, n_heads, head_dim)
        if gates not in GATE_VARIANTS:
            raise ValueError(f"unknown VSA gate variant {gates!r}; choose one of {GATE_VARIANTS}")
        self.gates = gates
        n_gates = 2 if gates == "pretrain" else 1
        self.gate_proj = nn.Linear(width, n_gates * width)
        self.reset_parameters()

    @classmethod
    def swap_in_options(cls, options: dict) -> dict:
        """A VSA swapped in after training has no learned gates: "adapt" gates (G_c = 0, G_f = 1)
        make it output its fine stage, which at sparsity 0 is dense attention."""
        return {**options, "gates": "adapt"}

    @classmethod
    def gate_weights(cls, width: int, gates: str = "pretrain") -> int:
        """Weights of the gate projection that multiply each token (for FLOP accounting)."""
        if gates not in GATE_VARIANTS:
            raise ValueError(f"unknown VSA gate variant {gates!r}; choose one of {GATE_VARIANTS}")
        return (2 if gates == "pretrain" else 1) * width * width

    @classmethod
    def kv_tokens(cls, grid, tile, order: str, options: dict, sparsity: float | None = None,
                  topk: int | None = None) -> float:
        """K x tile volume: the fine stage's key tiles (K from topk, else from sparsity)."""
        n_tiles = TileLayout(grid, tile, order=order).n_tiles
        k = resolve_topk(n_tiles, topk=topk) if topk is not None else resolve_topk(n_tiles, sparsity=sparsity)
        return k * math.prod(tile)

    @classmethod
    def coarse_flops(cls, grid, tile, width: int) -> float:
        """The coarse stage: dense attention over the tile means, 4 x (L / tile volume)^2 x width."""
        return 4 * (math.prod(grid) / math.prod(tile)) ** 2 * width

    @classmethod
    def kept_fraction(cls, layout: TileLayout, options: dict, sparsity: float | None = None,
                      topk: int | None = None) -> float:
        """The fine stage's K / n_tiles (its coarse stage not counted)."""
        return resolve_topk(layout.n_tiles, topk, None if topk is not None else sparsity) / layout.n_tiles

    def reset_parameters(self) -> None:
        if self.gates == "adapt":
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.zeros_(self.gate_proj.bias)
        else:
            nn.init.xavier_uniform_(self.gate_proj.weight)
            with torch.no_grad():
                self.gate_proj.bias[: self.width].zero_()   # G_c starts at 0
                self.gate_proj.bias[self.width:].fill_(1.0)  # G_f starts at 1

    def input_projection(self) -> nn.Linear:
        """The gate projection: a block may compute it in its qkv matmul (ctx.x_proj)."""
        return self.gate_proj

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        self.check_inputs(q, k, v, ctx)
        if ctx.x_proj is None and ctx.x_norm is None:
            raise ValueError("the vsa backend projects its gates from ctx.x_norm, the block's "
                             "normalised input [B, S, width] (or takes them projected, as "
                             "ctx.x_proj); the context carries neither")
        if ctx.topk is None and ctx.sparsity is None:
            raise ValueError("the vsa backend needs ctx.sparsity (in [0, 1)) or ctx.topk (>= 1)")
        batch, seq = q.shape[:2]
        gates = ctx.x_proj if ctx.x_proj is not None else self.gate_proj(ctx.x_norm)
        gates = gates.view(batch, seq, -1, self.n_heads, self.head_dim)
        if self.gates == "pretrain":
            gate_c, gate_f = gates[:, :, 0], gates[:, :, 1]
        else:
            gate_c, gate_f = gates[:, :, 0], None
        # Exactly one of topk / sparsity reaches the kernel; an explicit top-k wins.
        sparsity = None if ctx.topk is not None else ctx.sparsity
        return video_sparse_attention(q, k, v, ctx.layout, topk=ctx.topk, sparsity=sparsity,
                                      gate_c=gate_c, gate_f=gate_f)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gates={self.gates}"
