"""VSA ops against the float64 references: forward and every gradient, Triton kernels (interpreter on
CPU, real kernels on a GPU) and the pure-torch CPU path."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton

from vsa import TileLayout, block_sparse_attention, video_sparse_attention
from vsa.ops import KernelOptions, kernel_options, torch_impl, transpose_block_lists
from vsa.ops.reference import (
    block_sparse_attention_reference,
    block_sparse_attention_reference_grads,
    selection_mask,
    video_sparse_attention_reference,
)

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(x).any(), "NaN in result"
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm().clamp_min(1e-300)).item()


def random_lists(B, H, n_q, n_kv, K, gen, full=False):
    """Distinct random key tiles per query tile, with counts in [1, K] (K when full)."""
    idx = torch.stack([torch.randperm(n_kv, generator=gen)[:K] for _ in range(B * H * n_q)])
    cnt = torch.full((B, H, n_q), K) if full else torch.randint(1, K + 1, (B, H, n_q), generator=gen)
    # Pad unused slots with junk the kernels must ignore.
    idx = idx.view(B, H, n_q, K)
    junk = torch.arange(K) >= cnt[..., None]
    idx = torch.where(junk, torch.full_like(idx, 10**6), idx)
    return idx.int(), cnt.int()


def make_qkv(B, Sq, Skv, H, D, scale, gen):
    """float64 tensors holding fp32-representable values, so every method sees the same inputs."""
    q = torch.randn(B, Sq, H, D, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(B, Skv, H, D, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(B, Skv, H, D, generator=gen, dtype=torch.float64)
    return tuple(x.float().double() for x in (q, k, v))


def check_against_reference(method, reference, inputs, grad_out, dtype, device, names):
    """The method's output and grads vs the float64 reference.

    fp32: the allowed error is 10x the error of the reference itself run in fp32, or the rounding of
    the stored log-sum-exp, whichever is larger, with a floor. Flash-style kernels recompute P in
    the backward as exp2(s - lse); an fp32 lse of magnitude |lse| carries |lse| * 2^-24 absolute
    error, which becomes a relative error of every P in the row. At input scale 30 and D=128 the
    logits reach ~5e3 (log2 units), so this term (~4e-4) dominates; at unit scale it is ~1e-6. A
    real bug (wrong mask, K pre-scaled in low precision) gives errors of 1e-2 to 1.
    fp16/bf16: fixed bounds."""
    ref, ref_grads = run(reference, inputs, torch.float64, "cpu", grad_out)
    out, grads = run(method, inputs, dtype, device, grad_out)
    assert out.dtype == dtype
    if dtype == torch.float32:
        ref32, ref32_grads = run(reference, inputs, torch.float32, "cpu", grad_out)
        q, k = inputs[0], inputs[1]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (math.log2(math.e) / math.sqrt(q.shape[-1]))
        lse_rounding = 8 * 2.0**-24 * logits.abs().max().item()
        bounds = [max(10 * rel_err(a, b), lse_rounding, 2e-6)
                  for a, b in zip([ref32, *ref32_grads], [ref, *ref_grads])]
    else:
        bounds = [TOL[dtype]] + [2 * TOL[dtype]] * len(grads)
    for name, x, r, bound in zip(["out", *("d" + n for n in names)], [out, *grads], [ref, *ref_grads], bounds):
        err = rel_err(x, r)
        assert err < bound, f"{name}: relative error {err:.3g} >= {bound:.3g}"


def run(fn, inputs, dtype, device, grad_out):
    """Forward + backward of fn on copies of inputs cast to dtype/device; returns (out, grads)."""
    xs = [x.detach().to(device=device, dtype=dtype).clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    out.backward(grad_out.to(device=device, dtype=dtype))
    return out.detach(), [x.grad for x in xs]


def check_fine_case(case, seed_text, device):
    """The Triton fine stage on `device` vs the float64 reference for a FINE_CASES-style case, with
    random lists (counts in [1, K]), fp32 inputs; seeded from `seed_text`."""
    grid, kv_grid, tile, B, H, D, K, scale = case
    gen = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    layout, kv_layout = TileLayout(grid, tile), TileLayout(kv_grid or grid, tile)
    q, k, v = make_qkv(B, layout.seq_len, kv_layout.seq_len, H, D, scale, gen)
    idx, cnt = random_lists(B, H, layout.n_tiles, kv_layout.n_tiles, K, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    check_against_reference(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, idx.to(device), cnt.to(device), kv_layout,
                                               impl="triton"),
        lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt, kv_layout),
        (q, k, v), grad_out, torch.float32, device, "qkv")


# grid, kv grid (None = same), tile, B, H, D, K, input scale
FINE_CASES = [
    ((5, 6, 7), None, (4, 4, 4), 2, 3, 64, 3, 1.0),
    ((5, 6, 7), None, (4, 4, 4), 1, 1, 128, 8, 30.0),
    ((3, 9, 4), None, (4, 4, 4), 2, 1, 64, 1, 0.01),
    ((8, 8, 8), None, (4, 4, 4), 1, 3, 128, 4, 16.0),
    ((4, 4, 8), (5, 6, 7), (4, 4, 4), 2, 2, 64, 5, 3.0),  # q and kv of different lengths
    ((4, 8, 12), None, (4, 8, 8), 1, 2, 64, 2, 1.0),  # 256-token tiles: several chunks per tile
    ((3, 5, 6), None, (2, 2, 2), 1, 2, 64, 6, 1.0),  # 8-token tiles, 27 tiles
]


@pytest.mark.parametrize("case", FINE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-t{c[2]}-B{c[3]}H{c[4]}D{c[5]}K{c[6]}s{c[7]}")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_block_sparse_matches_reference(case, impl, kernel_device):
    grid, kv_grid, tile, B, H, D, K, scale = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    layout, kv_layout = TileLayout(grid, tile), TileLayout(kv_grid or grid, tile)
    q, k, v = make_qkv(B, layout.seq_len, kv_layout.seq_len, H, D, scale, gen)
    idx, cnt = random_lists(B, H, layout.n_tiles, kv_layout.n_tiles, K, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    device = kernel_device if impl == "triton" else "cpu"

    check_against_reference(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, idx.to(device), cnt.to(device), kv_layout, impl=impl),
        lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt, kv_layout),
        (q, k, v), grad_out, torch.float32, device, "qkv")


@pytest.mark.parametrize("load", ["tma", "pointer"])
@pytest.mark.parametrize("case", [FINE_CASES[0], FINE_CASES[1], FINE_CASES[4], FINE_CASES[5]],
                         ids=["ragged-B2", "ragged-D128-s30", "q-kv-differ", "256"])
def test_tile_loads_match_reference(case, load, kernel_device):
    """Both ways of loading the walked tiles (`KernelOptions.tma`): TMA tensor descriptors (the
    default on Hopper; forced here, also in the interpreter) and per-row pointer loads (the default
    elsewhere). With TMA the rows past a ragged tile's end hold the next tile's tokens (or zeros
    past the tensor, or the next batch's tokens) and must be masked out, in the forward and in both
    backward kernels."""
    if kernel_device != "cpu" and load == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    with kernel_options(tma=load == "tma"):
        check_fine_case(case, repr((case, load)), kernel_device)


def test_tma_descriptors_need_mergeable_batch_and_token_strides():
    """TMA sees [B, S, H, D] as [B * S, H, D]: contiguous tensors and views of a packed qkv qualify;
    a batch stride that is not S token strides (e.g. [S, B, H, D] transposed) falls back to pointer
    loads, and the op still matches the reference."""
    import vsa.ops.block_sparse as bs

    tma = KernelOptions(tma=True)
    B, S, H, D = 2, 128, 2, 64
    x = torch.randn(B, S, H, D)
    assert bs._tma_pair(x, x, 64, tma) is not None
    packed = torch.randn(B, S, 3, H, D).unbind(2)
    assert bs._tma_pair(packed[1], packed[2], 64, tma) is not None
    seq_first = torch.randn(S, B, H, D).transpose(0, 1)
    assert bs._tma_pair(x, seq_first, 64, tma) is None and bs._tma_pair(seq_first, x, 64, tma) is None
    assert bs._tma_pair(x, x, 64, KernelOptions(tma=False)) is None

    layout = TileLayout((2, 4, 8))
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(B, layout.seq_len, layout.seq_len, H, D, 2.0, gen)
    idx, cnt = random_lists(B, H, layout.n_tiles, layout.n_tiles, 2, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)

    def seq_first_kv(q, k, v):  # same values, [S, B, H, D] memory for k and v
        k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (k, v))
        return block_sparse_attention(q, k, v, layout, idx, cnt, impl="triton")

    with kernel_options(tma=True):
        check_against_reference(
            seq_first_kv, lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt),
            (q, k, v), grad_out, torch.float32, "cpu", "qkv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (on a GPU the autotuner picks)")
@pytest.mark.parametrize("units", [1, 2])
@pytest.mark.parametrize("case", [FINE_CASES[3], FINE_CASES[0], FINE_CASES[5]], ids=["even", "ragged", "chunked"])
def test_units_per_step(case, units):
    """Both loop shapes of the kernels (one tile chunk per step, two per step with a partial last
    step when the count is odd) against the reference."""
    grid, _, tile, B, H, D, K, scale = case
    gen = torch.Generator().manual_seed(units)
    layout = TileLayout(grid, tile)
    q, k, v = make_qkv(B, layout.seq_len, layout.seq_len, H, D, scale, gen)
    K = min(K + 1, layout.n_tiles)  # random counts in [1, K]: odd and even
    idx, cnt = random_lists(B, H, layout.n_tiles, layout.n_tiles, K, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    with kernel_options(interpreter_units=units):
        check_against_reference(
            lambda q, k, v: block_sparse_attention(q, k, v, layout, idx, cnt, impl="triton"),
            lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt),
            (q, k, v), grad_out, torch.float32, "cpu", "qkv")


# (dQ rows per program, key rows per unit), (dK/dV key rows per program, query rows per unit)
BWD_BLOCKS = [((128, 64), (64, 64)), ((64, 64), (128, 32)), ((128, 32), (128, 16))]


@pytest.mark.parametrize("blocks", BWD_BLOCKS, ids=lambda b: "{}x{}-{}x{}".format(*b[0], *b[1]))
@pytest.mark.parametrize("case", [
    ((8, 8, 16), None, (4, 8, 8), 1, 2, 64, 3, 1.0),  # 256-token tiles, all full
    ((5, 10, 13), (6, 9, 11), (4, 8, 8), 2, 1, 128, 4, 8.0),  # ragged, q and kv of different grids
], ids=["full", "ragged"])
def test_backward_block_shapes(case, blocks, kernel_device):
    """Backward kernels with row caps other than the default (more rows per program than per unit
    and the reverse) against the reference: several programs and units per tile."""
    with kernel_options(dq_blocks=blocks[0], dkv_blocks=blocks[1]):
        check_fine_case(case, repr((case, blocks)), kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_low_precision(dtype, kernel_device):
    layout = TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(2, layout.seq_len, layout.seq_len, 2, 64, 4.0, gen)
    idx, cnt = random_lists(2, 2, layout.n_tiles, layout.n_tiles, 4, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    check_against_reference(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, idx.to(kernel_device), cnt.to(kernel_device),
                                               impl="triton"),
        lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt),
        (q, k, v), grad_out, dtype, kernel_device, "qkv")


# grid, B, H, D, topk or sparsity, scale, gates, tile order
VSA_CASES = [
    ((5, 6, 7), 2, 3, 64, dict(topk=3), 1.0, "both", "cubes"),
    ((3, 9, 4), 1, 2, 128, dict(sparsity=0.5), 16.0, "fine_only", "cubes"),
    ((8, 8, 8), 2, 1, 64, dict(topk=1), 0.01, "none", "cubes"),
    ((5, 6, 7), 1, 3, 128, dict(sparsity=0.0), 30.0, "both", "cubes"),
    # Z-order groups: all full but the last (210 tokens = 3 x 64 + 18; 108 = 64 + 44)
    ((5, 6, 7), 2, 2, 64, dict(topk=2), 4.0, "both", "curve"),
    ((3, 9, 4), 1, 3, 128, dict(sparsity=0.5), 0.5, "fine_only", "curve"),
]


@pytest.mark.parametrize("case", VSA_CASES,
                         ids=lambda c: f"{c[0]}-B{c[1]}H{c[2]}D{c[3]}-{c[4]}-s{c[5]}-{c[6]}-{c[7]}")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_video_sparse_attention_matches_reference(case, impl, kernel_device):
    grid, B, H, D, sel, scale, gates, order = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    layout = TileLayout(grid, order=order)
    S = layout.seq_len
    q, k, v = make_qkv(B, S, S, H, D, scale, gen)
    g_c = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    g_f = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    device = kernel_device if impl == "triton" else "cpu"

    def fn(reference, device):
        def f(q, k, v, gc=None, gf=None):
            if reference:
                return video_sparse_attention_reference(q, k, v, layout, gate_c=gc, gate_f=gf, **sel)
            return video_sparse_attention(q, k, v, layout, gate_c=gc, gate_f=gf, impl=impl, **sel)
        return f

    n_inputs = {"both": 5, "fine_only": 4, "none": 3}[gates]
    inputs = (q, k, v, g_c, g_f)[:n_inputs]
    check_against_reference(fn(False, device), fn(True, "cpu"), inputs, grad_out, torch.float32, device,
                            ["q", "k", "v", "gate_c", "gate_f"][:n_inputs])
    _, ref_sel = video_sparse_attention_reference(q, k, v, layout, return_selection=True, **sel)
    assert ref_sel.shape[-1] == min(sel.get("topk", 10**9), math.ceil((1 - sel.get("sparsity", 0)) * layout.n_tiles))


def test_all_tiles_with_zero_coarse_gate_is_dense_attention(kernel_device):
    layout = TileLayout((3, 9, 4))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (x.float().to(kernel_device) for x in make_qkv(2, layout.seq_len, layout.seq_len, 3, 64, 2.0, gen))
    out = video_sparse_attention(q, k, v, layout, sparsity=0.0, gate_c=torch.zeros_like(q), impl="triton")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out, dense) < TOL[torch.float32]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_backward_is_deterministic(impl, kernel_device):
    layout = TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(11)
    device = kernel_device if impl == "triton" else "cpu"
    q, k, v = make_qkv(1, layout.seq_len, layout.seq_len, 2, 64, 1.0, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    results = [run(lambda q, k, v: video_sparse_attention(q, k, v, layout, topk=3, impl=impl),
                   (q, k, v), torch.float32, device, grad_out) for _ in range(2)]
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_q,n_kv,K", [(7, 9, 4), (70, 150, 40)])  # one block; several q and k blocks
def test_transposed_lists(n_q, n_kv, K):
    gen = torch.Generator().manual_seed(5)
    idx, cnt = random_lists(2, 3, n_q, n_kv, K, gen)
    k2q_idx, k2q_start = transpose_block_lists(idx, cnt, n_kv)
    mask = selection_mask(idx, cnt, n_kv)  # [B, H, Nq, Nk]
    assert int(k2q_start[-1]) == int(cnt.sum())  # CSR: exactly the listed entries
    for b in range(2):
        for h in range(3):
            for j in range(n_kv):
                g = (b * 3 + h) * n_kv + j
                expect = torch.nonzero(mask[b, h, :, j]).flatten().tolist()
                assert k2q_idx[k2q_start[g]:k2q_start[g + 1]].tolist() == expect  # ascending
    # No count tensor: every list full, the same as counts of K.
    idx, cnt = random_lists(2, 3, n_q, n_kv, K, gen, full=True)
    (a_idx, a_start), (b_idx, b_start) = (transpose_block_lists(idx, c, n_kv) for c in (None, cnt))
    assert torch.equal(a_start, b_start) and torch.equal(a_idx, b_idx)


def test_torch_path_chunks_agree(monkeypatch):
    layout = TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (x.float() for x in make_qkv(2, layout.seq_len, layout.seq_len, 2, 64, 1.0, gen))
    idx, cnt = random_lists(2, 2, layout.n_tiles, layout.n_tiles, 3, gen)
    whole = block_sparse_attention(q, k, v, layout, idx, cnt, impl="torch")
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 1)  # one query tile per chunk
    chunked = block_sparse_attention(q, k, v, layout, idx, cnt, impl="torch")
    torch.testing.assert_close(whole, chunked)


def test_empty_list_rows_are_zero(kernel_device):
    layout = TileLayout((4, 4, 8))
    q, k, v = (torch.randn(1, layout.seq_len, 1, 64, device=kernel_device) for _ in range(3))
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device=kernel_device)
    cnt = torch.tensor([[[1, 0]]], dtype=torch.int32, device=kernel_device)
    for impl in ("triton", "torch"):
        dev = kernel_device if impl == "triton" else "cpu"
        out = block_sparse_attention(q.to(dev), k.to(dev), v.to(dev), layout, idx.to(dev), cnt.to(dev), impl=impl)
        assert torch.all(out[:, 64:] == 0) and not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------------- bad input
def _qkv(S=64, H=2, D=64, dtype=torch.float32):
    return [torch.randn(1, S, H, D, dtype=dtype) for _ in range(3)]


def test_bad_inputs():
    layout = TileLayout((4, 4, 4))
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="supported head dims"):
        video_sparse_attention(*_qkv(D=96), layout, topk=1)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        video_sparse_attention(q, k, v, layout, sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        video_sparse_attention(q, k, v, layout, sparsity=-0.1)
    with pytest.raises(ValueError, match="exactly one of topk"):
        video_sparse_attention(q, k, v, layout)
    with pytest.raises(ValueError, match="exactly one of topk"):
        video_sparse_attention(q, k, v, layout, topk=1, sparsity=0.5)
    with pytest.raises(ValueError, match="topk must be a positive integer"):
        video_sparse_attention(q, k, v, layout, topk=0)
    with pytest.raises(ValueError, match="4-D tensor"):
        video_sparse_attention(q[0], k, v, layout, topk=1)
    with pytest.raises(TypeError, match="share a dtype"):
        video_sparse_attention(q.half(), k, v, layout, topk=1)
    with pytest.raises(TypeError, match="supported: float16"):
        video_sparse_attention(q.double(), k.double(), v.double(), layout, topk=1)
    with pytest.raises(ValueError, match="has 64"):
        video_sparse_attention(*_qkv(S=65), layout, topk=1)
    with pytest.raises(ValueError, match="gate_c of shape"):
        video_sparse_attention(q, k, v, layout, topk=1, gate_c=torch.ones(1, 64, 3, 64))
    with pytest.raises(ValueError, match="gate_f of shape"):  # more dims than q
        video_sparse_attention(q, k, v, layout, topk=1, gate_f=torch.ones(1, *q.shape))
    scaled = video_sparse_attention(q, k, v, layout, topk=1, gate_c=torch.full((q.shape[2], 1), 0.5))
    torch.testing.assert_close(scaled, video_sparse_attention(q, k, v, layout, topk=1, gate_c=torch.full_like(q, 0.5)))
    with pytest.raises(ValueError, match="impl must be"):
        video_sparse_attention(q, k, v, layout, topk=1, impl="cuda")
    idx, cnt = torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q2k_idx must be"):
        block_sparse_attention(q, k, v, layout, idx[0], cnt)
    with pytest.raises(ValueError, match="key tile indices"):
        block_sparse_attention(q, k, v, layout, idx + 5, cnt)
    with pytest.raises(ValueError, match="q2k_cnt values"):
        block_sparse_attention(q, k, v, layout, idx, cnt + 1)
    with pytest.raises(TypeError, match="integer tensor"):
        block_sparse_attention(q, k, v, layout, idx.float(), cnt)
    with pytest.raises(ValueError, match="kv_layout"):
        block_sparse_attention(q, *_qkv(S=128)[1:], layout, idx, cnt)


def test_chunked_reference_grads_match_autograd_reference():
    layout, kv_layout = TileLayout((4, 4, 8)), TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, layout.seq_len, kv_layout.seq_len, 2, 64, 2.0, gen)
    idx, cnt = random_lists(2, 2, layout.n_tiles, kv_layout.n_tiles, 5, gen)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref, grads = run(lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, idx, cnt, kv_layout),
                     (q, k, v), torch.float64, "cpu", grad_out)
    chunked = block_sparse_attention_reference_grads(q, k, v, layout, idx, cnt, grad_out, kv_layout, chunk=50)
    for a, b in zip(chunked, [ref, *grads]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@triton.jit
def _noop_kernel(X, N):
    pass


def test_benchmark_meta_records_autotuner_picks(monkeypatch):
    """Results files carry the autotuner's pick per fine-stage kernel and key (`run_meta`); kernels
    that are not autotuned (the interpreter launches them directly) are left out."""
    import vsa.benchmark
    import vsa.ops.block_sparse as bs

    config = triton.Config({"UNITS": 1}, num_warps=4, num_stages=1)
    tuner = triton.autotune(configs=[config], key=["N"])(_noop_kernel)
    tuner.cache[(64,)] = config
    dq_kernel = bs.TunedKernel(_noop_kernel)
    dq_kernel.tuners["full"] = tuner
    monkeypatch.setattr(bs, "_dq_kernel", dq_kernel)
    monkeypatch.setattr(bs, "_fwd_kernel", bs.TunedKernel(_noop_kernel))  # not launched yet
    monkeypatch.delenv("VSA_AUTOTUNE", raising=False)
    assert vsa.benchmark.autotuned_configs() == {"_dq_kernel": {"(64,)": str(config)}}
    with kernel_options(autotune="quick"):  # the picks of the search space in force
        assert vsa.benchmark.autotuned_configs() == {}


def test_autotune_search_space_from_options_or_environment(monkeypatch):
    """The autotuner's search space: `KernelOptions.autotune`, else VSA_AUTOTUNE read when the
    options are resolved (not at import): "quick" narrows it to 3 configurations (GPU test runs),
    the default tries 13, a wrong value fails naming the choices, and the benchmark helpers refuse
    the quick space (its timings are not the kernels' speed)."""
    import vsa.benchmark
    import vsa.ops.block_sparse as bs
    from vsa.ops import current_kernel_options

    monkeypatch.delenv("VSA_AUTOTUNE", raising=False)
    assert current_kernel_options().search_space() == "full" and len(bs._configs("full")) == 13
    monkeypatch.setenv("VSA_AUTOTUNE", "quick")
    assert current_kernel_options().search_space() == "quick" and len(bs._configs("quick")) == 3
    with kernel_options(autotune="full"):
        assert current_kernel_options().search_space() == "full"
    monkeypatch.setenv("VSA_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match=r"VSA_AUTOTUNE='fast'.*'quick'"):
        current_kernel_options().search_space()
    with pytest.raises(ValueError, match="autotune must be"):
        KernelOptions(autotune="fast")

    monkeypatch.delenv("VSA_AUTOTUNE")
    with kernel_options(autotune="quick"), pytest.raises(RuntimeError, match="unset it for benchmarks"):
        vsa.benchmark.bench(lambda: torch.zeros(1))


def test_public_helpers_for_backends():
    """What the attention backends and integrations use: the impl check and resolution, the dtype
    check, the unchecked fine stage and VSA's selection alone (torch path: the same as the ops)."""
    from vsa.ops import check_dtypes, check_impl, fine_attention, resolve_impl, select_key_tiles
    from vsa.ops.coarse import coarse_stage

    assert check_impl(None) is None and check_impl("torch") == "torch"
    with pytest.raises(ValueError, match="impl must be None"):
        check_impl("cuda")
    x = torch.zeros(1)
    assert resolve_impl(x) == "torch" and resolve_impl(x, "torch") == "torch"
    with pytest.raises(TypeError, match="must share one of the dtypes"):
        check_dtypes(x, x.double(), x)

    layout = TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (x.float() for x in make_qkv(2, layout.seq_len, layout.seq_len, 2, 64, 2.0, gen))
    idx, cnt = random_lists(2, 2, layout.n_tiles, layout.n_tiles, 3, gen)
    lists = [x.contiguous() for x in (torch.where(idx >= layout.n_tiles, 0, idx), cnt)]
    torch.testing.assert_close(fine_attention(q, k, v, layout, *lists, impl="torch"),
                               block_sparse_attention(q, k, v, layout, idx, cnt, impl="torch"))
    sel_idx, sel_cnt = select_key_tiles(q, k, v, layout, sparsity=0.5, impl="torch")
    K = math.ceil(0.5 * layout.n_tiles)
    assert sel_idx.shape == (2, 2, layout.n_tiles, K) and sel_idx.dtype == torch.int32
    assert torch.equal(sel_idx, coarse_stage(q, k, v, layout, K, False)[1])
    assert torch.equal(sel_cnt, torch.full((2, 2, layout.n_tiles), K, dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens but the layout"):
        select_key_tiles(q[:, :-1], k[:, :-1], v[:, :-1], layout, topk=2)
