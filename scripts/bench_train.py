"""Train-step benchmark on a GPU: full (cuDNN) vs VSA attention in one run (docs/benchmarks.md).

One step = the training step of vsa.training (flow-matching loss on random latents with class
labels, bf16 autocast over fp32 weights as Lightning's bf16-mixed, backward, gradient clipping,
fused AdamW), CUDA-event timed over `--steps` steps after warm-up (the first steps compile the
blocks), no host sync inside the timed loop. Reported per case: ms/step, tokens/s, samples/s, peak
memory, and MFU = analytic training FLOPs (vsa.training.flops: 3 x forward, recomputation NOT
counted) / time / peak, with the peak MEASURED here as the bf16 matmul rate (8192^3) and also
against the H100's 989 TFLOP/s spec. A kernel-level profile of two steps gives where the time goes.

    python scripts/bench_train.py --out docs/results/train_h100.json

Cases (--cases, comma-separated):
  400m   a ~400M DiT (depth 24, width 1152, head dim 128) at 16,384 tokens: full vs VSA (87.5%).
  400m_d64  ~400M with head dim 64 as the 60M-600M presets (depth 28, width 1024, 16 heads).
  1b32k  the 1.4B preset at 32,768 tokens, batch 1: full attention MFU and VSA memory/speed, with
         the first N blocks recomputed (--ckpt1b: tried from the fewest up; the first N that fits
         in memory is kept - more recomputation is never faster; out-of-memory is recorded).
  vsa_1b the model and input of `python train.py experiment=vsa_1b` (1.4B, 16,384 tokens, batch 1,
         every block recomputed): the figure its logged perf/tokens_per_sec and perf/mfu compare with.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time

import torch

from vsa.benchmark import run_meta, write_results
from vsa.diffusion import flow_matching_loss, timestep_shift
from vsa.diffusion.flow import sample_timesteps
from vsa.models import DiTConfig, VideoDiT
from vsa.models.presets import PRESETS
from vsa.training.flops import forward_flops

H100_SPEC = 989.4e12  # dense bf16, SXM
CASES = {
    # name: (architecture, latent shape (C, T, H, W), batch, attentions)
    "400m": (dict(depth=24, width=1152, head_dim=128), (12, 16, 64, 64), 1, ("full", "vsa")),
    # the same size with the head dim of the 60M-600M presets (16 heads of 64)
    "400m_d64": (dict(depth=28, width=1024, head_dim=64), (12, 16, 64, 64), 1, ("full", "vsa")),
    "1b32k": (PRESETS["1.4B"], (12, 32, 64, 64), 1, ("full", "vsa")),
    "vsa_1b": (PRESETS["1.4B"], (12, 16, 64, 64), 1, ("full", "vsa")),
}
ALL_BLOCKS = {"vsa_1b"}  # cases that recompute every block (configs/experiment/vsa_1b.yaml)
# The scaling-study sizes at its 16,384 tokens (3x16x128x128 pixels, space-to-depth), batch 4:
# what one optimizer step of each sweep run costs (5m_16k, 10m_16k, 20m_16k, 60m_16k).
for _name in ("5M", "10M", "20M", "60M"):
    CASES[f"{_name.lower()}_16k"] = (PRESETS[_name], (12, 16, 64, 64), 4, ("full", "vsa"))
# Kernel name -> category, first match wins (inductor's fused kernels are named triton_*).
CATEGORIES = [
    ("attention (ours: VSA kernels)", r"_fwd_kernel|_dq_kernel|_dkv_kernel|_delta_kernel|_bwd_prep|_tile_sum|"
                                      r"_tile_means|_coarse_select|_transpose_lists|bitonic|topk|radix|sort"),
    ("attention (cuDNN / flash SDPA)", r"sdpa|fmha|flash|cudnn|attn"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|sm90|wgmma|matmul"),
    ("optimizer + grad clip", r"multi_tensor|adam|foreach|norm_kernel|_amp_"),
    ("fused elementwise/norms (compiled)", r"^triton_"),
    ("other elementwise/reductions/copies", r"."),
]


def matmul_peak() -> float:
    """Measured dense bf16 matmul rate (FLOP/s), 8192^3."""
    import triton

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


class Stepper:
    """The training step on fixed random latents (a fresh timestep/noise draw each step)."""

    def __init__(self, arch: dict, latent_shape, batch: int, attention: str, sparsity: float,
                 compile_blocks: bool, dense_kernel: str = "cudnn", compile_mode: str | None = None):
        options = {"kernel": dense_kernel} if attention == "full" else {}
        cfg = DiTConfig(**arch, in_channels=latent_shape[0], num_classes=10, attention=attention,
                        attention_options=options, sparsity=sparsity if attention == "vsa" else 0.875)
        self.model = VideoDiT(cfg).cuda()
        if compile_blocks:
            self.model.compile_blocks(mode=compile_mode)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99), fused=True)
        self.x0 = torch.randn(batch, *latent_shape, device="cuda")
        self.labels = torch.randint(0, 10, (batch,), device="cuda")
        self.seq_len = math.prod(cfg.token_grid(latent_shape[1:]))
        self.shift = timestep_shift(self.seq_len)
        self.batch = batch
        self.cuda_graphs = compile_blocks and compile_mode in ("reduce-overhead", "max-autotune")
        fc = forward_flops(cfg, latent_shape[1:])
        self.flops = batch * fc.training  # analytic, recomputation not counted
        self.forward_per_block = batch * (fc.forward - fc.conditioning) / cfg.depth
        self.params = sum(p.numel() for p in self.model.parameters())

    def set_checkpointing(self, n_blocks: int) -> None:
        self.model.cfg = dataclasses.replace(self.model.cfg, activation_checkpointing=int(n_blocks))

    def step(self) -> None:
        if self.cuda_graphs:  # a new training iteration for CUDA-graph trees
            torch.compiler.cudagraph_mark_step_begin()
        t = sample_timesteps(self.batch, shift=self.shift, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_loss(self.model, self.x0, t, labels=self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def time(self, steps: int, warmup: int) -> float:
        """Median-free: total time of `steps` steps after `warmup` ones, per step (s)."""
        for _ in range(warmup):
            loss = self.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            self.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps


def profile_steps(stepper: Stepper, steps: int = 2) -> dict:
    """GPU kernel time of `steps` steps by category (ms per step), plus the wall time per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            stepper.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - wall) / steps * 1e3
    totals = {name: 0.0 for name, _ in CATEGORIES}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:  # kernels only (CPU ops would count them twice)
            continue
        us = event.self_device_time_total
        if us <= 0:
            continue
        for name, pattern in CATEGORIES:
            if re.search(pattern, event.key, flags=re.IGNORECASE):
                totals[name] += us / 1e3 / steps
                break
        kernels[event.key[:90]] = us / 1e3 / steps
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    busy = sum(totals.values())
    return dict(wall_ms=wall, gpu_busy_ms=busy, idle_ms=max(0.0, wall - busy),
                by_category_ms={k: v for k, v in totals.items() if v > 0}, top_kernels_ms=top)


def data_rate(latent_shape, batch: int, workers: int, n: int = 24) -> float:
    """Samples/s of the built-in synthetic video data at the pixel shape that encodes (space to
    depth 1x2x2) to `latent_shape`, through a DataLoader with `workers` processes."""
    from torch.utils.data import DataLoader

    from vsa.data import SyntheticVideoDataset

    C, T, H, W = latent_shape
    ds = SyntheticVideoDataset(num_samples=10_000, frames=T, height=2 * H, width=2 * W, channels=3,
                               num_classes=10)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=True)
    it = iter(loader)
    next(it)  # worker start-up
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--cases", default="400m,1b32k")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--ckpt1b", default="8,16,24,33", help="recomputed blocks to try for 1b32k, fewest first")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--dense-kernel", default="cudnn", choices=["cudnn", "auto"],
                    help="full attention's SDPA kernel: cudnn (pinned) or auto (SDPA's own choice)")
    ap.add_argument("--workers", type=int, default=8, help="data loader workers for the data-rate row")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel profile and the data-rate row")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak()
    print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for case in args.cases.split(","):
        arch, shape, batch, attentions = CASES[case]
        ckpts = [0] if not case.startswith("1b") else [int(n) for n in args.ckpt1b.split(",")]
        if case in ALL_BLOCKS:
            ckpts = [arch["depth"]]
        for attention in attentions:
            torch._dynamo.reset()  # a fresh compile cache per model
            stepper = Stepper(arch, shape, batch, attention, args.sparsity, not args.no_compile,
                              args.dense_kernel, args.compile_mode)
            best = None
            for n_ckpt in ckpts:
                stepper.set_checkpointing(n_ckpt)
                row = dict(case=case, attention=attention, params=stepper.params, tokens=stepper.seq_len,
                           batch=batch, latent_shape=list(shape), recomputed_blocks=n_ckpt,
                           compiled=not args.no_compile, compile_mode=args.compile_mode,
                           dense_kernel=args.dense_kernel,
                           sparsity=args.sparsity if attention == "vsa" else 0.0)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    sec = stepper.time(args.steps, args.warmup)
                except torch.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e)[:160]}"
                    print(f"{case} {attention} recompute {n_ckpt}: OOM", flush=True)
                    rows.append(row)
                    stepper.opt.zero_grad(set_to_none=True)
                    continue
                recompute = n_ckpt * stepper.forward_per_block
                row.update(step_ms=sec * 1e3, tokens_per_s=batch * stepper.seq_len / sec, samples_per_s=batch / sec,
                           train_flops_per_step=stepper.flops, tflops_per_s=stepper.flops / sec / 1e12,
                           mfu_measured_peak=stepper.flops / sec / peak, mfu_h100_spec=stepper.flops / sec / H100_SPEC,
                           hfu_measured_peak=(stepper.flops + recompute) / sec / peak,
                           peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30)
                rows.append(row)
                print(f"{case} {attention:4s} recompute {n_ckpt:2d}: {row['step_ms']:8.1f} ms/step "
                      f"{row['tokens_per_s']:9.0f} tok/s  MFU {100 * row['mfu_measured_peak']:.1f}% "
                      f"(spec {100 * row['mfu_h100_spec']:.1f}%)  {row['peak_memory_gb']:.1f} GB", flush=True)
                best = row
                break  # the fewest recomputed blocks that fit
            if best is not None and not args.no_profile:
                stepper.set_checkpointing(best["recomputed_blocks"])
                prof = profile_steps(stepper)
                best["profile"] = prof
                print(f"{case} {attention} profile (ms/step): " + ", ".join(
                    f"{k} {v:.1f}" for k, v in prof["by_category_ms"].items()) +
                    f", idle {prof['idle_ms']:.1f} of {prof['wall_ms']:.1f}", flush=True)
            del stepper
            torch.cuda.empty_cache()
        fastest = {a: min((r for r in rows if r["case"] == case and r["attention"] == a and "step_ms" in r),
                          key=lambda r: r["step_ms"], default=None) for a in attentions}
        if fastest.get("full") and fastest.get("vsa"):
            ratio = fastest["vsa"]["tokens_per_s"] / fastest["full"]["tokens_per_s"]
            rows.append(dict(case=case, method="VSA / full tokens/s (fastest of each)", ratio=ratio))
            print(f"{case}: VSA / full tokens/s = {ratio:.2f}x", flush=True)
        if args.no_profile:
            continue
        rate = data_rate(shape, batch, args.workers)
        rows.append(dict(case=case, method=f"synthetic data loader, {args.workers} workers", samples_per_s=rate))
        print(f"{case}: data loader {rate:.1f} samples/s", flush=True)

    meta = run_meta(dtype="bf16-mixed", matmul_peak_tflops=peak / 1e12, steps=args.steps, warmup=args.warmup,
                    sparsity=args.sparsity)
    write_results(args.out, meta, rows)
    print("\n" + markdown_table(rows, meta))


def markdown_table(rows, meta) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, bf16-mixed, "
             f"measured matmul peak {meta['matmul_peak_tflops']:.0f} TFLOP/s",
             "", "| case | attention | params | tokens | recomputed blocks | ms/step | tokens/s | MFU (measured peak) "
             "| MFU (989 spec) | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_ms" in r:
            lines.append(f"| {r['case']} | {r['attention']} | {r['params'] / 1e6:.0f}M | {r['tokens']} | "
                         f"{r['recomputed_blocks']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{100 * r['mfu_measured_peak']:.1f}% | {100 * r['mfu_h100_spec']:.1f}% | "
                         f"{r['peak_memory_gb']:.1f} |")
        elif "error" in r:
            lines.append(f"| {r['case']} | {r['attention']} | {r['params'] / 1e6:.0f}M | {r['tokens']} | "
                         f"{r['recomputed_blocks']} | {r['error'][:40]} | | | | |")
        elif "ratio" in r:
            lines.append(f"| {r['case']} | {r['method']} | | | | | {r['ratio']:.2f}x | | | |")
        elif "samples_per_s" in r:
            lines.append(f"| {r['case']} | {r['method']} | | | | | {r['samples_per_s']:.1f} samples/s | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
