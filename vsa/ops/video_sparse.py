"""The whole VSA on the GPU as one custom op with a hand-written backward.

Forward: tile means of q, k, v (one Triton launch, fp32) -> coarse attention among them and the
top-K key tiles per query tile (one more launch, coarse.py) -> the fine-stage kernel, whose epilogue
also writes OUT = O_f * G_f + O_c[tile] * G_c (no separate broadcast or combine pass).

Backward: one pass over dO (glue.py) gives dO_f = dO * G_f, the fine stage's row correction
rowsum(dO_f * O_f), the per-tile coarse gradient sum_tile(dO * G_c) and the gate gradients
dO * O_f and dO * O_c[tile] -> the coarse attention's backward (small, fp32) gives the gradients of
the tile means, which the fine-stage backward kernels add to every token of the tile while storing
dQ, dK, dV. Selection gets no gradient.

Doing it in one op saves the full-size passes that autograd would add between the pieces (a
broadcast, the combine, three casts and three gradient sums over [B, S, H, D]); fusing the
backward's elementwise glue into one kernel saves ~6 more.
"""

from __future__ import annotations

import math

import torch

from vsa.layout import TileFill
from vsa.ops.block_sparse import bsa_backward, bsa_forward
from vsa.ops.coarse import coarse_attention_topk, tile_means
from vsa.ops.glue import vsa_backward_prep


@torch.library.custom_op("vsa::video_sparse_attention_fwd", mutates_args=())
def vsa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_c: torch.Tensor | None,
            gate_f: torch.Tensor | None, offsets: torch.Tensor, sizes: torch.Tensor, max_tile: int,
            fill: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """Returns OUT and what the backward needs: O_f, LSE2, the tile means qc, kc, vc, the coarse
    probabilities [B, H, n, n] and output O_c [B, n, H, D] (fp32), and q2k_idx (every list holds
    `topk` tiles, so the kernels need no count tensor)."""
    qc, kc, vc = tile_means(q, k, v, offsets, max_tile)
    probs, o_c, q2k_idx = coarse_attention_topk(qc, kc, vc, 1.0 / math.sqrt(q.shape[-1]), topk)
    fill = TileFill(fill)
    o_f, lse, out = bsa_forward(q, k, v, offsets, offsets, q2k_idx, None, max_tile, max_tile,
                                fill, fill, lists_sorted=True, o_c=o_c, gate_c=gate_c,
                                gate_f=gate_f)
    return out, o_f, lse, qc, kc, vc, probs, o_c, q2k_idx


@vsa_fwd.register_fake
def _(q, k, v, gate_c, gate_f, offsets, sizes, max_tile, fill, topk):
    B, S, H, D = q.shape
    n = offsets.shape[0] - 1
    means = [q.new_empty((B, n, H, D), dtype=torch.float32) for _ in range(3)]
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32),
            *means, q.new_empty((B, H, n, n), dtype=torch.float32),
            q.new_empty((B, n, H, D), dtype=torch.float32),
            q.new_empty((B, H, n, topk), dtype=torch.int32))


@torch.library.custom_op("vsa::video_sparse_attention_bwd", mutates_args=())
def vsa_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            gate_c: torch.Tensor | None, gate_f: torch.Tensor | None, o_f: torch.Tensor,
            lse: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
            probs: torch.Tensor, o_c: torch.Tensor, q2k_idx: torch.Tensor, offsets: torch.Tensor,
            sizes: torch.Tensor, max_tile: int,
            fill: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, d gate_c, d gate_f (gate grads are empty tensors for absent gates)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    # Gated combine, one pass over dO (d_oc: fp32 [B, n, H, D]).
    do_f, delta, d_oc, d_gate_c, d_gate_f = vsa_backward_prep(
        dout, o_f, o_c if gate_c is not None else None, gate_c, gate_f, offsets, max_tile)
    # Coarse attention backward: dV_c = P^T dO_c; dS = P * (dP - rowsum(dP * P)); dQ_c = dS K_c s.
    d_oc_h = d_oc.permute(0, 2, 1, 3)  # [B, H, n, D]
    d_vc = torch.einsum("bhqk,bhqd->bkhd", probs, d_oc_h)
    d_p = torch.einsum("bhqd,bkhd->bhqk", d_oc_h, vc)
    d_s = probs * (d_p - (d_p * probs).sum(-1, keepdim=True))
    d_qc = torch.einsum("bhqk,bkhd->bqhd", d_s, kc) * scale
    d_kc = torch.einsum("bhqk,bqhd->bkhd", d_s, qc) * scale
    # The tile mean's gradient reaches each token of the tile divided by the tile's size.
    inv_size = (1.0 / sizes.to(torch.float32))[None, :, None, None]
    bias = tuple((g * inv_size).contiguous() for g in (d_qc, d_kc, d_vc))
    fill = TileFill(fill)
    dq, dk, dv = bsa_backward(do_f, q, k, v, o_f, lse, offsets, offsets, q2k_idx, None, max_tile,
                              max_tile, fill, fill, lists_sorted=True, bias=bias, delta=delta)
    return dq, dk, dv, d_gate_c, d_gate_f


@vsa_bwd.register_fake
def _(dout, q, k, v, gate_c, gate_f, o_f, lse, qc, kc, vc, probs, o_c, q2k_idx, offsets, sizes,
      max_tile, fill):
    gc = gate_c.new_empty(gate_c.shape) if gate_c is not None else dout.new_empty(0)
    gf = gate_f.new_empty(gate_f.shape) if gate_f is not None else dout.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gc, gf


def _setup(ctx, inputs, output):
    q, k, v, gate_c, gate_f, offsets, sizes, max_tile, fill, _ = inputs
    _, o_f, lse, qc, kc, vc, probs, o_c, q2k_idx = output
    ctx.static = (max_tile, fill)
    ctx.has_gates = (gate_c is not None, gate_f is not None)
    ctx.save_for_backward(q, k, v, gate_c, gate_f, o_f, lse, qc, kc, vc, probs, o_c, q2k_idx,
                          offsets, sizes)


def _backward(ctx, dout, *unused):
    q, k, v, gate_c, gate_f, o_f, lse, qc, kc, vc, probs, o_c, q2k_idx, offsets, sizes = ctx.saved_tensors
    dq, dk, dv, d_gc, d_gf = vsa_bwd(dout, q, k, v, gate_c, gate_f, o_f, lse, qc, kc, vc, probs, o_c,
                                     q2k_idx, offsets, sizes, *ctx.static)
    d_gc = d_gc if ctx.has_gates[0] else None
    d_gf = d_gf if ctx.has_gates[1] else None
    return dq, dk, dv, d_gc, d_gf, None, None, None, None, None


vsa_fwd.register_autograd(_backward, setup_context=_setup)


def video_sparse_attention_triton(q, k, v, layout, topk: int, gate_c=None, gate_f=None):
    """The fused op on the Triton path; gates are expanded to q's shape (contiguous) if given."""
    gates = [None if g is None else g.expand(q.shape).contiguous() for g in (gate_c, gate_f)]
    out = vsa_fwd(q, k, v, gates[0], gates[1], layout.offsets, layout.sizes,
                  layout.max_tile_size, int(layout.fill), topk)[0]
    return out
