"""The fused coarse-stage kernels (vsa/ops/coarse.py) against torch in float64: tile means, coarse
attention and the top-K selection (Triton interpreter on CPU, real kernels on a GPU)."""

import math

import pytest
import torch

from vsa import TileLayout
from vsa.ops import kernel_options
from vsa.ops.coarse import coarse_attention_topk, coarse_stage, tile_means

B, H = 2, 3


def reference_means(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """float64 mean of x [B, S, H, D] over each tile's tokens."""
    x = x.double().cpu()
    total = torch.zeros(x.shape[0], layout.n_tiles, *x.shape[2:], dtype=torch.float64)
    total.index_add_(1, layout.tile_ids.cpu(), x)
    return total / layout.sizes.cpu().double()[None, :, None, None]


def reference_coarse(qc, kc, vc, scale):
    """float64 scores [B, H, n, n], probabilities and O_c [B, n, H, D]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", qc.double().cpu(), kc.double().cpu()) * scale
    probs = torch.softmax(scores, dim=-1)
    return scores, probs, torch.einsum("bhqk,bkhd->bqhd", probs, vc.double().cpu())


def check_selection(q2k_idx: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
    """Ascending (so distinct), in range, and the selected scores are the top-K scores."""
    idx = q2k_idx.cpu().long()
    n = scores.shape[-1]
    assert q2k_idx.dtype == torch.int32 and idx.shape == (*scores.shape[:3], topk)
    assert (idx[..., 1:] > idx[..., :-1]).all(), "not strictly ascending"
    assert idx.min() >= 0 and idx.max() < n
    chosen = scores.gather(-1, idx).sort(dim=-1, descending=True).values
    best = scores.topk(topk, dim=-1).values
    # Up to the products' rounding (tf32x3 on a GPU: ~1e-6): near-equal scores may swap places.
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["cubes", "curve"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_means_match_float64(order, dtype, kernel_device):
    layout = TileLayout((5, 6, 7), order=order).to(kernel_device)  # ragged: 8 cubes or 4 curve groups
    assert (layout.sizes < layout.max_tile_size).any()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, layout.seq_len, H, 64, generator=gen).to(dtype) for _ in range(3))
    means = tile_means(*(x.to(kernel_device) for x in (q, k, v)), layout.offsets, layout.max_tile_size)
    for name, got, x in zip("qkv", means, (q, k, v)):
        assert got.dtype == torch.float32 and got.is_contiguous(), name
        torch.testing.assert_close(got.cpu().double(), reference_means(x, layout), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}c: {m}")


def test_tile_means_strided_inputs(kernel_device):
    """q, k, v as views of one packed [B, S, H, 3 * D] projection (row stride 3 * H * D)."""
    layout = TileLayout((5, 6, 7)).to(kernel_device)
    D = 64
    qkv = torch.randn(B, layout.seq_len, H, 3 * D, generator=torch.Generator().manual_seed(1))
    q, k, v = qkv.to(kernel_device).split(D, dim=-1)
    means = tile_means(q, k, v, layout.offsets, layout.max_tile_size)
    for got, x in zip(means, (q, k, v)):
        torch.testing.assert_close(got.cpu().double(), reference_means(x, layout), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n, topk", [(30, 1), (30, 7), (30, 30), (210, 1), (210, 13), (210, 210)])
def test_coarse_attention_topk_matches_torch(n, topk, head_dim, kernel_device):
    gen = torch.Generator().manual_seed(n * 1000 + topk)
    qc, kc, vc = (torch.randn(B, n, H, head_dim, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    probs, o_c, q2k_idx = coarse_attention_topk(*(x.to(kernel_device) for x in (qc, kc, vc)), scale, topk)
    scores, ref_probs, ref_oc = reference_coarse(qc, kc, vc, scale)
    assert probs.dtype == o_c.dtype == torch.float32
    assert probs.shape == (B, H, n, n) and o_c.shape == (B, n, H, head_dim) and o_c.is_contiguous()
    torch.testing.assert_close(probs.cpu().double(), ref_probs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(o_c.cpu().double(), ref_oc, rtol=1e-4, atol=1e-5)
    check_selection(q2k_idx, scores, topk)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("n, topk, head_dim", [(30, 7, 64), (210, 13, 128)])
def test_coarse_select_precisions(n, topk, head_dim, precision, kernel_device):
    """Both product precisions of `_coarse_select_kernel` (`KernelOptions.select_precision`) give
    fp32-close probabilities, O_c and a top-K selection (tf32x3 runs on the tensor cores of a GPU)."""
    gen = torch.Generator().manual_seed(7 * n + topk)
    qc, kc, vc = (3 * torch.randn(B, n, H, head_dim, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    with kernel_options(select_precision=precision):
        probs, o_c, q2k_idx = coarse_attention_topk(*(x.to(kernel_device) for x in (qc, kc, vc)), scale,
                                                    topk)
    scores, ref_probs, ref_oc = reference_coarse(qc, kc, vc, scale)
    # Inputs of scale 3: scores up to ~30, so fp32 softmax rounding alone reaches ~1e-5 on O_c (~3).
    torch.testing.assert_close(probs.cpu().double(), ref_probs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(o_c.cpu().double(), ref_oc, rtol=1e-4, atol=2e-4)
    idx = q2k_idx.cpu().long()
    assert (idx[..., 1:] > idx[..., :-1]).all()
    # The chosen tiles' float64 scores are the best K up to the products' rounding.
    chosen = scores.gather(-1, idx).sort(dim=-1, descending=True).values
    torch.testing.assert_close(chosen, scores.topk(topk, dim=-1).values, rtol=0, atol=1e-4)


def test_top_k_breaks_ties_toward_lower_tiles(kernel_device):
    """Small-integer means give exact scores with many ties: still K distinct tiles, the lowest
    columns first among equal scores."""
    n, D, K = 40, 64, 9
    gen = torch.Generator().manual_seed(2)
    qc, kc, vc = (torch.randint(-2, 3, (B, n, H, D), generator=gen).float() for _ in range(3))
    _, _, q2k_idx = coarse_attention_topk(*(x.to(kernel_device) for x in (qc, kc, vc)), 0.125, K)
    scores = reference_coarse(qc, kc, vc, 0.125)[0]
    assert (scores.sort(dim=-1).values.diff(dim=-1) == 0).any()  # the test has ties
    check_selection(q2k_idx, scores, K)
    expected = torch.sort(-scores, dim=-1, stable=True).indices[..., :K].sort(dim=-1).values
    assert torch.equal(q2k_idx.cpu().long(), expected)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_coarse_stage_triton_matches_torch_path(requires_grad, kernel_device):
    """The fused path (no gradient needed) and the differentiable path agree."""
    layout = TileLayout((5, 6, 7)).to(kernel_device)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, layout.seq_len, H, 64, generator=gen).to(kernel_device).requires_grad_(requires_grad)
               for _ in range(3))
    o_c, idx = coarse_stage(q, k, v, layout, 3, use_triton=True)
    ref_oc, ref_idx = coarse_stage(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), layout.to("cpu"), 3,
                                   use_triton=False)
    assert o_c.requires_grad == requires_grad
    assert idx.dtype == torch.int32 and idx.is_contiguous()
    torch.testing.assert_close(o_c.detach().cpu(), ref_oc, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx.cpu(), ref_idx)
