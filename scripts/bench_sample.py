"""Sampling benchmark on a GPU: full (cuDNN) vs VSA attention in one run (docs/benchmarks.md).

The 1.4B preset at 32,768 tokens (latents 12x32x64x64, patch 1x2x2), class-conditional, 50 Euler
steps through vsa.diffusion.generate (bf16 autocast, compiled blocks), batch 1. Randomly
initialised weights with the zero-initialised parts perturbed, so every block computes (timing does
not depend on the weights' values). One untimed 2-step warm-up (compilation), then the whole
50-step sampling is timed once with a CUDA synchronize at both ends.

    python scripts/bench_sample.py --out docs/results/sample_h100.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vsa.benchmark import run_meta, write_results
from vsa.diffusion import generate
from vsa.models import DiTConfig, VideoDiT
from vsa.models.presets import PRESETS


def build(attention: str, sparsity: float, in_channels: int, compile_blocks: bool,
          compile_mode: str | None = None) -> VideoDiT:
    cfg = DiTConfig(**PRESETS["1.4B"], in_channels=in_channels, num_classes=10, attention=attention,
                    sparsity=sparsity)
    model = VideoDiT(cfg)
    with torch.no_grad():  # switch on the zero-initialised gates and output layer
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model = model.cuda().eval()
    if compile_blocks:
        model.compile_blocks(**({"mode": compile_mode} if compile_mode else {}))
    return model


def time_sampling(model, shape, steps, cfg_scale) -> tuple[float, torch.Tensor]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, shape, 1, steps=2, cfg_scale=cfg_scale, shift=3.0, seed=0)  # warm-up / compile
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, shape, 1, steps=steps, cfg_scale=cfg_scale, shift=3.0, seed=0)
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="guidance weight; != 1 doubles the model evaluations (same for both)")
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--shape", default="12,32,64,64", help="latent C,T,H,W (32,768 tokens with patch 1x2x2)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = []
    for attention in ("full", "vsa"):
        model = build(attention, args.sparsity, shape[0], not args.no_compile, args.compile_mode)
        torch.cuda.reset_peak_memory_stats()
        sec, out = time_sampling(model, shape, args.steps, args.cfg_scale)
        evals = args.steps * (2 if args.cfg_scale != 1.0 else 1)
        row = dict(attention=attention, params=sum(p.numel() for p in model.parameters()),
                   tokens=math.prod(model.cfg.token_grid(shape[1:])), latent_shape=list(shape), steps=args.steps,
                   cfg_scale=args.cfg_scale, model_evaluations=evals, seconds=sec, ms_per_evaluation=sec / evals * 1e3,
                   sparsity=args.sparsity if attention == "vsa" else 0.0, finite=bool(torch.isfinite(out).all()),
                   peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)
        rows.append(row)
        print(f"{attention:4s}: {sec:.2f} s for {args.steps} steps ({row['ms_per_evaluation']:.1f} ms per model "
              f"evaluation), finite {row['finite']}, {row['peak_memory_gb']:.1f} GB", flush=True)
        del model, out
        torch.cuda.empty_cache()
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    rows.append(dict(method="VSA speedup over full (whole sampling)", speedup=speedup))
    meta = run_meta(dtype="bf16 autocast", compiled=not args.no_compile, compile_mode=args.compile_mode)
    write_results(args.out, meta, rows)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}\n\n"
          "| attention | steps | s | ms / model evaluation | peak GB |\n|---|---|---|---|---|")
    for r in rows[:2]:
        print(f"| {r['attention']} | {r['steps']} | {r['seconds']:.2f} | {r['ms_per_evaluation']:.1f} | "
              f"{r['peak_memory_gb']:.1f} |")
    print(f"| VSA speedup | | {speedup:.2f}x | | |")


if __name__ == "__main__":
    main()
