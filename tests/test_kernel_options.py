"""`vsa.ops.KernelOptions`: the kernels' tuning knobs as one validated object, set through a
context manager (or for a whole script) and read by the launch wrappers."""

import pytest
import torch

import vsa.ops.block_sparse as bs
from vsa import TileLayout, block_sparse_attention
from vsa.ops import KernelOptions, current_kernel_options, kernel_options, set_kernel_options
from vsa.ops.reference import block_sparse_attention_reference


def test_defaults_are_the_shipped_choices():
    o = KernelOptions()
    assert (o.tma, o.fwd_blocks, o.dq_blocks, o.dkv_blocks, o.interpreter_units) == (
        None, (128, 64), (64, 64), (64, 64), 2)
    assert (o.select_precision, o.select_block_q, o.select_block_k, o.select_d_chunk, o.select_warps,
            o.means_block, o.means_warps) == ("tf32x3", 32, 32, 32, 4, 32, 2)
    assert current_kernel_options() == o


def test_context_manager_sets_and_restores_even_on_errors():
    before = current_kernel_options()
    with kernel_options(tma=False, dq_blocks=[128, 32]) as inside:
        assert current_kernel_options() is inside
        assert inside.tma is False and inside.dq_blocks == (128, 32)  # lists become tuples
        with kernel_options(interpreter_units=1):  # nests: changes apply on top
            assert current_kernel_options().interpreter_units == 1
            assert current_kernel_options().dq_blocks == (128, 32)
        assert current_kernel_options() is inside
    assert current_kernel_options() == before
    with pytest.raises(RuntimeError, match="boom"), kernel_options(select_precision="ieee"):
        raise RuntimeError("boom")
    assert current_kernel_options() == before


def test_set_kernel_options_returns_the_previous_options():
    previous = set_kernel_options(means_warps=4)
    try:
        assert current_kernel_options().means_warps == 4 and previous.means_warps == 2
    finally:
        set_kernel_options(previous)
    assert current_kernel_options() == previous


@pytest.mark.parametrize("changes, message", [
    ({"tma": "yes"}, "tma must be"),
    ({"fwd_blocks": (128, 48)}, "fwd_blocks must be 2 powers of two >= 16"),
    ({"dq_blocks": (8, 64)}, "dq_blocks must be"),
    ({"dkv_blocks": 64}, "dkv_blocks must be"),
    ({"interpreter_units": 3}, "interpreter_units must be 1 or 2"),
    ({"autotune": "fast"}, "autotune must be"),
    ({"select_precision": "tf32"}, "select_precision must be one of"),
    ({"select_warps": 3}, "select_warps must be a power of two"),
    ({"select_d_chunk": 8}, "must be >= 16"),
])
def test_bad_options_fail_when_set_and_change_nothing(changes, message):
    before = current_kernel_options()
    with pytest.raises((ValueError, TypeError), match=message):
        with kernel_options(**changes):
            pass
    assert current_kernel_options() is before
    with pytest.raises(TypeError):
        KernelOptions(use_tma=True)  # misspelt knobs fail too


def test_launch_wrappers_read_the_options_in_force():
    """Block caps and load path come from the options: (rows per program, rows per unit) per kernel,
    the dK/dV caps applying to key rows."""
    o = KernelOptions(fwd_blocks=(64, 32), dq_blocks=(128, 16), dkv_blocks=(32, 128))
    assert bs._blocks(256, 256, "fwd", o) == (64, 32)
    assert bs._blocks(256, 256, "dq", o) == (128, 16)
    assert bs._blocks(256, 256, "dkv", o) == (128, 32)
    assert bs._blocks(20, 20, "fwd", KernelOptions()) == (32, 32)  # small tiles: the tile's size
    x = torch.zeros(1, 64, 1, 64)
    assert bs._use_tma(x, KernelOptions(tma=True)) and not bs._use_tma(x, KernelOptions())


def test_forward_and_backward_run_with_the_options_of_the_block():
    """A 32x16 forward and 16-row backward against the reference (several programs and units per
    64-token tile, pointer loads), then the defaults again."""
    layout = TileLayout((4, 4, 8))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 1, 64, generator=gen, requires_grad=True) for _ in range(3))
    idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    grad = torch.randn(q.shape, generator=gen)
    with kernel_options(fwd_blocks=(32, 16), dq_blocks=(16, 16), dkv_blocks=(16, 16), tma=False):
        out = block_sparse_attention(q, k, v, layout, idx, cnt, impl="triton")
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = block_sparse_attention_reference(qd, kd, vd, layout, idx, cnt)
    want = (ref, *torch.autograd.grad(ref, (qd, kd, vd), grad.double()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    assert current_kernel_options() == KernelOptions()
