"""One GPU vs DDP vs FSDP on two GPUs: same model, seed and global batch; loss curves and speed.

    python scripts/multi_gpu_check.py --out docs/results/multi_gpu_h200        # on a 2-GPU machine
    python scripts/multi_gpu_check.py --dry-run                                 # print the commands
    python scripts/multi_gpu_check.py --cpu --out /tmp/mgc                      # tiny model, 2 CPU processes

Three short runs of train.py (subprocesses, one after another, each with a timeout):

    single  trainer=gpu  trainer.devices=1  data.datamodule.batch_size=B     (CUDA_VISIBLE_DEVICES=first GPU)
    ddp     trainer=ddp  trainer.devices=2  data.datamodule.batch_size=B/2
    fsdp    trainer=fsdp trainer.devices=2  data.datamodule.batch_size=B/2

`data.datamodule.batch_size` is per device: the training sampler (vsa.training.data.ResumableSampler)
gives rank r of N every N-th index of the epoch's permutation, so N ranks with B/N read at every step
exactly the B samples one process with B reads (tests/test_ddp.py checks it). DDP averages the
gradients of the per-rank mean losses, i.e. the gradient of the mean loss over the global batch.

What is comparable: the noise, timesteps and CFG dropout of a training sample are drawn from a
seed of (seed, step, the sample's position in the global batch) (VideoDiffusionModule.sample_draws),
and rank r holds positions r, r + 2, ... So the three runs see the same samples with the same noise
at every step, and `train/loss` is logged as the global-batch mean (sync_dist). Their loss curves
should agree step by step up to bf16 rounding and the order of the gradient sums
(tests/test_ddp.py checks 1 process vs 2 ranks to 1e-4 in fp32 on the CPU).

Reads `train/loss`, `perf/tokens_per_sec` (per device), `perf/global_tokens_per_sec` (all devices,
multi-device runs), `perf/step_time`, `perf/peak_memory_gb` from each run's CSV logs; writes
<out>/multi_gpu_check.json and prints a table. A run that fails or times out is recorded (status,
return code, the tail of its output) and the others still run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "multi_gpu_check",
                   help="folder for the JSON, the run logs and the run folders")
    p.add_argument("--experiment", default="vsa_300m")
    p.add_argument("--global-batch", type=int, default=8, help="B: one GPU reads B, each of 2 ranks B/2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5, help="learning-rate warm-up of these short runs")
    p.add_argument("--num-workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-steps", type=int, default=10,
                   help="steps left out of the speed medians (start-up, autotuning, compilation)")
    p.add_argument("--window", type=int, default=10, help="steps per window of the window-mean loss")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--budget", type=float, default=420, help="seconds for all runs; later runs get what is left")
    p.add_argument("--runs", default="single,ddp,fsdp",
                   help="comma-separated subset of single,ddp,fsdp (--cpu: fsdp is recorded as skipped)")
    p.add_argument("--compile", action="store_true", help="module.compile_blocks=true (compile time counts)")
    p.add_argument("--cpu", action="store_true",
                   help="tiny CPU variant (experiment=tiny, 2 processes over gloo) to check the script itself")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    return p.parse_args(argv)


def run_commands(args: argparse.Namespace) -> dict[str, dict]:
    """name -> {"overrides": [...], "env": {...}} for each run."""
    if args.global_batch % 2:
        raise SystemExit(f"--global-batch must be even (2 ranks x B/2), got {args.global_batch}")
    logs = args.out / "logs"
    common = [f"experiment={args.experiment}", "logger=csv", f"seed={args.seed}", "ckpt_path=null",
              f"paths.log_dir={logs}", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
              "data.datamodule.val_size=0", f"data.datamodule.num_workers={args.num_workers}",
              f"module.lr_schedule.warmup_steps={args.warmup_steps}",
              # No checkpoints at all (Lightning would add its own ModelCheckpoint without the run's).
              "callbacks.ema=null", "callbacks.sample_videos=null", "callbacks.checkpoint=null",
              "+trainer.enable_checkpointing=false",
              "callbacks.speed.window_size=5", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false"]
    if args.compile:
        common.append("module.compile_blocks=true")
    if args.cpu:
        common += ["trainer.accelerator=cpu", "trainer.precision=32-true", "callbacks.speed.peak_flops=null"]
    half = args.global_batch // 2
    runs = {
        "single": [f"trainer={'cpu' if args.cpu else 'gpu'}", "trainer.devices=1",
                   f"data.datamodule.batch_size={args.global_batch}"],
        "ddp": ["trainer=ddp", "trainer.devices=2", f"data.datamodule.batch_size={half}"],
        "fsdp": ["trainer=fsdp", "trainer.devices=2", f"data.datamodule.batch_size={half}"],
    }
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {sorted(runs)}")
    out = {}
    for name in wanted:
        env = {}
        if name == "single" and not args.cpu:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"
        # cpu (a trainer config) also sets the accelerator; the run folder is per run name.
        out[name] = {"overrides": [*common, *runs[name], f"run_name=mgc_{name}", *args.overrides], "env": env}
    return out


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """column -> {step: value} from the run's (latest) CSV log."""
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    columns: dict[str, dict[int, float]] = {}
    if not versions:
        return columns
    with open(versions[-1], newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    columns.setdefault(key, {})[int(row["step"])] = float(value)
    return columns


def median_after(values: dict[int, float], skip: int) -> float | None:
    kept = [v for s, v in sorted(values.items()) if s >= skip and math.isfinite(v)]
    if not kept:
        kept = [v for v in values.values() if math.isfinite(v)]
    return statistics.median(kept) if kept else None


def run_one(name: str, spec: dict, args: argparse.Namespace, timeout: float) -> dict:
    command = [sys.executable, str(REPO / "train.py"), *spec["overrides"]]
    run_dir = args.out / "logs" / "train" / "runs" / f"mgc_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run folder (and CSV version_0)
    log_path = args.out / f"{name}.log"
    env = {**os.environ, **spec["env"], "HYDRA_FULL_ERROR": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # no SLURM detection here
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    record: dict = {"command": " ".join(command), "env": spec["env"], "run_dir": str(run_dir),
                    "log": str(log_path), "timeout_s": round(timeout, 1)}
    print(f"[{name}] {' '.join(spec['overrides'][-4:])} (timeout {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    if timeout <= 5:
        record.update(status="skipped", error="no time left in --budget")
        return record
    if args.cpu and name == "fsdp":
        record.update(status="skipped", error="Lightning's FSDPStrategy needs CUDA GPUs")
        return record
    with open(log_path, "w") as log:
        # Own session: on a time-out the whole group (DDP ranks started by Lightning) is killed.
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            status = "timeout"
    seconds = time.monotonic() - start
    record.update(status=status, returncode=returncode, seconds=round(seconds, 1))
    if status != "ok":
        record["output_tail"] = log_path.read_text(errors="replace")[-3000:]
    metrics = read_metrics(run_dir)
    loss = metrics.get("train/loss", {})
    tokens = metrics.get("perf/global_tokens_per_sec") or metrics.get("perf/tokens_per_sec", {})
    record.update(
        steps_logged=len(loss),
        loss={str(s): v for s, v in sorted(loss.items())},
        final_loss=loss[max(loss)] if loss else None,
        tokens_per_sec=median_after(tokens, args.skip_steps),
        tokens_per_sec_per_device=median_after(metrics.get("perf/tokens_per_sec", {}), args.skip_steps),
        step_time_s=median_after(metrics.get("perf/step_time", {}), args.skip_steps),
        peak_memory_gb=max(metrics.get("perf/peak_memory_gb", {}).values(), default=None),
        mfu=median_after(metrics.get("perf/mfu", {}), args.skip_steps),
    )
    if status == "ok" and len(loss) < args.steps:
        record["status"] = "incomplete"
    print(f"[{name}] {record['status']} in {seconds:.0f} s, {len(loss)} steps logged", flush=True)
    return record


def compare(a: dict, b: dict, window: int) -> dict:
    la = {int(s): v for s, v in (a.get("loss") or {}).items()}
    lb = {int(s): v for s, v in (b.get("loss") or {}).items()}
    steps = sorted(set(la) & set(lb))
    if not steps:
        return {"common_steps": 0}
    diffs = [abs(la[s] - lb[s]) for s in steps]
    rels = [abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in steps]
    last = steps[-window:]
    mean_a, mean_b = (statistics.fmean(x[s] for s in last) for x in (la, lb))
    first = steps[:window]
    first_a, first_b = (statistics.fmean(x[s] for s in first) for x in (la, lb))
    out = {"common_steps": len(steps), "step0_abs_diff": abs(la[steps[0]] - lb[steps[0]]),
           "max_abs_diff": max(diffs), "max_rel_diff": max(rels), "mean_abs_diff": statistics.fmean(diffs),
           f"first{window}_mean": [first_a, first_b], f"last{window}_mean": [mean_a, mean_b],
           f"last{window}_rel_diff": abs(mean_a - mean_b) / max(abs(mean_a), 1e-12)}
    if a.get("tokens_per_sec") and b.get("tokens_per_sec"):
        out["tokens_per_sec_ratio"] = b["tokens_per_sec"] / a["tokens_per_sec"]
    return out


def fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu and args.experiment == "vsa_300m":
        args.experiment = "tiny"
    if args.cpu and args.num_workers == 4:
        args.num_workers = 0
    args.out = args.out.resolve()
    runs = run_commands(args)
    if args.dry_run:
        for name, spec in runs.items():
            prefix = " ".join(f"{k}={v}" for k, v in spec["env"].items())
            print(f"{name}: {prefix + ' ' if prefix else ''}python train.py {' '.join(spec['overrides'])}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    import platform

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "argv": sys.argv[1:],
            "experiment": args.experiment, "global_batch": args.global_batch, "steps": args.steps,
            "seed": args.seed}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        info["torch_error"] = repr(exc)
    if not args.cpu and len(info.get("gpus", [])) < 2:
        print(f"warning: {len(info.get('gpus', []))} GPU(s) visible; the 2-GPU runs will fail", flush=True)

    deadline = time.monotonic() + args.budget
    results = {}
    for name, spec in runs.items():
        timeout = min(args.timeout, deadline - time.monotonic())
        try:
            results[name] = run_one(name, spec, args, timeout)
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the others
            results[name] = {"status": "error", "error": repr(exc)}
    comparisons = {}
    for a, b in (("single", "ddp"), ("single", "fsdp"), ("ddp", "fsdp")):
        if a in results and b in results:
            comparisons[f"{a}_vs_{b}"] = compare(results[a], results[b], args.window)
    report = {"info": info, "runs": results, "comparisons": comparisons}
    path = args.out / "multi_gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{args.experiment}, global batch {args.global_batch}, {args.steps} steps, seed {args.seed}")
    print("| run | status | time s | steps | final loss | tokens/s (all GPUs) | tokens/s/device | step s | peak GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r.get('status')} | {fmt(r.get('seconds'), '.0f')} | {r.get('steps_logged', 0)} | "
              f"{fmt(r.get('final_loss'))} | {fmt(r.get('tokens_per_sec'), ',.0f')} | "
              f"{fmt(r.get('tokens_per_sec_per_device'), ',.0f')} | {fmt(r.get('step_time_s'), '.3f')} | "
              f"{fmt(r.get('peak_memory_gb'), '.1f')} |")
    print(f"\n| pair | steps | step-0 diff | max abs diff | max rel diff | last-{args.window} means | "
          "last-window rel diff | tokens/s ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for pair, c in comparisons.items():
        means = c.get(f"last{args.window}_mean")
        print(f"| {pair} | {c.get('common_steps', 0)} | {fmt(c.get('step0_abs_diff'))} | "
              f"{fmt(c.get('max_abs_diff'))} | {fmt(c.get('max_rel_diff'))} | "
              f"{' / '.join(fmt(m) for m in means) if means else '-'} | {fmt(c.get(f'last{args.window}_rel_diff'))} | "
              f"{fmt(c.get('tokens_per_sec_ratio'), '.2f')} |")
    print(f"\nwrote {path}")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
