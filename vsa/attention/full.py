"""Dense softmax attention through torch's scaled_dot_product_attention (flash / memory-efficient
kernels where available). Token order does not matter to it; it ignores sparsity and gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vsa.attention.base import AttentionBackend, AttentionContext


class FullAttention(AttentionBackend):
    """Full (dense) self-attention, scale 1/sqrt(head_dim)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        self.check_inputs(q, k, v, ctx)
        # SDPA wants [B, H, S, D]; transposing back gives [B, S, H, D] (a view, no copy).
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)
