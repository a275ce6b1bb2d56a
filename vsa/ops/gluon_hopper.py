"""The fine stage on Hopper, forward and backward, written in Gluon (`triton.experimental.gluon`):
warp specialisation, TMA and wgmma, which Triton's own compiler does not give our loop.

Three kernels, one program per (tile, b*h), two kinds of warps each:
  _fwd_ws_kernel  per query tile: O, the base-2 log-sum-exp, and the gated combine (OUT);
  _dq_ws_kernel   per query tile: dQ over its q->k list;
  _dkv_ws_kernel  per key tile: dK and dV over its transposed k->q list.
  producer   one warp (`_producer`): TMA-loads the program's own tile(s) once (Q; Q and dO; K and
             V), then the two tiles of each list entry (K and V; Q and dO) into a ring of STAGES
             shared-memory buffers, each guarded by a "ready" and an "empty" mbarrier;
  consumer   one warpgroup (4 warps, the default partition): the products on wgmma (the walked tile
             transposed in shared memory where a product needs it; P, dS and their transposes from
             registers), the softmax or its backward in fp32 registers; it frees each buffer for
             the producer.
Two programs fit on an SM (shared memory: own tiles + STAGES x 2 walked tiles, `stages`; registers:
`maxnreg`, 232 per consumer thread and 24 per producer thread after the partitions' reallocation),
so one's softmax overlaps the other's matrix products, as FlashAttention-3's ping-pong does within
one program; `gluon_overlap` also overlaps them inside the forward's warpgroup.

They cover the shapes the VSA layers run: bf16 or fp16, D 64 or 128, every query and key tile
exactly 64 tokens (`TileFill.FULL` cubes), tensors whose (H, D) part is contiguous, with or without
count tensors, the gated combine and the tile means' bias. `why_not()` says what a call lacks;
everything else (and every other GPU, and the CPU interpreter) runs `block_sparse.py`'s kernels.
`forward` and `backward` return what `block_sparse.bsa_forward` / `bsa_backward` return.

Status (docs/history/kernel_notes.md, "Gluon"): compiled for sm_90a on a machine without a GPU
(`scripts/compile_gluon.py`, tests/test_gluon.py); not yet run on a GPU (`scripts/check_gluon.py`,
tests/test_ops_gpu.py -k gluon). Off unless `KernelOptions.gluon_fwd` / `gluon_bwd` are set.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton >= 3.5 ships Gluon; older ones (and builds without NVIDIA support) do not
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    # The TMA load's name: async_copy_global_to_shared in Triton 3.5-3.6 (the GPU machines' 3.6),
    # async_load from Triton 3.7 on (the old name raises there).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON = False

TILE = 64                   # tokens per query and key tile this kernel takes
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
CONSUMER_WARPS = 4          # one warpgroup
PRODUCER_REGS = 24          # the minimum a warp can be given
MAX_REGS = 128              # per thread, the whole program (8 warps after rounding): 2 programs per SM


if GLUON:

    @gluon.jit
    def _producer(own_a_desc, own_b_desc, a_desc, b_desc, a_own, b_own, a_bufs, b_bufs, own_bar, ready, empty,
                  LIST, OFF, n_sel, own_row, walk_row, col, N_OWN: gl.constexpr, STAGES: gl.constexpr):
        """TMA loads: the program's own tile(s) at row own_row once (N_OWN 1: own_a_desc's into
        a_own; 2: also own_b_desc's into b_own), then for each entry j of the walked list the tiles
        of a_desc and b_desc at row walk_row + OFF[LIST[j]] into buffer j % STAGES, once the
        consumer has freed it."""
        if N_OWN == 1:
            mbarrier.expect(own_bar, own_a_desc.block_type.nbytes)
            _tma_load(own_a_desc, [own_row, col], own_bar, a_own)
        else:
            mbarrier.expect(own_bar, own_a_desc.block_type.nbytes + own_b_desc.block_type.nbytes)
            _tma_load(own_a_desc, [own_row, col], own_bar, a_own)
            _tma_load(own_b_desc, [own_row, col], own_bar, b_own)
        for j in range(n_sel):
            stage = j % STAGES
            # A new mbarrier counts as having completed the phase before phase 0: the first
            # STAGES waits pass at once.
            mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1)
            row = walk_row + gl.load(OFF + gl.load(LIST + j))
            bar = ready.index(stage)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [row, col], bar, a_bufs.index(stage))
            _tma_load(b_desc, [row, col], bar, b_bufs.index(stage))

    @gluon.constexpr_function
    def _mma_layout(n):
        """The wgmma accumulator layout of one warpgroup over [64, n] (instructions m64 n k16)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _softmax_step(s, m_i, l_i, acc, qk_scale, row_o: gl.constexpr):
        """One online-softmax step on scores s (raw Q K^T): (P, new max, new sum, acc rescaled)."""
        # Full tiles: no masks, so the row max is finite from the first tile on.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        return p, m_new, l_i, acc

    @gluon.jit
    def _fwd_consumer(q_smem, k_bufs, v_bufs, own_bar, ready, empty, n_sel, qk_scale, HEAD_D: gl.constexpr,
                      BLOCK: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
        """The online softmax over the listed key tiles; returns (unnormalised O, row max, row sum),
        the max and sum in log2 units (scores scaled by softmax_scale * log2(e)).

        OVERLAP (FlashAttention-3's intra-warpgroup pipelining): the next tile's S = Q K^T is issued
        before this tile's softmax, so the tensor cores work while the softmax runs; the last step
        recomputes its own S instead (one extra product per program, no branch around the async
        product)."""
        s_layout: gl.constexpr = _mma_layout(BLOCK)
        o_layout: gl.constexpr = _mma_layout(HEAD_D)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK], gl.float32, row_s)
        acc = gl.zeros([BLOCK, HEAD_D], gl.float32, o_layout)
        s_init = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
        mbarrier.wait(own_bar, 0)
        if OVERLAP:
            # S of the first tile (none listed: nothing waited for, the product's result unused).
            mbarrier.wait(ready.index(0), 0, pred=n_sel > 0)
            s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            for j in range(n_sel):
                stage = j % STAGES
                j_next = gl.minimum(j + 1, n_sel - 1)
                mbarrier.wait(ready.index(j_next % STAGES), (j_next // STAGES) & 1)
                s_next = warpgroup_mma(q_smem, k_bufs.index(j_next % STAGES).permute((1, 0)), s_init,
                                       use_acc=False, is_async=True)
                p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale, row_o)
                acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_bufs.index(stage), acc,
                                    is_async=True)
                s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, acc))
                mbarrier.arrive(empty.index(stage), count=1)
        else:
            for j in range(n_sel):
                stage = j % STAGES
                mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
                s = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), s_init, use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale, row_o)
                acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_bufs.index(stage), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(stage), count=1)
        return acc, m_i, l_i

    @gluon.jit
    def _dq_consumer(q_smem, do_smem, k_bufs, v_bufs, own_bar, ready, empty, n_sel, lse, delta, qk_scale,
                     HEAD_D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
        """dQ / softmax_scale = sum over the listed key tiles of dS K, dS = P (dO V^T - delta)."""
        s_layout: gl.constexpr = _mma_layout(BLOCK)
        g_layout: gl.constexpr = _mma_layout(HEAD_D)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
        dq = gl.zeros([BLOCK, HEAD_D], gl.float32, g_layout)
        s_init = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
        lse = gl.expand_dims(lse, 1)
        delta = gl.expand_dims(delta, 1)
        mbarrier.wait(own_bar, 0)
        for j in range(n_sel):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            k = k_bufs.index(stage)
            s = warpgroup_mma(q_smem, k.permute((1, 0)), s_init, use_acc=False, is_async=True)
            dp = warpgroup_mma(do_smem, v_bufs.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
            p = gl.exp2(s * qk_scale - lse)
            ds = gl.convert_layout((p * (dp - delta)).to(q_smem.dtype), op_layout)
            dq = warpgroup_mma(ds, k, dq, is_async=True)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
            mbarrier.arrive(empty.index(stage), count=1)
        return (dq,)  # a tuple: warp_specialize's default partition returns one

    @gluon.jit
    def _dkv_consumer(k_smem, v_smem, q_bufs, do_bufs, own_bar, ready, empty, n_sel, LIST, Q_OFF, LSE, DELTA,
                      qk_scale, HEAD_D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
        """dK / softmax_scale = sum of dS^T Q and dV = sum of P^T dO over the query tiles that list
        this key tile (LSE, DELTA: this head's row statistics)."""
        s_layout: gl.constexpr = _mma_layout(BLOCK)
        g_layout: gl.constexpr = _mma_layout(HEAD_D)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
        cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        dk = gl.zeros([BLOCK, HEAD_D], gl.float32, g_layout)
        dv = gl.zeros([BLOCK, HEAD_D], gl.float32, g_layout)
        s_init = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
        mbarrier.wait(own_bar, 0)
        for j in range(n_sel):
            stage = j % STAGES
            rows = gl.load(Q_OFF + gl.load(LIST + j)) + gl.arange(0, BLOCK, layout=cols)
            lse = gl.expand_dims(gl.load(LSE + rows), 0)
            delta = gl.expand_dims(gl.load(DELTA + rows), 0)
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            q = q_bufs.index(stage)
            do = do_bufs.index(stage)
            s_t = warpgroup_mma(k_smem, q.permute((1, 0)), s_init, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_smem, do.permute((1, 0)), s_init, use_acc=False, is_async=True)
            s_t, dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, dp_t))
            p_t = gl.exp2(s_t * qk_scale - lse)
            ds_t = gl.convert_layout((p_t * (dp_t - delta)).to(k_smem.dtype), op_layout)
            p_t = gl.convert_layout(p_t.to(k_smem.dtype), op_layout)
            # One product at a time: both in flight hold two operand sets and spill at D 128.
            dv = warpgroup_mma(p_t, do, dv, is_async=True)
            dv = warpgroup_mma_wait(num_outstanding=0, deps=(dv,))
            dk = warpgroup_mma(ds_t, q, dk, is_async=True)
            dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk,))
            mbarrier.arrive(empty.index(stage), count=1)
        return dk, dv

    @gluon.jit
    def _tile_program(H):
        """For one program per (tile, b*h): the tile, pid_bh, b (int64) and h."""
        pid_bh = gl.program_id(1)
        return gl.program_id(0), pid_bh, (pid_bh // H).to(gl.int64), pid_bh % H

    @gluon.jit
    def _q2k_list(IDX, CNT, list_row, KMAX, HAS_CNT: gl.constexpr):
        """(length, pointer) of q->k list `list_row`: CNT[list_row] entries (KMAX without counts)."""
        if HAS_CNT:
            n_sel = gl.load(CNT + list_row)
        else:
            n_sel = KMAX + list_row * 0
        return n_sel, IDX + list_row.to(gl.int64) * KMAX

    @gluon.jit
    def _buffers(a_desc, N_OWN: gl.constexpr, STAGES: gl.constexpr):
        """Shared memory and mbarriers of a program: N_OWN own tiles (1: the second is the first),
        STAGES x two walked tiles, all of a_desc's block (every descriptor has the same)."""
        dtype: gl.constexpr = a_desc.dtype
        a_own = gl.allocate_shared_memory(dtype, a_desc.block_type.shape, a_desc.layout)
        if N_OWN == 2:
            b_own = gl.allocate_shared_memory(dtype, a_desc.block_type.shape, a_desc.layout)
        else:
            b_own = a_own
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        own_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(own_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        return a_own, b_own, a_bufs, b_bufs, own_bar, ready, empty

    @gluon.jit
    def _release(own_bar, ready, empty, STAGES: gl.constexpr):
        mbarrier.invalidate(own_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))

    @gluon.jit
    def _fwd_ws_kernel(q_desc, k_desc, v_desc, O, LSE, OUT, OC, GC, GF, KV_OFF, IDX, CNT,
                       so_b, so_s, so_h, H, NQ, SQ, SKV, KMAX, qk_scale,
                       HEAD_D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                       COMBINE: gl.constexpr, HAS_GC: gl.constexpr, HAS_GF: gl.constexpr,
                       HAS_CNT: gl.constexpr, OVERLAP: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """O (and OUT) of query tile program_id(0) of head program_id(1) = b * H + h."""
        qt, pid_bh, b, h = _tile_program(H)
        n_sel, LIST = _q2k_list(IDX, CNT, pid_bh * NQ + qt, KMAX, HAS_CNT)
        q_smem, _unused, k_bufs, v_bufs, own_bar, ready, empty = _buffers(q_desc, 1, STAGES)
        acc, m_i, l_i = gl.warp_specialize([
            (_fwd_consumer, (q_smem, k_bufs, v_bufs, own_bar, ready, empty, n_sel, qk_scale, HEAD_D, BLOCK,
                             STAGES, OVERLAP)),
            (_producer, (q_desc, q_desc, k_desc, v_desc, q_smem, q_smem, k_bufs, v_bufs, own_bar, ready, empty,
                         LIST, KV_OFF, n_sel, (b * SQ + qt * BLOCK).to(gl.int32), (b * SKV).to(gl.int32),
                         h * HEAD_D, 1, STAGES)),
        ], [1], [PRODUCER_REGS])
        _release(own_bar, ready, empty, STAGES)

        # Normalise; an empty list gives O = 0 and LSE = -inf (as block_sparse.py's kernel).
        o_layout: gl.constexpr = acc.type.layout
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        has_keys = l_i > 0.0
        l_safe = gl.where(has_keys, l_i, 1.0)
        lse = gl.where(has_keys, m_i + gl.log2(l_safe), float("-inf"))
        o = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
        rows = qt * BLOCK + gl.arange(0, BLOCK, layout=row_o)
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        offs = b * so_b + h * so_h + gl.expand_dims(rows.to(gl.int64) * so_s, 1) + gl.expand_dims(cols, 0)
        gl.store(O + offs, o.to(O.dtype.element_ty))
        lse_rows = qt * BLOCK + gl.arange(0, BLOCK, layout=lse.type.layout)
        gl.store(LSE + pid_bh.to(gl.int64) * SQ + lse_rows, lse)
        if COMBINE:
            o_c = gl.expand_dims(gl.load(OC + ((b * NQ + qt) * H + h) * HEAD_D + cols), 0)
            if HAS_GC:
                o_c = o_c * gl.load(GC + offs).to(gl.float32)
            if HAS_GF:
                o = o * gl.load(GF + offs).to(gl.float32)
            gl.store(OUT + offs, (o + o_c).to(OUT.dtype.element_ty))

    @gluon.jit
    def _dq_ws_kernel(q_desc, k_desc, v_desc, do_desc, DQ, LSE, DELTA, BIAS, KV_OFF, IDX, CNT,
                      sd_b, sd_s, sd_h, H, NQ, SQ, SKV, KMAX, qk_scale, sm_scale,
                      HEAD_D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                      HAS_BIAS: gl.constexpr, HAS_CNT: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """dQ of query tile program_id(0) of head program_id(1), walking its q->k list. HAS_BIAS
        adds BIAS[b, tile, h] (fp32 [B, NQ, H, D]) to every row, as block_sparse.py's _dq_kernel."""
        qt, pid_bh, b, h = _tile_program(H)
        n_sel, LIST = _q2k_list(IDX, CNT, pid_bh * NQ + qt, KMAX, HAS_CNT)
        row_s: gl.constexpr = gl.SliceLayout(1, _mma_layout(BLOCK))
        stat = pid_bh.to(gl.int64) * SQ + qt * BLOCK + gl.arange(0, BLOCK, layout=row_s)
        lse = gl.load(LSE + stat)
        delta = gl.load(DELTA + stat)
        q_smem, do_smem, k_bufs, v_bufs, own_bar, ready, empty = _buffers(q_desc, 2, STAGES)
        results = gl.warp_specialize([
            (_dq_consumer, (q_smem, do_smem, k_bufs, v_bufs, own_bar, ready, empty, n_sel, lse, delta, qk_scale,
                            HEAD_D, BLOCK, STAGES)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_bufs, v_bufs, own_bar, ready, empty,
                         LIST, KV_OFF, n_sel, (b * SQ + qt * BLOCK).to(gl.int32), (b * SKV).to(gl.int32),
                         h * HEAD_D, 2, STAGES)),
        ], [1], [PRODUCER_REGS])
        _release(own_bar, ready, empty, STAGES)
        dq = results[0]
        g_layout: gl.constexpr = dq.type.layout
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, g_layout))
        dq = dq * sm_scale
        if HAS_BIAS:
            dq += gl.expand_dims(gl.load(BIAS + ((b * NQ + qt) * H + h) * HEAD_D + cols), 0)
        rows = qt * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, g_layout))
        offs = b * sd_b + h * sd_h + gl.expand_dims(rows.to(gl.int64) * sd_s, 1) + gl.expand_dims(cols, 0)
        gl.store(DQ + offs, dq.to(DQ.dtype.element_ty))  # dQ is contiguous like dO: dO's strides

    @gluon.jit
    def _dkv_ws_kernel(q_desc, k_desc, v_desc, do_desc, DK, DV, LSE, DELTA, BIAS_K, BIAS_V, Q_OFF, KIDX, KSTART,
                       sg_b, sg_s, sg_h, H, NK, SQ, SKV, qk_scale, sm_scale,
                       HEAD_D: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                       HAS_BIAS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """dK, dV of key tile program_id(0) of head program_id(1), walking its k->q list (CSR:
        KIDX[KSTART[g]:KSTART[g + 1]], g = pid_bh * NK + tile; block_sparse.transpose_block_lists)."""
        kt, pid_bh, b, h = _tile_program(H)
        list_base = gl.load(KSTART + pid_bh * NK + kt)
        n_sel = gl.load(KSTART + pid_bh * NK + kt + 1) - list_base
        LIST = KIDX + list_base
        k_smem, v_smem, q_bufs, do_bufs, own_bar, ready, empty = _buffers(k_desc, 2, STAGES)
        dk, dv = gl.warp_specialize([
            (_dkv_consumer, (k_smem, v_smem, q_bufs, do_bufs, own_bar, ready, empty, n_sel, LIST, Q_OFF,
                             LSE + pid_bh.to(gl.int64) * SQ, DELTA + pid_bh.to(gl.int64) * SQ, qk_scale, HEAD_D,
                             BLOCK, STAGES)),
            (_producer, (k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, own_bar, ready, empty,
                         LIST, Q_OFF, n_sel, (b * SKV + kt * BLOCK).to(gl.int32), (b * SQ).to(gl.int32),
                         h * HEAD_D, 2, STAGES)),
        ], [1], [PRODUCER_REGS])
        _release(own_bar, ready, empty, STAGES)
        g_layout: gl.constexpr = dk.type.layout
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, g_layout))
        dk = dk * sm_scale
        if HAS_BIAS:
            tile_row = ((b * NK + kt) * H + h) * HEAD_D + cols
            dk += gl.expand_dims(gl.load(BIAS_K + tile_row), 0)
            dv += gl.expand_dims(gl.load(BIAS_V + tile_row), 0)
        rows = kt * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, g_layout))
        offs = b * sg_b + h * sg_h + gl.expand_dims(rows.to(gl.int64) * sg_s, 1) + gl.expand_dims(cols, 0)
        gl.store(DK + offs, dk.to(DK.dtype.element_ty))  # dK and dV are contiguous: dK's strides
        gl.store(DV + offs, dv.to(DV.dtype.element_ty))


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def stages(head_dim: int, requested: int | None = None) -> int:
    """K/V buffers in flight: `requested` (KernelOptions.gluon_stages), else 3 at D 64 and 2 at
    D 128, so that two programs fit an SM's shared memory (Q + 2 x (K + V) = 80 KB at D 128)."""
    return requested if requested is not None else (3 if head_dim == 64 else 2)


def _two_d(x: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """x [B, S, H, D] as a 2D [B * S, H * D] view for a tensor descriptor (shape, strides), or None
    when its layout does not allow one (TMA: the last stride 1, the others and the base 16-byte
    aligned)."""
    B, S, H, D = x.shape
    if x.stride(3) != 1 or x.stride(2) != D or (B > 1 and x.stride(0) != S * x.stride(1)):
        return None
    if x.data_ptr() % 16 or (x.stride(1) * x.element_size()) % 16 or B * S >= 2 ** 31:
        return None
    return [B * S, H * D], [x.stride(1), 1]


def why_not(q, k, v, q_offsets, kv_offsets, max_q_tile: int, max_kv_tile: int, gates=(), do=None,
            capability: tuple[int, int] | None = None) -> str | None:
    """Why the Gluon kernels do not take this call (None: they do). `gates`: the forward's combine
    gates that are given; `do`: the backward's output gradient; `capability`: the GPU's compute
    capability (default: q's device's)."""
    if not GLUON:
        return "this Triton has no Gluon (triton.experimental.gluon, Triton >= 3.5)"
    if capability is None:
        if not q.is_cuda:
            return "not on a CUDA GPU"
        capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if capability[0] != 9:
        return f"compute capability {capability[0]}.{capability[1]}: the Gluon forward is for Hopper (9.x)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}: the Gluon forward takes bf16 or fp16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the Gluon forward takes {HEAD_DIMS}"
    if max_q_tile != TILE or max_kv_tile != TILE:
        return f"tiles of up to {max_q_tile} / {max_kv_tile} tokens: the Gluon forward takes tiles of {TILE}"
    n_q, n_kv = q_offsets.numel() - 1, kv_offsets.numel() - 1
    if q.shape[1] != n_q * TILE or k.shape[1] != n_kv * TILE:
        return f"ragged tiles: the Gluon forward takes tiles of exactly {TILE} tokens"
    if any(_two_d(x) is None for x in (q, k, v)):
        return "a q, k or v layout TMA cannot describe as [B * S, H * D]"
    if do is not None and (do.shape != q.shape or do.dtype != q.dtype or _two_d(do) is None):
        return "an output gradient unlike q (shape, dtype) or TMA cannot describe"
    if any(g is not None and (not g.is_contiguous() or g.dtype != q.dtype and g.dtype != torch.float32)
           for g in gates):
        return "gate tensors that are not contiguous"
    return None


def _descriptors(*tensors) -> list:
    """TMA descriptors over [B * S, H * D] views of [B, S, H, D] tensors, [64, D] blocks."""
    D = tensors[0].shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([TILE, D], gl.bfloat16 if tensors[0].dtype == torch.bfloat16
                                                  else gl.float16)
    return [GluonTensorDescriptor(x, *_two_d(x), [TILE, D], layout) for x in tensors]


def forward(q, k, v, kv_offsets, q2k_idx, q2k_cnt, o_c=None, gate_c=None, gate_f=None, n_stages=None,
            overlap: bool = False):
    """Launch the Gluon forward (the caller checked `why_not`). Same contract as
    `block_sparse.bsa_forward`: (O [B, Sq, H, D], LSE2 [B, H, Sq] fp32, OUT). `n_stages`: K/V
    buffers in flight (`stages`); `overlap`: issue the next tile's Q K^T before this tile's softmax
    (`_fwd_consumer`)."""
    B, Sq, H, D = q.shape
    n_q = Sq // TILE
    n_stages = stages(D, n_stages)
    if overlap and n_stages < 2:  # the consumer would wait for a load into the buffer it holds
        raise ValueError("the overlapped Gluon forward needs 2 or more stages")
    o = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    combine = o_c is not None
    out = torch.empty_like(o) if combine else o
    _fwd_ws_kernel[(n_q, B * H)](
        *_descriptors(q, k, v), o, lse, out, o_c if combine else o, q if gate_c is None else gate_c,
        q if gate_f is None else gate_f, kv_offsets, q2k_idx, q2k_idx if q2k_cnt is None else q2k_cnt,
        o.stride(0), o.stride(1), o.stride(2), H, n_q, Sq, k.shape[1], q2k_idx.shape[-1],
        D ** -0.5 * 1.4426950408889634,
        HEAD_D=D, BLOCK=TILE, STAGES=n_stages, COMBINE=combine, HAS_GC=gate_c is not None,
        HAS_GF=gate_f is not None, HAS_CNT=q2k_cnt is not None, OVERLAP=overlap, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=CONSUMER_WARPS, maxnreg=MAX_REGS)
    return o, lse, out


def backward(do, q, k, v, lse, delta, q_offsets, kv_offsets, q2k_idx, q2k_cnt, k2q_idx, k2q_start, bias=None,
             n_stages=None):
    """Launch the Gluon dQ and dK/dV kernels (the caller checked `why_not`, `do` included). `lse`
    and `delta` [B, H, Sq] fp32 (the forward's base-2 LSE, rowsum(dO * O)); the k->q lists from
    `block_sparse.transpose_block_lists`; `bias` as in `block_sparse.bsa_backward`. Returns dQ,
    dK, dV [B, S, H, D] in the inputs' dtype."""
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    n_q, n_kv = Sq // TILE, Skv // TILE
    dq = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Skv, H, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Skv, H, D), device=q.device, dtype=v.dtype)
    descs = _descriptors(q, k, v, do)
    has_bias = bias is not None
    bias_q, bias_k, bias_v = bias if has_bias else (lse, lse, lse)
    scale = D ** -0.5
    common = dict(HEAD_D=D, BLOCK=TILE, STAGES=stages(D, n_stages), HAS_BIAS=has_bias, PRODUCER_REGS=PRODUCER_REGS,
                  num_warps=CONSUMER_WARPS, maxnreg=MAX_REGS)
    _dq_ws_kernel[(n_q, B * H)](
        *descs, dq, lse, delta, bias_q, kv_offsets, q2k_idx, q2k_idx if q2k_cnt is None else q2k_cnt,
        do.stride(0), do.stride(1), do.stride(2), H, n_q, Sq, Skv, q2k_idx.shape[-1], scale * 1.4426950408889634,
        scale, HAS_CNT=q2k_cnt is not None, **common)
    _dkv_ws_kernel[(n_kv, B * H)](
        *descs, dk, dv, lse, delta, bias_k, bias_v, q_offsets, k2q_idx, k2q_start, dk.stride(0), dk.stride(1),
        dk.stride(2), H, n_kv, Sq, Skv, scale * 1.4426950408889634, scale, **common)
    return dq, dk, dv
