"""The fine stage of VSA: block-sparse flash attention over ragged tiles, forward and backward.

Tensors are `[B, S, H, D]` with tokens in tile-major order. Query tile `i` of head (b, h) attends to
the key tiles `q2k_idx[b, h, i, :q2k_cnt[b, h, i]]` (exact softmax over the union of their tokens).
Tiles are ragged: tile `t` holds tokens `offsets[t]:offsets[t + 1]`; rows and columns past a tile's
end are masked, never padded in memory.

Three kernels, one job each:
  _fwd_kernel   one program per (query tile chunk, b*h): online softmax over the listed key tiles;
                writes O and the log2-sum-exp (LSE2, base 2 because scores are kept in log2 units).
  _dq_kernel    one program per (query tile chunk, b*h): walks the same q->k list, accumulates dQ.
  _dkv_kernel   one program per (key tile chunk, b*h): walks the transposed k->q list, accumulates
                dK and dV. Each output row is written by exactly one program, in list order, so the
                backward is deterministic (no atomics).
Scores are computed as (q . k) * (softmax_scale * log2(e)) in fp32 and exponentiated with exp2; K is
never pre-scaled in low precision.

Each loop step walks UNITS (1 or 2, autotuned) units of its list, a unit being one 64-row chunk of a
listed tile (`_unit_rows`). Steps over full tiles run without row masks: all of them when every tile
is full, all but the last tile's when only the layout's last tile is short (Z-order groups) and the
list ascends (`_plain_units`), none for ragged cubes.

On Hopper GPUs the walked tiles (K/V in the forward and dQ kernels, Q/dO in dK/dV) are loaded
through TMA tensor descriptors (`KernelOptions.tma`, `_unit_load`): one copy per tile, no per-thread address
arithmetic. A program's own rows, other GPUs, the interpreter (unless forced) and layouts TMA cannot
describe use per-row pointer loads.

On Hopper, `KernelOptions.gluon_fwd` / `gluon_bwd` send the forward / backward to the Gluon kernels
of `gluon_hopper.py` where they apply (tiles of exactly 64 tokens, bf16/fp16, D 64/128); these
kernels run everywhere else.

Tuning knobs (block caps, load path, the autotuner's search space) come from `KernelOptions`
(vsa/ops/options.py), resolved once per launch wrapper call.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from vsa.layout import TileFill
from vsa.ops import gluon_hopper
from vsa.ops.options import KernelOptions, current_kernel_options

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Read once at import (Triton reads it then too); a module constant also keeps torch.compile happy.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests)."""
    return _INTERPRET


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


def _configs(space: str) -> list:
    """Warps x pipeline depth x tiles per step to try on a GPU (the interpreter runs one config,
    chosen by the launch wrapper) in search space `space` (`KernelOptions.autotune`): "full"
    (every speed figure uses it) or "quick" (GPU test runs, where compiling and timing every
    configuration for every new shape key is most of the run: UNITS 1 and 2 at 4 warps / 2
    stages). UNITS: 1 or 2 (_unit_rows). Both spaces end with an unpipelined config (1 stage): it
    fits in shared memory when no other does (fp32 inputs at D 128 with 128-row dQ programs need
    262 KB at 2 stages, the H100 has 227 KB); see docs/history/kernel_notes.md v10 for what it measured."""
    fallback = [triton.Config({"UNITS": 1}, num_warps=4, num_stages=1)]
    if space == "quick":
        return [triton.Config({"UNITS": u}, num_warps=4, num_stages=2) for u in (1, 2)] + fallback
    if space != "full":
        raise ValueError(f"unknown autotuner search space {space!r}; use 'full' or 'quick'")
    return [triton.Config({"UNITS": u}, num_warps=w, num_stages=s)
            for u in (1, 2) for w in (4, 8) for s in (2, 3, 4)] + fallback


def _prune(configs, named_args, **kwargs):
    """TMA loads walk one unit per step (UNITS 1). Constexpr launch options come in kwargs."""
    tma = kwargs.get("TMA", named_args.get("TMA"))
    return [c for c in configs if not tma or c.kwargs["UNITS"] == 1]


# Tuned once per head dim, block shape, tile chunking and load path (and, implicitly, dtype).
_TUNE_KEY = ["HEAD_D", "BLOCK_M", "BLOCK_N", "EVEN_M", "EVEN_N", "TAIL_M", "TAIL_N", "TMA"]


class TunedKernel:
    """A kernel autotuned over the search space in force at launch: one `triton.autotune` wrapper
    per space, made on first use (`tuners[space]`, with the autotuner's cache of picks). In the
    interpreter the kernel itself runs, with `_interpreter_options()`."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.tuners: dict = {}

    def tuner(self, space: str):
        if space not in self.tuners:
            self.tuners[space] = triton.autotune(
                configs=_configs(space), key=_TUNE_KEY,
                prune_configs_by={"early_config_prune": _prune})(self.kernel)
        return self.tuners[space]

    def launcher(self, options: KernelOptions):
        """What to index with the grid and call: the kernel (interpreter) or its autotuner."""
        if interpreting():
            return self.kernel
        return self.tuner(options.search_space())


def _interpreter_options(options: KernelOptions, tma: bool = False) -> dict:
    """UNITS and launch parameters of a tuned kernel in the interpreter (none on a GPU, where the
    autotuner sets them)."""
    if not interpreting():
        return {}
    return dict(UNITS=1 if tma else options.interpreter_units, num_warps=4, num_stages=1)


@triton.jit
def _load_rows(base, offs, stride, offs_d, mask, EVEN: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `offs` of a [S, D] slice; rows past a ragged tile's end read as 0 (unless EVEN)."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_program(OFF, H):
    """For kernels with one program per (tile, b*h): the tile t, pid_bh, b (int64), h and the
    tile's token range lo:hi."""
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    return t, pid_bh, (pid_bh // H).to(tl.int64), pid_bh % H, tl.load(OFF + t), tl.load(OFF + t + 1)


@triton.jit
def _unit_rows(LIST, OFF, step, n_units, UNITS: tl.constexpr, BLOCK: tl.constexpr,
               CHUNKS: tl.constexpr):
    """Rows of loop step `step` over a tile list: UNITS (1 or 2) consecutive units, a unit being one
    BLOCK-row chunk of a listed tile (unit u = chunk u % CHUNKS of tile LIST[u // CHUNKS]).
    Returns the token rows [UNITS * BLOCK] and their mask (past the list, past a ragged tile).
    Scalar loads per unit: a per-row gather of the list was slower (docs/history/kernel_notes.md, v6)."""
    u0 = step * UNITS
    t0 = tl.load(LIST + u0 // CHUNKS)
    lo0 = tl.load(OFF + t0) + (u0 % CHUNKS) * BLOCK
    hi0 = tl.load(OFF + t0 + 1)
    if UNITS == 1:
        rows = lo0 + tl.arange(0, BLOCK)
        mask = rows < hi0
    else:
        u1 = u0 + 1
        has_u1 = u1 < n_units
        t1 = tl.load(LIST + u1 // CHUNKS, mask=has_u1, other=0)
        lo1 = tl.load(OFF + t1) + (u1 % CHUNKS) * BLOCK
        hi1 = tl.where(has_u1, tl.load(OFF + t1 + 1), lo1)  # no second unit: an empty one
        r = tl.arange(0, 2 * BLOCK)
        first = r < BLOCK
        rows = tl.where(first, lo0 + r, lo1 + (r - BLOCK))
        mask = rows < tl.where(first, hi0, hi1)
    return rows, mask


@triton.jit
def _list_len(CNT, row, KMAX, HAS_CNT: tl.constexpr):
    """Entries in list `row` of a q->k list tensor: CNT[row], or KMAX when every list is full (no
    count tensor)."""
    if HAS_CNT:
        n = tl.load(CNT + row)
    else:
        n = KMAX + row * 0
    return n


@triton.jit
def _plain_units(LIST, OFF, n_sel, CHUNKS: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
                 TAIL: tl.constexpr):
    """How many leading units of a list need no row mask: all of them when every tile fills its
    chunks (EVEN); all but the last listed tile's when only the layout's last tile may be short
    and the list ascends (TAIL: the short tile can only come last); none otherwise."""
    if EVEN:
        n_plain = n_sel * CHUNKS
    elif TAIL:
        last = tl.load(LIST + n_sel - 1, mask=n_sel > 0, other=0)
        short = (tl.load(OFF + last + 1) - tl.load(OFF + last)) < CHUNKS * BLOCK
        n_plain = n_sel * CHUNKS - tl.where(short & (n_sel > 0), CHUNKS, 0)
    else:
        n_plain = n_sel * 0
    return n_plain


@triton.jit
def _unit_load(A, B, LIST, OFF, step, n_units, base, h, s_a, s_b, offs_d, UNITS: tl.constexpr,
               BLOCK: tl.constexpr, CHUNKS: tl.constexpr, HEAD_D: tl.constexpr, EVEN: tl.constexpr,
               UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Loop step `step` over a tile list: its rows and mask (`_unit_rows`) and those rows of two
    [S, D] slices (K and V, or Q and dO). Pointer path: A and B point at this (b, h)'s slices with
    row strides s_a, s_b; rows past a ragged tile's end read as 0 unless EVEN. TMA path (one unit
    per step): A and B are tensor descriptors over [B * S, H, D] with [BLOCK, 1, HEAD_D] blocks,
    `base` = b * S; rows past a tile's end hold the next tile's tokens (or 0 past the tensor) and
    are masked by the caller, so the loads never need masks."""
    if TMA:
        tl.static_assert(UNITS == 1, "TMA loads walk one unit per step")
        t = tl.load(LIST + step // CHUNKS)
        lo = tl.load(OFF + t) + (step % CHUNKS) * BLOCK
        rows = lo + tl.arange(0, BLOCK)
        mask = rows < tl.load(OFF + t + 1)
        r0 = (base + lo).to(tl.int32)
        a = A.load([r0, h, 0]).reshape(BLOCK, HEAD_D)
        b = B.load([r0, h, 0]).reshape(BLOCK, HEAD_D)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    else:
        rows, mask = _unit_rows(LIST, OFF, step, n_units, UNITS, BLOCK, CHUNKS)
        a = _load_rows(A, rows, s_a, offs_d, mask, EVEN, UPCAST)
        b = _load_rows(B, rows, s_b, offs_d, mask, EVEN, UPCAST)
    return rows, mask, a, b


@triton.jit
def _fwd_step(q, acc, m_i, l_i, k, v, mask, qk_scale, EVEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over keys k and values v (columns masked unless EVEN). Scores are
    scaled inside the exponent (one FMA per score) and P @ V accumulates into acc."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if not EVEN:
        s = tl.where(mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = m_new
    if not EVEN:  # a step with every key masked (past a ragged tile's end) must stay finite
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, OUT, OC, GC, GF,
    Q_OFF, KV_OFF, IDX, CNT,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
    H, NQ, SQ, SKV, KMAX, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    M_SPLIT: tl.constexpr, N_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    COMBINE: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr, HAS_CNT: tl.constexpr,
    TMA: tl.constexpr, UNITS: tl.constexpr,
):
    """O = softmax over the listed key tiles. With COMBINE (the whole VSA), also
    OUT = O * G_f + O_c[tile] * G_c, where O_c is the fp32 coarse output per tile [B, NQ, H, D]
    and OUT, O, G_c, G_f are contiguous [B, S, H, D] (strides so_*). TMA: K and V are tensor
    descriptors (`_unit_load`), SKV their tokens per batch."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    qt = pid_m // M_SPLIT
    # Rows of this program: a BLOCK_M chunk of query tile `qt` (M_SPLIT chunks cover the largest tile).
    q_lo = tl.load(Q_OFF + qt) + (pid_m % M_SPLIT) * BLOCK_M
    q_hi = tl.load(Q_OFF + qt + 1)
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_hi
    offs_d = tl.arange(0, HEAD_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, sq_s, offs_d, m_mask, EVEN_M, UPCAST)
    if not TMA:
        K += b * sk_b + h * sk_h
        V += b * sv_b + h * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    LIST = IDX + (pid_bh * NQ + qt) * KMAX
    # Each step takes UNITS (selected key tile, BLOCK_N chunk) units: UNITS * BLOCK_N keys. Steps
    # of full units run without masks; the rest (a short tile, a partial last step) with.
    n_sel = _list_len(CNT, pid_bh * NQ + qt, KMAX, HAS_CNT)
    n_units = n_sel * N_CHUNKS
    n_plain = _plain_units(LIST, KV_OFF, n_sel, N_CHUNKS, BLOCK_N, EVEN_N, TAIL_N) // UNITS
    for step in range(0, n_plain):
        _, mask, k, v = _unit_load(K, V, LIST, KV_OFF, step, n_units, b * SKV, h, sk_s, sv_s, offs_d,
                                   UNITS, BLOCK_N, N_CHUNKS, HEAD_D, True, UPCAST, TMA)
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, k, v, mask, qk_scale, True, DOT_PREC)
    for step in range(n_plain, tl.cdiv(n_units, UNITS)):
        _, mask, k, v = _unit_load(K, V, LIST, KV_OFF, step, n_units, b * SKV, h, sk_s, sv_s, offs_d,
                                   UNITS, BLOCK_N, N_CHUNKS, HEAD_D, False, UPCAST, TMA)
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, k, v, mask, qk_scale, False, DOT_PREC)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
    o_rows = b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :]
    tl.store(O + o_rows, acc.to(O.dtype.element_ty), mask=m_mask[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * SQ + offs_m, lse, mask=m_mask)
    if COMBINE:
        o_c = tl.load(OC + ((b * NQ + qt) * H + h) * HEAD_D + offs_d)[None, :]
        if HAS_GC:
            o_c = o_c * _load_rows(GC + b * so_b + h * so_h, offs_m, so_s, offs_d, m_mask, EVEN_M, True)
        if HAS_GF:
            acc = acc * _load_rows(GF + b * so_b + h * so_h, offs_m, so_s, offs_d, m_mask, EVEN_M, True)
        tl.store(OUT + o_rows, (acc + o_c).to(OUT.dtype.element_ty), mask=m_mask[:, None])


_fwd_kernel = TunedKernel(_fwd_kernel)


@triton.jit
def _dq_step(q, do, lse, delta, dq, k, v, mask, qk_scale, EVEN: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """dQ += dS K over keys k and values v (columns masked unless EVEN)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if not EVEN:
        p = tl.where(mask[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, BIAS,
    Q_OFF, KV_OFF, IDX, CNT,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sd_b, sd_s, sd_h,
    H, NQ, SQ, SKV, KMAX, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    M_SPLIT: tl.constexpr, N_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CNT: tl.constexpr, TMA: tl.constexpr, UNITS: tl.constexpr,
):
    """dQ over the q->k lists. HAS_BIAS adds a per-tile vector BIAS[b, tile, h] (fp32, contiguous
    [B, NQ, H, D]) to every row of the tile: the gradient that reaches q through the tile means.
    TMA as in _fwd_kernel."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    qt = pid_m // M_SPLIT
    q_lo = tl.load(Q_OFF + qt) + (pid_m % M_SPLIT) * BLOCK_M
    q_hi = tl.load(Q_OFF + qt + 1)
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_hi
    offs_d = tl.arange(0, HEAD_D)
    q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, sq_s, offs_d, m_mask, EVEN_M, UPCAST)
    do = _load_rows(DO + b * sd_b + h * sd_h, offs_m, sd_s, offs_d, m_mask, EVEN_M, UPCAST)
    stat = pid_bh.to(tl.int64) * SQ + offs_m
    lse = tl.load(LSE + stat, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + stat, mask=m_mask, other=0.0)
    if not TMA:
        K += b * sk_b + h * sk_h
        V += b * sv_b + h * sv_h

    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    LIST = IDX + (pid_bh * NQ + qt) * KMAX
    n_sel = _list_len(CNT, pid_bh * NQ + qt, KMAX, HAS_CNT)
    n_units = n_sel * N_CHUNKS
    n_plain = _plain_units(LIST, KV_OFF, n_sel, N_CHUNKS, BLOCK_N, EVEN_N, TAIL_N) // UNITS
    for step in range(0, n_plain):
        _, mask, k, v = _unit_load(K, V, LIST, KV_OFF, step, n_units, b * SKV, h, sk_s, sv_s, offs_d,
                                   UNITS, BLOCK_N, N_CHUNKS, HEAD_D, True, UPCAST, TMA)
        dq = _dq_step(q, do, lse, delta, dq, k, v, mask, qk_scale, True, DOT_PREC)
    for step in range(n_plain, tl.cdiv(n_units, UNITS)):
        _, mask, k, v = _unit_load(K, V, LIST, KV_OFF, step, n_units, b * SKV, h, sk_s, sv_s, offs_d,
                                   UNITS, BLOCK_N, N_CHUNKS, HEAD_D, False, UPCAST, TMA)
        dq = _dq_step(q, do, lse, delta, dq, k, v, mask, qk_scale, False, DOT_PREC)
    dq = dq * sm_scale
    if HAS_BIAS:
        dq += tl.load(BIAS + ((b * NQ + qt) * H + h) * HEAD_D + offs_d)[None, :]
    # dQ is contiguous like dO: store with dO's strides.
    tl.store(DQ + b * sd_b + h * sd_h + offs_m[:, None] * sd_s + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_mask[:, None])


_dq_kernel = TunedKernel(_dq_kernel)


@triton.jit
def _dkv_step(k, v, dk, dv, q, do, LSE, DELTA, rows, mask, qk_scale, EVEN: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """dK += dS^T Q and dV += P^T dO over query rows `rows` holding q and do (masked unless EVEN);
    LSE and DELTA point at this head's row statistics."""
    if EVEN:
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    else:
        lse = tl.load(LSE + rows, mask=mask, other=0.0)
        delta = tl.load(DELTA + rows, mask=mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, rows]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if not EVEN:
        p_t = tl.where(mask[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, BIAS_K, BIAS_V,
    Q_OFF, KV_OFF, KIDX, KSTART,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sd_b, sd_s, sd_h, sg_b, sg_s, sg_h,
    H, NK, SQ, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SPLIT: tl.constexpr, M_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, TMA: tl.constexpr, UNITS: tl.constexpr,
):
    """dK, dV over the transposed k->q lists; HAS_BIAS as in _dq_kernel (BIAS_K, BIAS_V: [B, NK, H, D]).
    TMA: Q and DO are tensor descriptors (`_unit_load`)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kt = pid_n // N_SPLIT
    # Rows of this program: a BLOCK_N chunk of key tile `kt`.
    k_lo = tl.load(KV_OFF + kt) + (pid_n % N_SPLIT) * BLOCK_N
    k_hi = tl.load(KV_OFF + kt + 1)
    offs_n = k_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < k_hi
    offs_d = tl.arange(0, HEAD_D)
    k = _load_rows(K + b * sk_b + h * sk_h, offs_n, sk_s, offs_d, n_mask, EVEN_N, UPCAST)
    v = _load_rows(V + b * sv_b + h * sv_h, offs_n, sv_s, offs_d, n_mask, EVEN_N, UPCAST)
    if not TMA:
        Q += b * sq_b + h * sq_h
        DO += b * sd_b + h * sd_h
    LSE += pid_bh.to(tl.int64) * SQ
    DELTA += pid_bh.to(tl.int64) * SQ

    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    # This key tile's list: KIDX[KSTART[g] : KSTART[g + 1]] with g = b*h*NK + kt (CSR layout),
    # walked in q order (ascending), UNITS (query tile, BLOCK_M chunk) units per step.
    list_base = tl.load(KSTART + pid_bh * NK + kt)
    LIST = KIDX + list_base
    n_sel = tl.load(KSTART + pid_bh * NK + kt + 1) - list_base
    n_units = n_sel * M_CHUNKS
    n_plain = _plain_units(LIST, Q_OFF, n_sel, M_CHUNKS, BLOCK_M, EVEN_M, TAIL_M) // UNITS
    for step in range(0, n_plain):
        rows, mask, q, do = _unit_load(Q, DO, LIST, Q_OFF, step, n_units, b * SQ, h, sq_s, sd_s,
                                       offs_d, UNITS, BLOCK_M, M_CHUNKS, HEAD_D, True, UPCAST, TMA)
        dk, dv = _dkv_step(k, v, dk, dv, q, do, LSE, DELTA, rows, mask, qk_scale, True, DOT_PREC)
    for step in range(n_plain, tl.cdiv(n_units, UNITS)):
        rows, mask, q, do = _unit_load(Q, DO, LIST, Q_OFF, step, n_units, b * SQ, h, sq_s, sd_s,
                                       offs_d, UNITS, BLOCK_M, M_CHUNKS, HEAD_D, False, UPCAST, TMA)
        dk, dv = _dkv_step(k, v, dk, dv, q, do, LSE, DELTA, rows, mask, qk_scale, False, DOT_PREC)
    dk = dk * sm_scale
    if HAS_BIAS:
        tile_row = ((b * NK + kt) * H + h) * HEAD_D + offs_d
        dk += tl.load(BIAS_K + tile_row)[None, :]
        dv += tl.load(BIAS_V + tile_row)[None, :]
    # dK and dV are contiguous [B, Skv, H, D]: both use the strides (sg_b, sg_s, sg_h).
    g_ptr = b * sg_b + h * sg_h + offs_n[:, None] * sg_s + offs_d[None, :]
    tl.store(DK + g_ptr, dk.to(DK.dtype.element_ty), mask=n_mask[:, None])
    tl.store(DV + g_ptr, dv.to(DV.dtype.element_ty), mask=n_mask[:, None])


_dkv_kernel = TunedKernel(_dkv_kernel)


@triton.jit
def _delta_kernel(O, DO, DELTA, so_b, so_s, so_h, sd_b, sd_s, sd_h, H, S,
                  HEAD_D: tl.constexpr, BLOCK: tl.constexpr):
    """DELTA[b, h, s] = sum_d O[b, s, h, d] * dO[b, s, h, d] in fp32: the softmax backward's row
    correction (= sum_j P_sj dP_sj), one pass over O and dO."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    offs_d = tl.arange(0, HEAD_D)
    o = _load_rows(O + b * so_b + h * so_h, offs, so_s, offs_d, mask, False, True)
    do = _load_rows(DO + b * sd_b + h * sd_h, offs, sd_s, offs_d, mask, False, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs, tl.sum(o * do, 1), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------------


def _block(tile: int, cap: int) -> int:
    """Rows of a block over tiles of up to `tile` tokens: the tile rounded up to a power of two,
    at least 16 (tl.dot), at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(tile)))


def _blocks(max_q_tile: int, max_kv_tile: int, kernel: str, options: KernelOptions) -> tuple[int, int]:
    """(BLOCK_M query rows, BLOCK_N key rows) of `kernel` ("fwd", "dq" or "dkv") under the row caps
    of `options` (rows per program, rows per walked unit). The forward's default takes up to 128
    query rows (a tile of >= 128 tokens shares one key list, so 128 rows per program halve the K/V
    loads per FLOP, as FlexAttention's 128-row blocks do) and 64-key units; the backward kernels
    keep 64 rows (128 rows per program AND per unit spilled registers). Measured in
    docs/history/kernel_notes.md (v6) and docs/results/blocks_h100.json."""
    if kernel == "fwd":
        return _block(max_q_tile, options.fwd_blocks[0]), _block(max_kv_tile, options.fwd_blocks[1])
    if kernel == "dq":
        return _block(max_q_tile, options.dq_blocks[0]), _block(max_kv_tile, options.dq_blocks[1])
    if kernel == "dkv":
        return _block(max_q_tile, options.dkv_blocks[1]), _block(max_kv_tile, options.dkv_blocks[0])
    raise ValueError(f"unknown kernel {kernel!r}")


@functools.cache
def _has_tma(device_index: int) -> bool:
    """Compute capability >= 9 (asked once per device: this is on every launch's path)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _use_tma(x: torch.Tensor, options: KernelOptions) -> bool:
    """Whether to load the walked tiles (K/V in the forward and dQ, Q/dO in dK/dV) through TMA
    tensor descriptors (one copy instruction per tile instead of per-thread address arithmetic):
    `options.tma`, or by default on GPUs of compute capability >= 9, never in the interpreter."""
    if options.tma is not None:
        return options.tma
    return not interpreting() and x.is_cuda and _has_tma(x.device.index)


def _tma_pair(a: torch.Tensor, b: torch.Tensor, block_rows: int, options: KernelOptions):
    """Tensor descriptors over a and b [B, S, H, D], each seen as [B * S, H, D] with
    [block_rows, 1, D] blocks, or None (use pointer loads) when TMA is off or a layout does not
    allow it: the batch stride must be S times the token stride (contiguous, or views of a packed
    qkv), the last stride 1, the other strides and the base 16-byte aligned."""
    if not _use_tma(a, options):
        return None
    descs = []
    for x in (a, b):
        B, S, H, D = x.shape
        size = x.element_size()
        if (x.stride(3) != 1 or (B > 1 and x.stride(0) != S * x.stride(1)) or x.data_ptr() % 16
                or (x.stride(1) * size) % 16 or (x.stride(2) * size) % 16 or B * S >= 2 ** 31):
            return None
        descs.append(TensorDescriptor(x, shape=[B * S, H, D], strides=[x.stride(1), x.stride(2), 1],
                                      block_shape=[block_rows, 1, D]))
    return descs


def _launch_cfg(q: torch.Tensor, max_q_tile: int, max_kv_tile: int, block_m: int, block_n: int,
                q_fill: TileFill, kv_fill: TileFill, kv_lists_sorted: bool) -> dict:
    """Compile-time options. The interpreter upcasts bf16 (its bf16 arithmetic is wrong); fp32
    inputs get exact fp32 dots (not tf32). EVEN_* drop the row masks when every tile fills its
    blocks exactly; TAIL_* drop them for all but the last tile when only the last tile may be short
    (Z-order groups) and the walked lists ascend (the k->q lists always do; the q->k lists when
    `kv_lists_sorted`), so the short tile can only come last."""
    m_fits, n_fits = max_q_tile % block_m == 0, max_kv_tile % block_n == 0
    return dict(
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        EVEN_M=q_fill == TileFill.FULL and m_fits,
        EVEN_N=kv_fill == TileFill.FULL and n_fits,
        TAIL_M=q_fill == TileFill.FULL_BUT_LAST and m_fits,
        TAIL_N=kv_fill == TileFill.FULL_BUT_LAST and n_fits and kv_lists_sorted,
    )

def bsa_forward(q, k, v, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile, max_kv_tile,
                q_fill=TileFill.RAGGED, kv_fill=TileFill.RAGGED, lists_sorted=False, o_c=None,
                gate_c=None, gate_f=None, options: KernelOptions | None = None):
    """Launch the forward kernel. Returns O [B, Sq, H, D] (q's dtype), LSE2 [B, H, Sq] fp32 and
    OUT: O itself, or with `o_c` (fp32 [B, n_q_tiles, H, D]) the gated combine
    O * gate_f + o_c[tile] * gate_c (gates None = 1, else contiguous [B, Sq, H, D]).
    `q_fill`/`kv_fill`: a `TileFill` (`TileLayout.fill`); `lists_sorted`: every q->k list ascends
    (lets FULL_BUT_LAST key layouts skip masks, see `_launch_cfg`). `q2k_cnt` None: every list
    holds all `q2k_idx.shape[-1]` entries (no count tensor needed). `options`: the kernel options
    (default: those in force, `current_kernel_options()`)."""
    options = options or current_kernel_options()
    if options.gluon_fwd and gluon_hopper.why_not(q, k, v, q_offsets, kv_offsets, max_q_tile, max_kv_tile,
                                                (gate_c, gate_f)) is None:
        return gluon_hopper.forward(q, k, v, kv_offsets, q2k_idx, q2k_cnt, o_c, gate_c, gate_f,
                                    options.gluon_stages, options.gluon_overlap)
    B, Sq, H, D = q.shape
    n_q = q_offsets.numel() - 1
    block_m, block_n = _blocks(max_q_tile, max_kv_tile, "fwd", options)
    m_split = math.ceil(max_q_tile / block_m)
    o = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    combine = o_c is not None
    out = torch.empty_like(o) if combine else o
    grid = (n_q * m_split, B * H)
    descs = _tma_pair(k, v, block_n, options)
    k_in, v_in = descs or (k, v)
    _fwd_kernel.launcher(options)[grid](
        q, k_in, v_in, o, lse, out, o_c if combine else o, q if gate_c is None else gate_c,
        q if gate_f is None else gate_f, q_offsets, kv_offsets, q2k_idx,
        q2k_idx if q2k_cnt is None else q2k_cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, n_q, Sq, k.shape[1], q2k_idx.shape[-1], D ** -0.5 * LOG2E,
        HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n, M_SPLIT=m_split,
        N_CHUNKS=math.ceil(max_kv_tile / block_n),
        COMBINE=combine, HAS_GC=gate_c is not None, HAS_GF=gate_f is not None,
        HAS_CNT=q2k_cnt is not None, TMA=descs is not None,
        **_launch_cfg(q, max_q_tile, max_kv_tile, block_m, block_n, q_fill, kv_fill, lists_sorted),
        **_interpreter_options(options, descs is not None),
    )
    return o, lse, out


@triton.jit
def _transpose_lists_kernel(SEL, K2Q, START, NQ, NK, s_sel, BLOCK_Q: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """For BLOCK_K key tiles of one (b, h): walk the query tiles in order, BLOCK_Q at a time, and
    append each one that selected the key tile to the key tile's list (its place: the list start
    plus the hits before it). SEL: uint8 [BH, NQ, s_sel] (columns < NK used); K2Q: int32 flat
    lists; START: int32 [BH * NK + 1] list starts."""
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < NK
    pos = tl.load(START + bh * NK + offs_k, mask=k_mask, other=0)
    SEL += bh.to(tl.int64) * NQ * s_sel
    for q0 in range(0, NQ, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        ok = (offs_q < NQ)[:, None] & k_mask[None, :]
        hit = tl.load(SEL + offs_q[:, None] * s_sel + offs_k[None, :], mask=ok, other=0).to(tl.int32)
        before = tl.cumsum(hit, 0) - hit  # hits above in this block, per key tile
        tl.store(K2Q + pos[None, :] + before, tl.broadcast_to(offs_q[:, None], [BLOCK_Q, BLOCK_K]),
                 mask=hit != 0)
        pos += tl.sum(hit, 0)


def transpose_block_lists(q2k_idx: torch.Tensor, q2k_cnt: torch.Tensor | None, n_kv_tiles: int):
    """k->q lists from q->k lists: for each key tile, the query tiles that selected it, ascending.

    `q2k_cnt` None: every list is full. Returned in CSR form, sized by the true number of entries
    with no host sync: `k2q_start` int32 [B * H * Nk + 1]; the list of key tile j of (b, h) is
    `k2q_idx[k2q_start[g]:k2q_start[g + 1]]` with g = (b * H + h) * Nk + j. Deterministic: each list
    is written by one program walking the query tiles in order (no atomics).
    """
    B, H, n_q, kmax = q2k_idx.shape
    dev = q2k_idx.device
    if q2k_cnt is None:  # every list full
        target = q2k_idx.long()
    else:  # unused list slots scatter into an extra column that is dropped
        listed = torch.arange(kmax, device=dev) < q2k_cnt[..., None]
        target = torch.where(listed, q2k_idx.long(), n_kv_tiles)
    sel = torch.zeros((B, H, n_q, n_kv_tiles + 1), dtype=torch.uint8, device=dev)
    sel.scatter_(3, target, 1)  # the extra column is skipped by the kernel (no copy without it)
    k2q_start = torch.zeros(B * H * n_kv_tiles + 1, dtype=torch.int32, device=dev)
    torch.cumsum(sel[..., :n_kv_tiles].sum(2, dtype=torch.int32).flatten(), 0, out=k2q_start[1:])
    # Room for every listed entry (the exact total would need a host sync; unused slack is small).
    k2q_idx = torch.empty(B * H * n_q * kmax, dtype=torch.int32, device=dev)
    block_k = 128
    _transpose_lists_kernel[(triton.cdiv(n_kv_tiles, block_k), B * H)](
        sel, k2q_idx, k2q_start, n_q, n_kv_tiles, n_kv_tiles + 1, BLOCK_Q=32, BLOCK_K=block_k)
    return k2q_idx, k2q_start


def bsa_backward(do, q, k, v, o, lse, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile,
                 max_kv_tile, q_fill=TileFill.RAGGED, kv_fill=TileFill.RAGGED, lists_sorted=False,
                 bias=None, delta=None, options: KernelOptions | None = None):
    """Launch the backward kernels. Returns dQ, dK, dV in the inputs' dtype, [B, S, H, D].

    `q_fill`, `kv_fill`, `lists_sorted`, `q2k_cnt` (None: full lists): as in `bsa_forward`.
    `bias`: None or per-tile fp32 gradients (for q, k, v; each contiguous [B, n_tiles, H, D]) added
    to every token of the tile, e.g. what reaches q, k, v through VSA's tile means.
    `delta`: None, or rowsum(dO * O) already computed by the caller (fp32 contiguous [B, H, Sq]).
    `options`: the kernel options (default: those in force, `current_kernel_options()`)."""
    options = options or current_kernel_options()
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    n_q, n_kv = q_offsets.numel() - 1, kv_offsets.numel() - 1
    do = do.contiguous()
    if delta is None:
        delta = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
        _delta_kernel[(triton.cdiv(Sq, 64), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
            do.stride(2), H, Sq, HEAD_D=D, BLOCK=64,
        )
    if options.gluon_bwd and gluon_hopper.why_not(q, k, v, q_offsets, kv_offsets, max_q_tile, max_kv_tile,
                                                   do=do) is None:
        k2q_idx, k2q_start = transpose_block_lists(q2k_idx, q2k_cnt, n_kv)
        return gluon_hopper.backward(do, q, k, v, lse, delta, q_offsets, kv_offsets, q2k_idx, q2k_cnt, k2q_idx,
                                     k2q_start, bias, options.gluon_stages)
    scale = D ** -0.5
    dq = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Skv, H, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Skv, H, D), device=q.device, dtype=v.dtype)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    # dQ, dK, dV are contiguous; the kernels store dQ with dO's strides and dK/dV with dK's.
    has_bias = bias is not None
    bias_q, bias_k, bias_v = bias if has_bias else (lse, lse, lse)

    def cfg(kernel):
        block_m, block_n = _blocks(max_q_tile, max_kv_tile, kernel, options)
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, **_launch_cfg(
            q, max_q_tile, max_kv_tile, block_m, block_n, q_fill, kv_fill, lists_sorted))

    c = cfg("dq")
    m_split, n_chunks = math.ceil(max_q_tile / c["BLOCK_M"]), math.ceil(max_kv_tile / c["BLOCK_N"])
    descs = _tma_pair(k, v, c["BLOCK_N"], options)
    k_in, v_in = descs or (k, v)
    _dq_kernel.launcher(options)[(n_q * m_split, B * H)](
        q, k_in, v_in, do, dq, lse, delta, bias_q, q_offsets, kv_offsets, q2k_idx,
        q2k_idx if q2k_cnt is None else q2k_cnt,
        *strides, H, n_q, Sq, Skv, q2k_idx.shape[-1], scale * LOG2E, scale,
        HEAD_D=D, M_SPLIT=m_split, N_CHUNKS=n_chunks, HAS_BIAS=has_bias,
        HAS_CNT=q2k_cnt is not None, TMA=descs is not None, **c,
        **_interpreter_options(options, descs is not None),
    )
    k2q_idx, k2q_start = transpose_block_lists(q2k_idx, q2k_cnt, n_kv)
    c = cfg("dkv")
    n_split, m_chunks = math.ceil(max_kv_tile / c["BLOCK_N"]), math.ceil(max_q_tile / c["BLOCK_M"])
    descs = _tma_pair(q, do, c["BLOCK_M"], options)
    q_in, do_in = descs or (q, do)
    _dkv_kernel.launcher(options)[(n_kv * n_split, B * H)](
        q_in, k, v, do_in, dk, dv, lse, delta, bias_k, bias_v,
        q_offsets, kv_offsets, k2q_idx, k2q_start,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), H, n_kv, Sq, scale * LOG2E, scale,
        HEAD_D=D, N_SPLIT=n_split, M_CHUNKS=m_chunks, HAS_BIAS=has_bias, TMA=descs is not None,
        **c, **_interpreter_options(options, descs is not None),
    )
    return dq, dk, dv
