"""The fused backward glue (vsa/ops/glue.py) against plain torch expressions in float64."""

import pytest
import torch

from vsa import TileLayout
from vsa.ops.glue import vsa_backward_prep

SUM_TOL = dict(rtol=1e-5, atol=1e-5)  # delta and d_oc: sums of up to 64 fp32 terms of size ~1


def product_tol(dtype):
    """A product rounded once to dtype is within half an ulp; one ulp allows for the fp32 product of
    fp32 O_c and fp16 dO being rounded twice, atol for fp16 subnormals."""
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-7)


def reference(dout, o_f, o_c, gate_c, gate_f, tile_ids, dtype):
    """float64 results; do_f is rounded to dtype before delta, as the kernel (and the fine stage) reads it."""
    do_f = dout if gate_f is None else (dout * gate_f).to(dtype).double()
    delta = (do_f * o_f).sum(-1).transpose(1, 2)  # [B, H, S]
    do_c = dout if gate_c is None else dout * gate_c
    d_oc = torch.zeros_like(o_c).index_add_(1, tile_ids, do_c)
    d_gate_c = None if gate_c is None else dout * o_c.index_select(1, tile_ids)
    d_gate_f = None if gate_f is None else dout * o_f
    return do_f, delta, d_oc, d_gate_c, d_gate_f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gates", ["none", "coarse", "fine", "both"])
def test_backward_prep_matches_torch(gates, dtype, kernel_device):
    layout = TileLayout((3, 5, 6), tile=(2, 4, 4)).to(kernel_device)  # ragged: tiles of 8 to 32 tokens
    B, H, D, S = 2, 3, 64, layout.seq_len
    gen = torch.Generator().manual_seed(0)

    def rand(n):  # float64 holding values representable in dtype, so both sides see the same inputs
        return torch.randn(B, n, H, D, generator=gen, dtype=torch.float64).to(dtype).double()

    dout, o_f, gate_c, gate_f = rand(S), rand(S), rand(S), rand(S)
    o_c = torch.randn(B, layout.n_tiles, H, D, generator=gen, dtype=torch.float64).float().double()
    gate_c = gate_c if gates in ("coarse", "both") else None
    gate_f = gate_f if gates in ("fine", "both") else None

    def dev(x, dt=dtype):
        return None if x is None else x.to(device=kernel_device, dtype=dt)

    dout_k = dev(dout)
    out = vsa_backward_prep(dout_k, dev(o_f), dev(o_c, torch.float32), dev(gate_c), dev(gate_f),
                            layout.offsets, layout.max_tile_size)
    ref = reference(dout, o_f, o_c, gate_c, gate_f, layout.tile_ids.cpu(), dtype)
    if gate_f is None:
        assert out[0] is dout_k  # no copy
    names = ["do_f", "delta", "d_oc", "d_gate_c", "d_gate_f"]
    for name, x, r in zip(names, out, ref):
        if r is None:
            assert x.numel() == 0, name
            continue
        is_sum = name in ("delta", "d_oc")
        assert x.dtype == (torch.float32 if is_sum else dtype), name
        assert x.shape == r.shape and x.is_contiguous(), name
        tol = SUM_TOL if is_sum else product_tol(dtype)
        torch.testing.assert_close(x.cpu().double(), r, **tol, msg=lambda m: f"{name}: {m}")
