"""The Gluon forward for Hopper (vsa/ops/gluon_fwd.py) without a GPU: it compiles for sm_90a
(scripts/compile_gluon.py: a stand-in driver reports a compute capability 9.0 target; Triton's own
ptxas assembles it), it is chosen only where it applies, and everywhere else the Triton kernels run
as before. Its numbers are checked on a GPU by tests/test_ops_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vsa import TileLayout
from vsa.ops import KernelOptions, gluon_fwd, kernel_options
from vsa.ops.block_sparse import bsa_forward

REPO = Path(__file__).resolve().parents[1]
needs_gluon = pytest.mark.skipif(not gluon_fwd.GLUON, reason="this Triton has no Gluon (Triton >= 3.5)")


@needs_gluon
def test_the_gluon_forward_compiles_for_hopper(tmp_path):
    """scripts/compile_gluon.py, as a user runs it (outside the interpreter): every variant
    compiles to an sm_90a cubin with wgmma, TMA loads and the partitions' register moves, no
    spills, and shared memory for two programs per SM."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_gluon.py"), "--json",
                             str(tmp_path / "rows.json")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted((r["head_dim"], r["combine"]) for r in rows) == [(64, False), (64, True), (128, False), (128, True)]
    for r in rows:
        assert r["target"] == "sm_90a" and r["cubin_bytes"] > 0, r
        assert r["wgmma"] > 0 and r["tma_loads"] > 0, r  # S = Q K^T and O += P V on wgmma; TMA K/V loads
        assert any("setmaxnreg.inc" in x for x in r["setmaxnreg"]), r  # warp specialisation
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        tile_bytes = gluon_fwd.TILE * r["head_dim"] * 2  # Q + stages x (K + V), and two programs per SM
        assert (1 + 2 * r["stages"]) * tile_bytes <= r["shared_bytes"] <= 113 * 1024, r
        assert r["num_warps"] == 8, r  # the consumer warpgroup + the producer's (rounded up)
    assert f"D 128 combine True  stages {gluon_fwd.stages(128)}: sm_90a" in result.stdout


def operands(D=64, dtype=torch.bfloat16, B=2, H=2, n=8, K=3):
    """Zero q, k, v [B, n * 64, H, D] of n full tiles, their offsets and full q->k lists."""
    q, k, v = (torch.zeros(B, n * gluon_fwd.TILE, H, D, dtype=dtype) for _ in range(3))
    offsets = torch.arange(n + 1, dtype=torch.int32) * gluon_fwd.TILE
    idx = torch.zeros(B, H, n, K, dtype=torch.int32)
    cnt = torch.full((B, H, n), K, dtype=torch.int32)
    return q, k, v, offsets, idx, cnt


def test_it_takes_only_the_calls_it_covers():
    q, k, v, offsets, idx, cnt = operands()
    hopper = (9, 0)

    def why(*, q=q, k=k, v=v, q_offsets=offsets, kv_offsets=offsets, tiles=(64, 64), gates=(), capability=hopper):
        return gluon_fwd.why_not(q, k, v, q_offsets, kv_offsets, *tiles, gates, capability=capability)

    if not gluon_fwd.GLUON:
        assert "no Gluon" in why()
        return
    assert why() is None
    assert why(gates=(torch.zeros_like(q), None)) is None
    assert "not on a CUDA GPU" in why(capability=None)
    assert "Hopper" in why(capability=(8, 0)) and "Hopper" in why(capability=(10, 0))
    assert "dtype" in why(q=q.float(), k=k.float(), v=v.float())
    assert "head dim" in why(q=q[..., :32], k=k[..., :32], v=v[..., :32])
    assert "tiles of up to 32" in why(tiles=(32, 64))
    ragged = torch.tensor([0, 64, 100], dtype=torch.int32)
    assert "ragged" in why(q=q[:, :100], k=k[:, :100], v=v[:, :100], q_offsets=ragged, kv_offsets=ragged)
    heads_apart = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] with H outermost
    assert "TMA" in why(q=heads_apart)
    assert "gate" in why(gates=(torch.zeros_like(q).transpose(1, 2),))


def test_the_option_changes_nothing_where_the_kernel_does_not_apply():
    """On the CPU (the interpreter) `gluon_fwd=True` runs block_sparse.py's kernel, bit for bit."""
    layout = TileLayout((4, 8, 8))
    gen = torch.Generator().manual_seed(0)
    B, H, D = 1, 2, 64
    q, k, v = (torch.randn(B, layout.seq_len, H, D, generator=gen) for _ in range(3))
    n = layout.n_tiles
    idx = torch.stack([torch.randperm(n, generator=gen)[:2] for _ in range(B * H * n)]).view(B, H, n, 2).int()
    args = (q, k, v, layout.offsets, layout.offsets, idx, None, layout.max_tile_size, layout.max_tile_size)
    with kernel_options(gluon_fwd=True):
        chosen = bsa_forward(*args)
    plain = bsa_forward(*args)
    for a, b in zip(chosen, plain):
        assert torch.equal(a, b)


def test_the_options_are_checked():
    with pytest.raises(TypeError, match="gluon_fwd must be True or False"):
        KernelOptions(gluon_fwd="yes")
    with pytest.raises(ValueError, match="gluon_stages must be None"):
        KernelOptions(gluon_stages=5)
    assert gluon_fwd.stages(64) == 3 and gluon_fwd.stages(128) == 2 and gluon_fwd.stages(128, 4) == 4
