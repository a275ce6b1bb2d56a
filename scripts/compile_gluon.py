"""Compile the Gluon kernels for Hopper (vsa/ops/gluon_hopper.py) on any machine, GPU or not, and
report what the compiler made of it: the target, shared memory, warps, the wgmma / TMA /
register-reallocation instructions in the PTX, and ptxas's registers and spills.

    python scripts/compile_gluon.py                      # fwd (plain, overlapped), dQ, dK/dV; D 64
                                                         # and 128; with and without the combine / bias
    python scripts/compile_gluon.py --kernels dkv --head-dims 128 --stages 3 --json /tmp/gluon.json

A stand-in for Triton's CUDA driver reports a compute capability 9.0 target, so `warmup` compiles
(PTX, then a cubin with Triton's own ptxas) and launches nothing. Run it without TRITON_INTERPRET
(the interpreter swaps Triton's helper functions for interpreted ones that Gluon cannot compile).
tests/test_gluon.py runs it; the GPU tests run the kernel itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsa.ops import gluon_hopper  # noqa: E402


class HopperTarget:
    """Triton's driver as far as compiling needs it: the target, a device and a stream."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def ptxas_report(ptx: str) -> dict:
    """Registers, spills and barriers of the kernel per `ptxas -v` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    number = lambda pattern: int(re.search(pattern, text).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def compile_variant(kernel: str, head_dim: int, extra: bool, stages: int | None) -> dict:
    """Compile one variant of `kernel` ("fwd", "fwd_overlap" (KernelOptions.gluon_overlap), "dq" or
    "dkv"; `extra`: the forward's gated combine,
    the backward's per-tile bias) for bf16 with count tensors, 2 x 2 heads of 8 tiles (shapes do not
    change the code)."""
    B, H, n, K, tile = 2, 2, 8, 3, gluon_hopper.TILE
    S = n * tile
    q, k, v, do = (torch.zeros(B, S, H, head_dim, dtype=torch.bfloat16) for _ in range(4))
    offsets = torch.arange(n + 1, dtype=torch.int32) * tile
    idx = torch.zeros(B, H, n, K, dtype=torch.int32)
    cnt = torch.full((B, H, n), K, dtype=torch.int32)
    lse, delta, per_tile = torch.empty(B, H, S), torch.empty(B, H, S), torch.zeros(B, n, H, head_dim)
    n_stages = gluon_hopper.stages(head_dim, stages)
    launch = dict(HEAD_D=head_dim, BLOCK=tile, STAGES=n_stages, PRODUCER_REGS=gluon_hopper.PRODUCER_REGS,
                  num_warps=gluon_hopper.CONSUMER_WARPS, maxnreg=gluon_hopper.MAX_REGS, grid=(n, B * H))
    if kernel in ("fwd", "fwd_overlap"):
        o = torch.empty_like(q)
        compiled = gluon_hopper._fwd_ws_kernel.warmup(
            *gluon_hopper._descriptors(q, k, v), o, lse, o, per_tile, q, q, offsets, idx, cnt, o.stride(0),
            o.stride(1), o.stride(2), H, n, S, S, K, 0.1, COMBINE=extra, HAS_GC=extra, HAS_GF=extra, HAS_CNT=True,
            OVERLAP=kernel == "fwd_overlap", **launch)
    elif kernel == "dq":
        compiled = gluon_hopper._dq_ws_kernel.warmup(
            *gluon_hopper._descriptors(q, k, v, do), torch.empty_like(q), lse, delta, per_tile, offsets, idx, cnt,
            do.stride(0), do.stride(1), do.stride(2), H, n, S, S, K, 0.1, 0.1, HAS_BIAS=extra, HAS_CNT=True,
            **launch)
    elif kernel == "dkv":
        dk = torch.empty_like(k)
        compiled = gluon_hopper._dkv_ws_kernel.warmup(
            *gluon_hopper._descriptors(q, k, v, do), dk, torch.empty_like(v), lse, delta, per_tile, per_tile,
            offsets, idx.flatten(), torch.arange(B * H * n + 1, dtype=torch.int32), dk.stride(0), dk.stride(1),
            dk.stride(2), H, n, S, S, 0.1, 0.1, HAS_BIAS=extra, **launch)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; use fwd, fwd_overlap, dq or dkv")
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target (\S+)", ptx, re.M)
    return {"kernel": kernel, "head_dim": head_dim, "extra": extra, "stages": n_stages,
            "target": target.group(1) if target else None, "cubin_bytes": len(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "wgmma": ptx.count("wgmma.mma_async"), "tma_loads": ptx.count("cp.async.bulk.tensor"),
            "setmaxnreg": sorted({line.split()[0] + " " + line.split()[-1].rstrip(";")
                                  for line in ptx.splitlines() if "setmaxnreg" in line}),
            **ptxas_report(ptx)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kernels = ["fwd", "fwd_overlap", "dq", "dkv"]
    parser.add_argument("--kernels", nargs="+", default=kernels, choices=kernels)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(gluon_hopper.HEAD_DIMS))
    parser.add_argument("--stages", type=int, default=None, help="K/V buffers (default: gluon_hopper.stages)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not gluon_hopper.GLUON:
        raise SystemExit("this Triton has no Gluon (triton.experimental.gluon, Triton >= 3.5)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: Gluon kernels compile only outside the interpreter")
    from triton.runtime import driver

    driver.set_active(HopperTarget())
    rows = [compile_variant(kernel, d, extra, args.stages)
            for kernel, d, extra in itertools.product(args.kernels, args.head_dims, (False, True))]
    for r in rows:
        extra = "bias" if r["kernel"] in ("dq", "dkv") else "combine"
        print(f"{r['kernel']:11s} D {r['head_dim']:3d} {extra} {r['extra']!s:5} stages {r['stages']}: {r['target']}, "
              f"shared {r['shared_bytes'] / 1024:.1f} KB, {r['num_warps']} warps, {r['wgmma']} wgmma, "
              f"{r['tma_loads']} TMA loads, {r['registers']} registers, spills {r['spill_stores']}/"
              f"{r['spill_loads']} B, {', '.join(r['setmaxnreg'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
