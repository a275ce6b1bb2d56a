"""The coarse stage of VSA: tile mean-pooling, coarse attention among tile means, top-K selection.

Two kernels do the whole stage in two launches (the fused op's forward and `coarse_stage` use them):
  _tile_means_kernel     one program per (tile, b*h): the fp32 means of q, k and v over the tile.
  _coarse_select_kernel  one program per (block of query tiles, b*h): coarse scores, their softmax,
                         O_c = P @ V_c and the top-K key tiles of every query tile.

Pooling and its adjoint (broadcasting a per-tile value back to the tile's tokens) are also a pair of
custom ops, each the other's backward, for the differentiable paths. Everything is deterministic:
a tile sum is one program adding the tile's rows in a fixed order (torch's CUDA index_add uses
atomics), and every output row is written by exactly one program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vsa.ops.block_sparse import _load_rows, _tile_program
from vsa.ops.options import KernelOptions, current_kernel_options
from vsa.ops.torch_impl import tile_sum_torch

# `_coarse_select_kernel` runs at most `select_block_q` query tiles per program (KernelOptions),
# fewer when their whole score rows [BLOCK_Q, n_pow2] would exceed _ROW_TILE_ELEMS elements.
# `scripts/bench_coarse.py` times the knobs (docs/results/coarse_h100.json and
# coarse_knobs_h100.json); the two product precisions select the same tiles but for ~1e-5 of the
# entries (near-equal scores swapping places).
_ROW_TILE_ELEMS = 8192


# --------------------------------------------------------------------------------------------------
# Tile sums and means
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows_sum(X, lo, hi, stride_s, HEAD_D: tl.constexpr, BLOCK: tl.constexpr,
                   N_CHUNKS: tl.constexpr):
    """fp32 sum of rows lo:hi of a [S, HEAD_D] slice (stride_s between rows), added in a fixed
    order: BLOCK-row chunks into one accumulator, then a reduction over its rows."""
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BLOCK, HEAD_D], tl.float32)
    for c in range(N_CHUNKS):
        offs = lo + c * BLOCK + tl.arange(0, BLOCK)
        acc += _load_rows(X, offs, stride_s, offs_d, offs < hi, False, True)
    return tl.sum(acc, 0)


def _row_block(max_tile: int, options: KernelOptions) -> tuple[int, int]:
    """Rows per chunk and chunks per tile for `_tile_rows_sum`."""
    block = min(options.means_block, triton.next_power_of_2(max_tile))
    return block, math.ceil(max_tile / block)


@triton.jit
def _tile_sum_kernel(
    X, OUT, OFF,
    sx_b, sx_s, sx_h, so_b, so_t, so_h, H,
    HEAD_D: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """OUT[b, t, h] = sum of X[b, s, h] over the tokens s of tile t (fp32)."""
    t, pid_bh, b, h, lo, hi = _tile_program(OFF, H)
    offs_d = tl.arange(0, HEAD_D)
    total = _tile_rows_sum(X + b * sx_b + h * sx_h, lo, hi, sx_s, HEAD_D, BLOCK, N_CHUNKS)
    tl.store(OUT + b * so_b + t * so_t + h * so_h + offs_d, total)


def _tile_sum_triton(x: torch.Tensor, offsets: torch.Tensor, max_tile: int) -> torch.Tensor:
    B, _, H, D = x.shape
    n_tiles = offsets.numel() - 1
    out = torch.empty((B, n_tiles, H, D), device=x.device, dtype=torch.float32)
    block, n_chunks = _row_block(max_tile, current_kernel_options())
    _tile_sum_kernel[(n_tiles, B * H)](
        x, out, offsets, x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H,
        HEAD_D=D, BLOCK=block, N_CHUNKS=n_chunks,
    )
    return out


@triton.jit
def _tile_means_kernel(
    Q, K, V, QC, KC, VC, OFF,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_t, so_h, H,
    HEAD_D: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """QC[b, t, h] = mean of Q[b, s, h] over the tokens s of tile t (fp32), and the same for K and V.

    One launch for the three tensors: the tile bounds are loaded once, and a ragged tile divides by
    its own size."""
    t, pid_bh, b, h, lo, hi = _tile_program(OFF, H)
    offs_d = tl.arange(0, HEAD_D)
    size = (hi - lo).to(tl.float32)
    out = b * so_b + t * so_t + h * so_h + offs_d
    q = _tile_rows_sum(Q + b * sq_b + h * sq_h, lo, hi, sq_s, HEAD_D, BLOCK, N_CHUNKS)
    tl.store(QC + out, q / size)
    k = _tile_rows_sum(K + b * sk_b + h * sk_h, lo, hi, sk_s, HEAD_D, BLOCK, N_CHUNKS)
    tl.store(KC + out, k / size)
    v = _tile_rows_sum(V + b * sv_b + h * sv_h, lo, hi, sv_s, HEAD_D, BLOCK, N_CHUNKS)
    tl.store(VC + out, v / size)


def tile_means(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
               max_tile: int, options: KernelOptions | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 tile means of q, k, v ([B, S, H, D], unit stride along D) in one launch: three
    contiguous [B, n_tiles, H, D] tensors (separate storages: a custom op's outputs may not alias).
    `options`: the kernel options (default: those in force)."""
    options = options or current_kernel_options()
    B, _, H, D = q.shape
    assert q.shape == k.shape == v.shape and q.stride(3) == k.stride(3) == v.stride(3) == 1
    n_tiles = offsets.numel() - 1
    qc, kc, vc = (torch.empty((B, n_tiles, H, D), device=q.device, dtype=torch.float32)
                  for _ in range(3))
    block, n_chunks = _row_block(max_tile, options)
    _tile_means_kernel[(n_tiles, B * H)](
        q, k, v, qc, kc, vc, offsets,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qc.stride(0), qc.stride(1), qc.stride(2), H,
        HEAD_D=D, BLOCK=block, N_CHUNKS=n_chunks,
        num_warps=options.means_warps,
    )
    return qc, kc, vc


# --------------------------------------------------------------------------------------------------
# Coarse attention and top-K selection
# --------------------------------------------------------------------------------------------------


@triton.jit
def _top_k_mask(s, K):
    """Which entries of each row of fp32 `s` [R, N] are among the row's K largest: exactly K per
    row, ties going to the lower columns (-inf padding is never chosen while K <= the finite ones).

    A radix select, no sort: each score maps to a uint32 key u of the same order, and the K-th
    largest key of each row is built bit by bit from the top (32 counting passes)."""
    bits = s.to(tl.uint32, bitcast=True)
    # Negative floats: flip every bit (their order reverses); the rest: set the sign bit.
    u = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    kth = tl.zeros([s.shape[0]], tl.uint32)
    bit = tl.full([], 1 << 31, tl.uint32)
    for _ in range(32):
        # Keep the bit if at least K keys of the row are >= the threshold with it set (no overflow:
        # kth has only bits above `bit`).
        n_ge = tl.sum((u >= (kth + bit)[:, None]).to(tl.int32), 1)
        kth = tl.where(n_ge >= K, kth + bit, kth)
        bit = bit >> 1
    above = u > kth[:, None]
    tied = u == kth[:, None]
    room = K - tl.sum(above.to(tl.int32), 1)  # >= 1, and at most the number of tied keys
    return above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= room[:, None]))


@triton.jit
def _coarse_select_kernel(
    QC, KC, VC, P, OC, IDX,
    s_b, s_t, s_h, H, n, K, scale,
    HEAD_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, N_POW2: tl.constexpr,
    D_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Coarse attention of BLOCK_Q query tiles of one (b, h) over all n key tiles, in fp32.

    S = QC . KC^T * scale; writes P = softmax(S) ([B, H, n, n]), OC = P @ VC ([B, n, H, D]; QC, KC,
    VC and OC share one [B, n, H, D] layout) and IDX[b, h, i, :] = the K key tiles of largest
    S[i, :], ascending ([B, H, n, K]). Softmax and selection need whole rows, [BLOCK_Q, N_POW2] in
    registers; the products run BLOCK_K key tiles at a time, so S passes through P's rows (which
    only this program touches; barriers order the passes between the program's threads)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    base = b * s_b + h * s_h
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n
    p_rows = P + pid_bh.to(tl.int64) * n * n + rows[:, None] * n  # [BLOCK_Q, 1] row starts
    offs_d = tl.arange(0, HEAD_D)

    # 1. S, BLOCK_K key tiles at a time, in fp32 ("ieee") or ~fp32 ("tf32x3") products, close to
    #    torch's fp32 einsum (plain TF32 would perturb the order of close scores).
    for k0 in range(0, n, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        s = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
        for d0 in tl.static_range(0, HEAD_D, D_CHUNK):
            offs_c = d0 + tl.arange(0, D_CHUNK)
            qc = _load_rows(QC + base, rows, s_t, offs_c, row_ok, False, False)
            kc = _load_rows(KC + base, keys, s_t, offs_c, keys < n, False, False)
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PRECISION)
        s = s * scale
        tl.store(p_rows + keys[None, :], s, mask=row_ok[:, None] & (keys < n)[None, :])
    tl.debug_barrier()

    # 2. Whole rows: the softmax overwrites S with P, and the top K columns go to IDX ascending
    #    (column j to slot: selected columns up to j, minus one).
    cols = tl.arange(0, N_POW2)
    row_col_ok = row_ok[:, None] & (cols < n)[None, :]
    s = tl.load(p_rows + cols[None, :], mask=row_col_ok, other=0.0)
    s = tl.where((cols < n)[None, :], s, float("-inf"))
    tl.debug_barrier()  # every thread holds its scores before any is overwritten
    e = tl.exp(s - tl.max(s, 1)[:, None])
    tl.store(p_rows + cols[None, :], e / tl.sum(e, 1)[:, None], mask=row_col_ok)
    selected = _top_k_mask(s, K)
    slot = tl.cumsum(selected.to(tl.int32), 1) - 1
    idx_rows = IDX + pid_bh.to(tl.int64) * n * K + rows[:, None] * K
    tl.store(idx_rows + slot, tl.broadcast_to(cols[None, :], [BLOCK_Q, N_POW2]),
             mask=selected & row_ok[:, None])
    tl.debug_barrier()

    # 3. O_c = P @ VC, BLOCK_K key tiles at a time.
    acc = tl.zeros([BLOCK_Q, HEAD_D], tl.float32)
    for k0 in range(0, n, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_rows + keys[None, :], mask=row_ok[:, None] & (keys < n)[None, :], other=0.0)
        vc = _load_rows(VC + base, keys, s_t, offs_d, keys < n, False, False)
        acc = tl.dot(p, vc, acc, input_precision=PRECISION)
    tl.store(OC + base + rows[:, None] * s_t + offs_d[None, :], acc, mask=row_ok[:, None])


def coarse_attention_topk(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float,
                          topk: int, options: KernelOptions | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse attention among fp32 tile means [B, n, H, D] and the top-`topk` key tiles of each
    query tile, in one launch: probs fp32 [B, H, n, n] (the backward needs them), O_c fp32
    [B, n, H, D] and q2k_idx int32 [B, H, n, topk] (ascending: a fixed accumulation order for the
    fine stage, and forward memory walks). `options`: the kernel options (default: those in force)."""
    options = options or current_kernel_options()
    B, n, H, D = qc.shape
    assert qc.shape == kc.shape == vc.shape and 1 <= topk <= n, (qc.shape, kc.shape, vc.shape, topk)
    qc, kc, vc = (x.float().contiguous() for x in (qc, kc, vc))
    probs = torch.empty((B, H, n, n), device=qc.device, dtype=torch.float32)
    o_c = torch.empty_like(qc)
    q2k_idx = torch.empty((B, H, n, topk), device=qc.device, dtype=torch.int32)
    n_pow2 = max(16, triton.next_power_of_2(n))
    block_q = max(1, min(options.select_block_q, n_pow2, _ROW_TILE_ELEMS // n_pow2))
    _coarse_select_kernel[(triton.cdiv(n, block_q), B * H)](
        qc, kc, vc, probs, o_c, q2k_idx, qc.stride(0), qc.stride(1), qc.stride(2), H, n, topk, scale,
        HEAD_D=D, BLOCK_Q=block_q, BLOCK_K=min(options.select_block_k, n_pow2), N_POW2=n_pow2,
        D_CHUNK=min(D, options.select_d_chunk), PRECISION=options.select_precision,
        num_warps=options.select_warps,
    )
    return probs, o_c, q2k_idx


# --------------------------------------------------------------------------------------------------
# Differentiable pooling and the coarse stage
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("vsa::tile_sum", mutates_args=())
def tile_sum(x: torch.Tensor, offsets: torch.Tensor, tile_ids: torch.Tensor, max_tile: int,
             use_triton: bool) -> torch.Tensor:
    """Sum of x over each tile's tokens in fp32: [B, S, H, D] -> [B, n_tiles, H, D]."""
    if use_triton:
        return _tile_sum_triton(x, offsets, max_tile)
    return tile_sum_torch(x, tile_ids, offsets.numel() - 1)


@tile_sum.register_fake
def _(x, offsets, tile_ids, max_tile, use_triton):
    return x.new_empty((x.shape[0], offsets.numel() - 1, x.shape[2], x.shape[3]), dtype=torch.float32)


@torch.library.custom_op("vsa::tile_broadcast", mutates_args=())
def tile_broadcast(xc: torch.Tensor, offsets: torch.Tensor, tile_ids: torch.Tensor, max_tile: int,
                   use_triton: bool) -> torch.Tensor:
    """Each token receives its tile's value: [B, n_tiles, H, D] -> [B, S, H, D]."""
    return xc.index_select(1, tile_ids)


@tile_broadcast.register_fake
def _(xc, offsets, tile_ids, max_tile, use_triton):
    return xc.new_empty((xc.shape[0], tile_ids.numel(), xc.shape[2], xc.shape[3]))


def _save_index_args(ctx, inputs, output):
    _, ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton = inputs
    ctx.in_dtype = inputs[0].dtype


def _tile_sum_backward(ctx, grad):
    gx = tile_broadcast(grad.float(), ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton)
    return gx.to(ctx.in_dtype), None, None, None, None


def _tile_broadcast_backward(ctx, grad):
    gc = tile_sum(grad.contiguous(), ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton)
    return gc.to(ctx.in_dtype), None, None, None, None


tile_sum.register_autograd(_tile_sum_backward, setup_context=_save_index_args)
tile_broadcast.register_autograd(_tile_broadcast_backward, setup_context=_save_index_args)


def tile_mean(x: torch.Tensor, layout, use_triton: bool) -> torch.Tensor:
    """Mean over the real tokens of each tile (ragged tiles divide by their own size), fp32."""
    total = tile_sum(x, layout.offsets, layout.tile_ids, layout.max_tile_size, use_triton)
    return total / layout.sizes.to(torch.float32)[None, :, None, None]


def coarse_stage(q, k, v, layout, topk: int, use_triton: bool):
    """Coarse attention among tile means and the top-K key tiles of each query tile.

    Returns O_c per tile (fp32 [B, n_tiles, H, D]) and q2k_idx (int32 [B, H, n_tiles, topk]).
    With Triton and no gradient needed: the two fused kernels; otherwise differentiable pieces.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if use_triton and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        qc, kc, vc = tile_means(q, k, v, layout.offsets, layout.max_tile_size)
        _, o_c, q2k_idx = coarse_attention_topk(qc, kc, vc, scale, topk)
        return o_c, q2k_idx
    qc, kc, vc = [tile_mean(x, layout, use_triton) for x in (q, k, v)]
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    o_c = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vc)
    # Ascending tile order: a fixed accumulation order for the fine stage and forward memory walks.
    q2k_idx = scores.detach().topk(topk, dim=-1, sorted=False).indices.sort(dim=-1).values
    return o_c, q2k_idx.to(torch.int32).contiguous()
