"""Dense softmax attention through torch's scaled_dot_product_attention. Token order does not
matter to it; it ignores sparsity and gates.

On a CUDA GPU with bf16/fp16 compute it is pinned to the cuDNN kernel, the fastest dense attention
on Hopper (H100, 1x12x32768x128: 578 TFLOP/s fwd+bwd vs 327 for the flash backend that SDPA picks
by default; docs/results/attention_h100.md): the dense baseline VSA is compared with is the best
one. `kernel="auto"` leaves the choice to SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vsa.attention.base import AttentionBackend, AttentionContext

KERNELS = ("cudnn", "auto")
_HALF = (torch.bfloat16, torch.float16)


def _computes_in_half(x: torch.Tensor) -> bool:
    """Whether SDPA will see bf16/fp16 inputs (the tensor's dtype, or autocast's)."""
    device = x.device.type
    return x.dtype in _HALF or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _HALF)


class FullAttention(AttentionBackend):
    """Full (dense) self-attention, scale 1/sqrt(head_dim)."""

    def __init__(self, width: int, n_heads: int, head_dim: int, kernel: str = "cudnn"):
        super().__init__(width, n_heads, head_dim)
        if kernel not in KERNELS:
            raise ValueError(f"unknown dense attention kernel {kernel!r}; choose one of {KERNELS}")
        self.kernel = kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        self.check_inputs(q, k, v, ctx)
        # SDPA wants [B, H, S, D]; transposing back gives [B, S, H, D] (a view, no copy).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kernel == "cudnn" and q.is_cuda and self.head_dim <= 128 and _computes_in_half(q):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"
