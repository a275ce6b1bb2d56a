"""The elementwise glue at the start of VSA's backward, fused into one pass over dO.

With OUT = O_f * G_f + O_c[tile] * G_c (gates None = 1), the backward needs, before the coarse and
fine-stage backward kernels run:
  dO_f = dO * G_f                    the fine stage's output gradient (dO's dtype)
  delta = rowsum(dO_f * O_f)         the fine-stage softmax backward's row correction (fp32)
  dO_c = sum_tile(dO * G_c)          the coarse output's gradient per tile (fp32)
  dG_f = dO * O_f, dG_c = dO * O_c[tile]   the gate gradients (the gates' dtypes)
Done separately these are ~6 full-size passes over [B, S, H, D]; one kernel reads dO, O_f and the
gates once. One program per (tile, b*h) walks the tile's rows in a fixed order, so the tile sum is
deterministic (no atomics), as in coarse.py's `_tile_sum_kernel`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vsa.ops.block_sparse import _load_rows, _tile_program


@triton.jit
def _bwd_prep_kernel(
    DO, OF, GC, GF, OC, DOF, DELTA, DOC, DGC, DGF, OFF,
    s_b, s_s, s_h, H, S, NT,
    HEAD_D: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
    HAS_GC: tl.constexpr, HAS_GF: tl.constexpr,
):
    """For the rows of tile t, head (b, h): DOF = DO * GF, DELTA = rowsum(DOF * OF), DGF = DO * OF,
    DGC = DO * OC[tile] and DOC[tile] = sum over rows of DO * GC. DO, OF, GC, GF, DOF, DGC, DGF are
    contiguous [B, S, H, D] (strides s_*); OC, DOC fp32 contiguous [B, NT, H, D]; DELTA fp32 [B, H, S].
    Products are taken in fp32 and rounded once; DELTA uses DOF as rounded to its stored dtype."""
    t, pid_bh, b, h, lo, hi = _tile_program(OFF, H)
    offs_d = tl.arange(0, HEAD_D)
    tile_row = ((b * NT + t) * H + h) * HEAD_D + offs_d
    if HAS_GC:
        o_c = tl.load(OC + tile_row)[None, :]
    d_oc = tl.zeros([BLOCK, HEAD_D], tl.float32)
    base = b * s_b + h * s_h
    for c in range(N_CHUNKS):
        offs = lo + c * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hi
        rows = base + offs[:, None] * s_s + offs_d[None, :]
        # Every load upcasts to fp32 (also keeps bf16 out of the interpreter's arithmetic).
        do = _load_rows(DO + base, offs, s_s, offs_d, mask, False, True)
        o_f = _load_rows(OF + base, offs, s_s, offs_d, mask, False, True)
        if HAS_GF:
            g_f = _load_rows(GF + base, offs, s_s, offs_d, mask, False, True)
            do_f = (do * g_f).to(DOF.dtype.element_ty)
            tl.store(DOF + rows, do_f, mask=mask[:, None])
            tl.store(DGF + rows, (do * o_f).to(DGF.dtype.element_ty), mask=mask[:, None])
            do_f = do_f.to(tl.float32)
        else:
            do_f = do
        tl.store(DELTA + pid_bh.to(tl.int64) * S + offs, tl.sum(do_f * o_f, 1), mask=mask)
        if HAS_GC:
            d_oc += do * _load_rows(GC + base, offs, s_s, offs_d, mask, False, True)
            tl.store(DGC + rows, (do * o_c).to(DGC.dtype.element_ty), mask=mask[:, None])
        else:
            d_oc += do
    tl.store(DOC + tile_row, tl.sum(d_oc, 0))


def vsa_backward_prep(dout, o_f, o_c, gate_c, gate_f, offsets, max_tile: int):
    """Launch the glue kernel. dout, o_f and the gates: [B, S, H, D] in tile-major order (gates None
    = absent, i.e. 1); o_c: fp32 [B, n_tiles, H, D], used only with gate_c (else may be None).

    Returns (do_f, delta, d_oc, d_gate_c, d_gate_f): do_f in dout's dtype (dout itself, no copy, without
    gate_f), delta fp32 [B, H, S], d_oc fp32 [B, n_tiles, H, D], the gate gradients in the gates'
    dtypes (`dout.new_empty(0)` for an absent gate). Everything returned is contiguous."""
    B, S, H, D = dout.shape
    n_tiles = offsets.numel() - 1
    dout, o_f = dout.contiguous(), o_f.contiguous()
    has_gc, has_gf = gate_c is not None, gate_f is not None
    gate_c = gate_c.contiguous() if has_gc else dout
    gate_f = gate_f.contiguous() if has_gf else dout
    o_c = o_c.contiguous() if has_gc else dout
    do_f = torch.empty_like(dout) if has_gf else dout
    d_gate_c = torch.empty_like(gate_c) if has_gc else dout.new_empty(0)
    d_gate_f = torch.empty_like(gate_f) if has_gf else dout.new_empty(0)
    delta = torch.empty((B, H, S), device=dout.device, dtype=torch.float32)
    d_oc = torch.empty((B, n_tiles, H, D), device=dout.device, dtype=torch.float32)
    block = min(64, triton.next_power_of_2(max_tile))
    _bwd_prep_kernel[(n_tiles, B * H)](
        dout, o_f, gate_c, gate_f, o_c, do_f, delta, d_oc,
        d_gate_c if has_gc else dout, d_gate_f if has_gf else dout, offsets,
        dout.stride(0), dout.stride(1), dout.stride(2), H, S, n_tiles,
        HEAD_D=D, BLOCK=block, N_CHUNKS=math.ceil(max_tile / block), HAS_GC=has_gc, HAS_GF=has_gf,
    )
    return do_f, delta, d_oc, d_gate_c, d_gate_f
