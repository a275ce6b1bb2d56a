"""One VSA forward+backward (1x12x32768x128, 87.5% sparse) and one GRAT-B forward+backward
(1x24x122880x128, 4x8x8 tiles, 3x3x3) under Nsight Compute, after warm-up (the autotuner's trials
run outside the profiled range).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis \\
        -k regex:"^_(fwd|dq|dkv|coarse|tile|transpose|bwd|delta)" \\
        python3 scripts/profile_ncu.py > docs/results/ncu_h100.txt

Without ncu it runs the same calls (and does nothing else): the profiled range is marked with
cudaProfilerStart/Stop.
"""

from __future__ import annotations

import argparse

import torch

from vsa import TileLayout, video_sparse_attention
from vsa.ops import fine_attention, patterns


def vsa_call(B=1, H=12, grid=(8, 64, 64), D=128):
    layout = TileLayout(grid, device="cuda")
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    g = torch.randn_like(q)
    return lambda: video_sparse_attention(q, k, v, layout, sparsity=0.875).backward(g)


def grat_call(B=1, H=24, grid=(32, 48, 80), tile=(4, 8, 8), D=128):
    layout = TileLayout(grid, tile, device="cuda")
    idx, cnt = patterns.batched_map("grat_b", layout, B, H)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    g = torch.randn_like(q)
    return lambda: fine_attention(q, k, v, layout, idx, cnt, impl="triton").backward(g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", default="vsa,grat_b")
    args = ap.parse_args()
    calls = {"vsa": vsa_call, "grat_b": grat_call}
    for name in args.which.split(","):
        fn = calls[name]()
        for _ in range(3):  # autotune and warm up outside the profiled range
            fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled one {name} forward+backward", flush=True)


if __name__ == "__main__":
    main()
