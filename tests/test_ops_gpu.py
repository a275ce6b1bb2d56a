"""The kernels on a real GPU in bf16 against the float64 reference (skipped without CUDA)."""

import pytest
import torch

from vsa import TileLayout, block_sparse_attention, video_sparse_attention
from vsa.ops import gluon_hopper, kernel_options
from vsa.ops.block_sparse import bsa_forward
from vsa.ops.reference import (
    block_sparse_attention_reference,
    block_sparse_attention_reference_grads,
    video_sparse_attention_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 kernel checks)"),
]

BF16_TOL = 1e-2  # bf16 has 8 bits of mantissa; expect a few 1e-3


def rel_err(x, ref):
    assert not torch.isnan(x).any(), "NaN in result (unwritten or poisoned element)"
    return ((x.double() - ref).norm() / ref.norm()).item()


def poison_allocator():
    """Fill a block of the caching allocator's free memory with NaN so unwritten outputs (carved
    from it) show as NaN. At most 2 GiB: several pytest-xdist workers share the GPU (half of the
    free memory each left cuBLAS none: CUBLAS_STATUS_ALLOC_FAILED with -n 4)."""
    free = torch.cuda.mem_get_info()[0]
    blob = torch.empty(min(free // 2, 2 << 30) // 4, dtype=torch.float32, device="cuda")
    blob.fill_(float("nan"))
    del blob


def inputs(B, S, H, D, scale, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, S, H, D, device="cuda", generator=gen) * scale for _ in range(2))
    v = torch.randn(B, S, H, D, device="cuda", generator=gen)
    return [x.bfloat16() for x in (q, k, v)]


@pytest.mark.parametrize("grid,B,H,D,scale", [
    ((8, 16, 16), 2, 2, 64, 1.0),
    ((8, 16, 16), 2, 2, 128, 16.0),
    ((5, 30, 52), 1, 2, 128, 1.0),
    ((7, 10, 13), 2, 3, 64, 4.0),
])
def test_fine_stage_bf16(grid, B, H, D, scale):
    layout = TileLayout(grid, device="cuda")
    n = layout.n_tiles
    q, k, v = inputs(B, layout.seq_len, H, D, scale, seed=n + D)
    K = max(1, n // 8)
    idx = torch.rand(B, H, n, n, device="cuda").topk(K, dim=-1).indices.int()
    cnt = torch.randint(1, K + 1, (B, H, n), device="cuda", dtype=torch.int32)
    do = torch.randn_like(q)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    poison_allocator()
    out = block_sparse_attention(qg, kg, vg, layout, idx, cnt)
    out.backward(do)
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx, cnt, do.double())
    errs = [rel_err(x, r) for x, r in zip([out, qg.grad, kg.grad, vg.grad], ref)]
    print(f"\nbf16 fine {grid} B{B} H{H} D{D} scale {scale}: rel err o/dq/dk/dv = "
          + " / ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < BF16_TOL


@pytest.mark.parametrize("grid,D,scale,order", [((8, 16, 16), 64, 1.0, "cubes"), ((5, 14, 18), 128, 8.0, "cubes"),
                                                ((5, 14, 18), 64, 4.0, "curve")])
def test_vsa_bf16(grid, D, scale, order):
    errs = vsa_errors(grid, D, scale, order)
    print(f"\nbf16 VSA {grid} D{D} scale {scale}: rel err o/dq/dk/dv/dgc/dgf = "
          + " / ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < BF16_TOL


def vsa_errors(grid, D, scale, order, **options) -> list[float]:
    """Relative errors of the whole VSA (gated) and its gradients (q, k, v, both gates) against the
    float64 reference, with the kernel `options` in force."""
    layout = TileLayout(grid, device="cuda", order=order)
    q, k, v = inputs(2, layout.seq_len, 2, D, scale, seed=D)
    gates = [torch.randn_like(q) for _ in range(2)]
    do = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    poison_allocator()
    with kernel_options(**options):
        out = video_sparse_attention(*leaves[:3], layout, sparsity=0.75, gate_c=leaves[3], gate_f=leaves[4])
        out.backward(do)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, *gates)]
    ref = video_sparse_attention_reference(*ref_leaves[:3], layout, sparsity=0.75, gate_c=ref_leaves[3],
                                           gate_f=ref_leaves[4])
    ref.backward(do.double())
    return [rel_err(out, ref.detach())] + [rel_err(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not hopper() or not gluon_hopper.GLUON, reason="the Gluon forward needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("D,scale,dtype", [(64, 1.0, torch.bfloat16), (128, 30.0, torch.bfloat16),
                                           (128, 0.01, torch.bfloat16), (64, 4.0, torch.float16)])
@pytest.mark.parametrize("overlap", [False, True])
def test_gluon_forward(D, scale, dtype, overlap):
    """The Gluon kernel against the float64 reference on the same rounded inputs (lists of 0 to K
    tiles, a different selection per head), and against block_sparse.py's kernel: O and LSE."""
    layout = TileLayout((8, 16, 16), device="cuda")  # 32 cubes of 64 tokens
    B, H, n = 2, 3, layout.n_tiles
    q, k, v = (x.to(dtype) for x in inputs(B, layout.seq_len, H, D, scale, seed=D))
    K = 6
    idx = torch.rand(B, H, n, n, device="cuda").topk(K, dim=-1).indices.int()
    cnt = torch.randint(0, K + 1, (B, H, n), device="cuda", dtype=torch.int32)
    args = (q, k, v, layout.offsets, layout.offsets, idx, cnt, layout.max_tile_size, layout.max_tile_size)
    assert gluon_hopper.why_not(*args[:5], *args[7:]) is None
    poison_allocator()
    with kernel_options(gluon_fwd=True, gluon_overlap=overlap):
        o, lse, _ = bsa_forward(*args)
    torch.cuda.synchronize()
    ref = block_sparse_attention_reference(*(x.double() for x in (q, k, v)), layout, idx, cnt)
    err = rel_err(o, ref)
    o_triton, lse_triton, _ = bsa_forward(*args)
    print(f"\ngluon fwd D{D} scale {scale} {dtype} overlap {overlap}: rel err {err:.2e}, vs triton "
          f"{rel_err(o, o_triton.double()):.2e}")
    assert err < BF16_TOL
    empty = (cnt == 0).repeat_interleave(64, dim=2)  # [B, H, S]: rows of an empty list
    assert torch.isneginf(lse[empty]).all() and torch.equal(torch.isneginf(lse), torch.isneginf(lse_triton))
    torch.testing.assert_close(lse[~empty], lse_triton[~empty], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon")
@pytest.mark.parametrize("D,scale", [(64, 1.0), (128, 30.0), (128, 0.01)])
def test_gluon_backward(D, scale):
    """The Gluon dQ and dK/dV kernels (on the Gluon forward's O and LSE) against the float64
    reference's gradients, lists of 0 to K tiles per head; run twice, bit-identical."""
    layout = TileLayout((8, 16, 16), device="cuda")
    B, H, n = 2, 3, layout.n_tiles
    q, k, v = inputs(B, layout.seq_len, H, D, scale, seed=D + 1)
    K = 6
    idx = torch.rand(B, H, n, n, device="cuda").topk(K, dim=-1).indices.int()
    cnt = torch.randint(0, K + 1, (B, H, n), device="cuda", dtype=torch.int32)
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        poison_allocator()
        with kernel_options(gluon_fwd=True, gluon_bwd=True):
            out = block_sparse_attention(*leaves, layout, idx, cnt)
            out.backward(do)
        grads.append([out] + [x.grad for x in leaves])
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx, cnt, do.double())
    errs = [rel_err(x, r) for x, r in zip(grads[0], ref)]
    print(f"\ngluon fwd+bwd D{D} scale {scale}: rel err o/dq/dk/dv = " + " / ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < BF16_TOL
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon")
@pytest.mark.parametrize("backward", [False, True])
def test_vsa_with_the_gluon_kernels(backward):
    """The whole VSA (coarse stage, gated combine in the Gluon epilogue; the backward on the
    Triton kernels or the Gluon ones, with the tile means' bias) against the float64 reference,
    forward and every gradient."""
    errs = vsa_errors((8, 16, 16), 128, 4.0, "cubes", gluon_fwd=True, gluon_bwd=backward)
    print(f"\nbf16 VSA, Gluon forward, Gluon backward {backward}: rel err o/dq/dk/dv/dgc/dgf = "
          + " / ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < BF16_TOL


@pytest.mark.skipif(not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon")
def test_gluon_options_on_a_ragged_grid_run_the_triton_kernels():
    """Ragged tiles are not the Gluon kernels' (why_not says so): with the options on, the Triton
    kernels run and the results match the float64 reference as without them."""
    layout = TileLayout((5, 30, 52), device="cuda")
    q, k, v = inputs(1, layout.seq_len, 2, 128, 1.0, seed=7)
    assert "ragged" in gluon_hopper.why_not(q, k, v, layout.offsets, layout.offsets, layout.max_tile_size,
                                            layout.max_tile_size)
    n = layout.n_tiles
    idx = torch.rand(1, 2, n, n, device="cuda").topk(8, dim=-1).indices.int()
    cnt = torch.randint(1, 9, (1, 2, n), device="cuda", dtype=torch.int32)
    do = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with kernel_options(gluon_fwd=True, gluon_bwd=True):
        out = block_sparse_attention(*leaves, layout, idx, cnt)
        out.backward(do)
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx, cnt, do.double())
    assert max(rel_err(x, r) for x, r in zip([out] + [x.grad for x in leaves], ref)) < BF16_TOL


@pytest.mark.skipif(not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon")
def test_a_compiled_training_step_with_the_gluon_kernels_equals_eager():
    """A VideoDiT (4 x 16 x 16 tokens: 16 full tiles, D 64) in bf16 autocast with the Gluon kernels:
    compile_blocks gives the eager step's output and gradients (bf16 tolerance)."""
    from vsa.models import build_model

    torch.manual_seed(0)
    kw = dict(in_channels=4, num_classes=3, attention="vsa", sparsity=0.75)
    eager = build_model("0.6M", **kw).cuda()
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.1)
    compiled = build_model("0.6M", **kw).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x = torch.randn(2, 4, 4, 32, 32, device="cuda")
    t, labels = torch.rand(2, device="cuda"), torch.tensor([0, 2], device="cuda")
    outs = []
    with kernel_options(gluon_fwd=True, gluon_bwd=True):
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, t, labels=labels)
            out.float().square().mean().backward()
            outs.append(out.float())
    assert rel_err(outs[1], outs[0].double()) < BF16_TOL
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None and a.grad.norm() > 0:
            assert rel_err(b.grad, a.grad.double()) < 5e-2, name


def test_backward_deterministic_bf16():
    layout = TileLayout((16, 32, 32), device="cuda")
    q, k, v = inputs(2, layout.seq_len, 4, 64, 1.0, seed=1)
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        video_sparse_attention(*leaves, layout, sparsity=0.875).backward(do)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gluon", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon"))])
def test_torch_compile_fullgraph(gluon):
    """VSA inside torch.compile(fullgraph=True) equals eager, forward and gradients (with the
    Gluon kernels too: they run inside the same custom ops)."""
    with kernel_options(gluon_fwd=gluon, gluon_bwd=gluon):
        _compiled_equals_eager()


def _compiled_equals_eager():
    layout = TileLayout((8, 16, 16), device="cuda")
    q, k, v = inputs(1, layout.seq_len, 2, 64, 1.0, seed=2)
    gate = torch.randn_like(q)

    def f(q, k, v, g):
        return video_sparse_attention(q, k, v, layout, sparsity=0.5, gate_c=g) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    out = compiled(*leaves)
    out.float().square().sum().backward()
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    eager = f(*eager_leaves)
    eager.float().square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gluon", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hopper() or not gluon_hopper.GLUON, reason="the Gluon kernels need a Hopper GPU and Gluon"))])
def test_cuda_graph_replay_matches_eager(gluon):
    """Forward+backward captured in a CUDA graph (what compile_mode=reduce-overhead does) and
    replayed on new inputs equals eager bit for bit: the TMA descriptors, encoded on the host at
    launch, are baked into the graph with the static buffers' addresses. Also with the Gluon
    kernels (their descriptors are made at launch the same way)."""
    with kernel_options(gluon_fwd=gluon, gluon_bwd=gluon):
        _graph_replay_equals_eager()


def _graph_replay_equals_eager():
    layout = TileLayout((8, 16, 16), device="cuda")
    static = [x.requires_grad_() for x in inputs(1, layout.seq_len, 2, 128, 1.0, seed=3)]
    do = torch.randn_like(static[0])

    def step():
        out = video_sparse_attention(*static, layout, sparsity=0.75)
        return (out, *torch.autograd.grad(out, static, do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotune and warm up outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for x, new in zip(static, inputs(1, layout.seq_len, 2, 128, 4.0, seed=4)):
            x.copy_(new)
    graph.replay()
    eager = step()
    for a, b in zip(captured, eager):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b)
