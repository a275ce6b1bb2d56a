"""The Gluon kernels for Hopper (vsa/ops/gluon_hopper.py) without a GPU: they compile for sm_90a
(scripts/compile_gluon.py: a stand-in driver reports a compute capability 9.0 target; Triton's own
ptxas assembles them), they are chosen only where they apply, and everywhere else the Triton kernels
run as before. Their numbers are checked on a GPU by tests/test_ops_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vsa import TileLayout
from vsa.ops import KernelOptions, gluon_hopper, kernel_options
from vsa.ops.block_sparse import bsa_backward, bsa_forward

REPO = Path(__file__).resolve().parents[1]
needs_gluon = pytest.mark.skipif(not gluon_hopper.GLUON, reason="this Triton has no Gluon (Triton >= 3.5)")


@needs_gluon
def test_the_gluon_kernels_compile_for_hopper(tmp_path):
    """scripts/compile_gluon.py, as a user runs it (outside the interpreter): every variant of the
    forward (plain and overlapped), dQ and dK/dV kernels compiles to an sm_90a cubin with wgmma, TMA loads and the
    partitions' register moves, and shared memory for two programs per SM. No spills, except
    dK/dV at D 128 (two fp32 accumulators of 64 registers each: ~100 bytes a thread)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_gluon.py"), "--json",
                             str(tmp_path / "rows.json")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted((r["kernel"], r["head_dim"], r["extra"]) for r in rows) == sorted(
        (kernel, d, extra) for kernel in ("fwd", "fwd_overlap", "dq", "dkv") for d in (64, 128)
        for extra in (False, True))
    for r in rows:
        assert r["target"] == "sm_90a" and r["cubin_bytes"] > 0, r
        assert r["wgmma"] > 0 and r["tma_loads"] > 0, r  # products on wgmma, walked tiles by TMA
        assert any("setmaxnreg.inc" in x for x in r["setmaxnreg"]), r  # warp specialisation
        spill_cap = 256 if (r["kernel"], r["head_dim"]) == ("dkv", 128) else 0
        assert r["spill_stores"] <= spill_cap and r["spill_loads"] <= spill_cap, r
        tiles = (1 if r["kernel"].startswith("fwd") else 2) + 2 * r["stages"]  # own tiles + stages x 2 walked
        tile_bytes = gluon_hopper.TILE * r["head_dim"] * 2
        assert tiles * tile_bytes <= r["shared_bytes"] <= 113 * 1024, r
        assert r["num_warps"] == 8, r  # the consumer warpgroup + the producer's (rounded up)
    assert f"fwd         D 128 combine True  stages {gluon_hopper.stages(128)}: sm_90a" in result.stdout


def operands(D=64, dtype=torch.bfloat16, B=2, H=2, n=8, K=3):
    """Zero q, k, v [B, n * 64, H, D] of n full tiles, their offsets and full q->k lists."""
    q, k, v = (torch.zeros(B, n * gluon_hopper.TILE, H, D, dtype=dtype) for _ in range(3))
    offsets = torch.arange(n + 1, dtype=torch.int32) * gluon_hopper.TILE
    idx = torch.zeros(B, H, n, K, dtype=torch.int32)
    cnt = torch.full((B, H, n), K, dtype=torch.int32)
    return q, k, v, offsets, idx, cnt


def test_it_takes_only_the_calls_it_covers():
    q, k, v, offsets, idx, cnt = operands()
    hopper = (9, 0)

    def why(*, q=q, k=k, v=v, q_offsets=offsets, kv_offsets=offsets, tiles=(64, 64), gates=(), capability=hopper):
        return gluon_hopper.why_not(q, k, v, q_offsets, kv_offsets, *tiles, gates, capability=capability)

    if not gluon_hopper.GLUON:
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
    assert gluon_hopper.why_not(q, k, v, offsets, offsets, 64, 64, do=torch.zeros_like(q), capability=hopper) is None
    assert "output gradient" in gluon_hopper.why_not(q, k, v, offsets, offsets, 64, 64, do=torch.zeros_like(q).float(),
                                                     capability=hopper)


def test_the_options_change_nothing_where_the_kernels_do_not_apply():
    """On the CPU (the interpreter) `gluon_fwd` and `gluon_bwd` run block_sparse.py's kernels, bit
    for bit."""
    layout = TileLayout((4, 8, 8))
    gen = torch.Generator().manual_seed(0)
    B, H, D = 1, 2, 64
    q, k, v = (torch.randn(B, layout.seq_len, H, D, generator=gen) for _ in range(3))
    n = layout.n_tiles
    idx = torch.stack([torch.randperm(n, generator=gen)[:2] for _ in range(B * H * n)]).view(B, H, n, 2).int()
    args = (q, k, v, layout.offsets, layout.offsets, idx, None, layout.max_tile_size, layout.max_tile_size)
    with kernel_options(gluon_fwd=True, gluon_overlap=True):
        chosen = bsa_forward(*args)
    plain = bsa_forward(*args)
    for a, b in zip(chosen, plain):
        assert torch.equal(a, b)
    o, lse, _ = plain
    do = torch.randn(o.shape, generator=gen)
    with kernel_options(gluon_bwd=True):
        chosen = bsa_backward(do, *args[:3], o, lse, *args[3:])
    for a, b in zip(chosen, bsa_backward(do, *args[:3], o, lse, *args[3:])):
        assert torch.equal(a, b)


def test_the_options_are_checked():
    with pytest.raises(TypeError, match="gluon_fwd must be True or False"):
        KernelOptions(gluon_fwd="yes")
    with pytest.raises(TypeError, match="gluon_bwd must be True or False"):
        KernelOptions(gluon_bwd=1)
    with pytest.raises(TypeError, match="gluon_overlap must be True or False"):
        KernelOptions(gluon_overlap=None)
    with pytest.raises(ValueError, match="gluon_overlap needs gluon_stages >= 2"):
        KernelOptions(gluon_overlap=True, gluon_stages=1)
    with pytest.raises(ValueError, match="gluon_stages must be None"):
        KernelOptions(gluon_stages=5)
    assert gluon_hopper.stages(64) == 3 and gluon_hopper.stages(128) == 2 and gluon_hopper.stages(128, 4) == 4


def test_the_gpu_check_reports_each_case_in_its_own_process(tmp_path):
    """scripts/check_gluon.py (the first thing to run on a Hopper GPU) without a GPU: each case runs
    in a child process and comes back as a row ("no GPU" here), then the table."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_gluon.py"), "--cases", "fwd64", "bwd128",
                             "--out", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "rows.json").read_text())
    assert written["meta"]["cases"] == ["fwd64", "bwd128"] and written["meta"]["date"]
    assert [(r["case"], r["status"]) for r in written["rows"]] == [("fwd64", "no GPU"), ("bwd128", "no GPU")]
    assert "| case | status |" in result.stdout and "| bwd128 | no GPU |" in result.stdout
