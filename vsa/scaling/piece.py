"""Run the points of a sweep that fit a time limit, one `train.py` launch per point, keeping every
finished row: a piece of a sweep on a lent or preemptible GPU whose files do not outlive it.

    python -m vsa.scaling.piece iso_footage --seconds 540 scaling.presets=[20m]
    python -m vsa.scaling.piece iso_footage --seconds 540 --order cheapest seed=1

1. restores the committed rows (default docs/results/SWEEP/rows) into the sweep's run folders, and
   collects the rows of runs an earlier piece finished on this machine, so finished points are
   skipped;
2. lists the points left with their estimated GPU time (`vsa.scaling.plan`: measured step times x
   steps + `--overhead` seconds a run) and launches, one at a time, each point whose estimate x
   `--margin` fits the time still left, in grid order (the order of scaling.presets, then
   scaling.attentions, then the budgets) or cheapest first. A point that does not fit is left for
   the next piece and the later, shorter points still run. Points without an estimate (no
   measured row of their attention at this shape anywhere) run last, within what is left;
3. copies every finished row back after each run, and prints what ran, what was left and why.

A run still going at the deadline gets SIGTERM (it saves `last.ckpt` and resumes when launched
again on the same machine), then SIGKILL `--stop-seconds` (30) later; that deadline is
`--stop-seconds` before the end of the piece, so a stopped run's save fits in `--seconds`. A
point whose run folder holds such a `last.ckpt` is estimated for the steps it has left.
`--partial`: when no point fits, launch the cheapest one anyway, to be stopped and saved at the
deadline and finished by the next piece on the same machine (so a point longer than one launch can
run, e.g. 60M VSA at x8 under a 10-minute limit). Extra arguments are train.py overrides of every
point; `scaling.presets=[...]`, `scaling.attentions=[...]`, `scaling.multiples=[...]` or
`scaling.budgets=[...]` narrow the grid.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from vsa.scaling.plan import CONFIG_DIR, attention_name, check_sweep, plan, point_key
from vsa.scaling.rows import RESULT_FILE, collect_rows, find_rows, restore_rows

REPO = CONFIG_DIR.parent
GRID_AXES = {"model": "scaling.presets", "attention": "scaling.attentions",
             "scaling.multiple": "scaling.multiples", "scaling.budget": "scaling.budgets"}


def launch_overrides(point: dict) -> list[str]:
    """The train.py -m overrides that run exactly this grid point: each grid axis narrowed to the
    point's value (the run folder stays the one a whole-grid launch gives it), then the extra
    overrides of every point."""
    narrowed, extra = [], []
    for override in point["overrides"]:
        key, _, value = override.partition("=")
        if key in GRID_AXES:
            narrowed.append(f"{GRID_AXES[key]}=[{value}]")
        elif key not in GRID_AXES.values():  # the grid as given: replaced by the point's value
            extra.append(override)
    return [*narrowed, *extra]


def steps_done(runs_dir: Path) -> dict[tuple, int]:
    """The training step of every unfinished run under `runs_dir` that saved a `last.ckpt` (a run
    stopped at an earlier piece's deadline), keyed like `vsa.scaling.plan.point_key`."""
    import torch
    from omegaconf import OmegaConf

    done = {}
    for last in sorted(runs_dir.glob("*/checkpoints/last.ckpt")):
        run = last.parent.parent
        config, overrides = run / ".hydra" / "config.yaml", run / ".hydra" / "overrides.yaml"
        if (run / RESULT_FILE).is_file() or not config.is_file():
            continue
        cfg = OmegaConf.load(config)
        attention = attention_name({"attention": cfg.attention.name,
                                    "overrides": list(OmegaConf.load(overrides)) if overrides.is_file() else []})
        try:
            step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:  # unreadable: train.py says so when it resumes; estimate the whole run
            continue
        done[point_key(cfg.model.name, attention, cfg.scaling.budget, cfg.seed)] = step
    return done


def with_progress(left: list[dict], done: dict[tuple, int], overhead_s: float) -> list[dict]:
    """`left` with each point that has a saved step estimated for the steps it has left (its
    "done_steps" set): est = overhead + (steps - done) / steps x (est - overhead)."""
    out = []
    for p in left:
        step = done.get(point_key(p["preset"], p["attention"], p["budget"], p["seed"]))
        if step:
            p = dict(p, done_steps=step)
            if p["est_s"] is not None:
                share = max(p["steps"] - step, 0) / max(p["steps"], 1)
                p["est_s"] = overhead_s + share * (p["est_s"] - overhead_s)
        out.append(p)
    return out


def choose(left: list[dict], remaining_s: float, margin: float, order: str = "grid",
           partial: bool = False) -> dict | None:
    """The next point to launch with `remaining_s` seconds left: the first (in grid order, or the
    cheapest) whose estimate x `margin` fits; else the first point without an estimate; else, with
    `partial`, the cheapest point (it will not finish: it is stopped and saved at the deadline);
    else None."""
    if order not in ("grid", "cheapest"):
        raise ValueError(f"order must be 'grid' or 'cheapest', not {order!r}")
    known = [p for p in left if p["est_s"] is not None]
    if order == "cheapest":
        known.sort(key=lambda p: p["est_s"])
    for p in known:
        if p["est_s"] * margin <= remaining_s:
            return p
    unestimated = next((p for p in left if p["est_s"] is None), None)
    if unestimated is not None or not partial or not known:
        return unestimated
    return min(known, key=lambda p: p["est_s"])


def run_point(sweep: str, point: dict, log_dir: str, timeout_s: float, python: str,
              grace_s: float = 30.0) -> int:
    """Launch train.py for one point; SIGTERM at `timeout_s`, SIGKILL `grace_s` later. Its exit
    status (-SIGTERM / -SIGKILL when stopped)."""
    command = [python, "train.py", "-m", f"sweep={sweep}", f"paths.log_dir={log_dir}", *launch_overrides(point)]
    print("+ " + " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=REPO)
    try:
        return process.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return -signal.SIGTERM


def run_piece(sweep: str, seconds: float, overrides: list[str] = (), rows_dir: str | Path | None = None,
              log_dir: str = "logs", margin: float = 1.1, overhead_s: float = 45.0, order: str = "grid",
              results_dir: str | Path | None = None, device: str | None = None,
              python: str = sys.executable, dry_run: bool = False, partial: bool = False,
              stop_s: float = 30.0) -> dict:
    """Run what fits of `sweep` in `seconds` (module docstring). Returns {"ran": [(point, status,
    seconds)], "left": the points still without a row, "rows": the rows folder}. `dry_run`: launch
    nothing and restore nothing; list what would launch if every run took its estimate (status
    None; "partial" for a launch that would not finish), stopping at the first point without an
    estimate. `partial`: when nothing fits, launch the cheapest point anyway, to be stopped and
    saved at the deadline (`choose`). `stop_s`: the deadline is this many seconds before the end of
    the piece, the time a stopped run gets to save its checkpoint (a run took ~20 s on an H100)."""
    check_sweep(sweep)
    if seconds <= 0 or margin <= 0:
        raise ValueError("seconds and margin must be > 0")
    if not 0 <= stop_s < seconds:
        raise ValueError(f"the stop time ({stop_s} s) must be >= 0 and less than the piece's {seconds} s")
    start = time.monotonic()
    deadline = start + seconds - stop_s
    results = Path(results_dir) if results_dir is not None else REPO / "docs" / "results"
    rows_dir = Path(rows_dir) if rows_dir is not None else results / sweep / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(log_dir) if Path(log_dir).is_absolute() else REPO / log_dir
    runs_dir = runs_dir / "train" / "multiruns" / sweep
    if not dry_run:
        restored = restore_rows(rows_dir, runs_dir)
        # Runs that an earlier piece on this machine finished, whose rows are not in this rows
        # folder (a fresh copy of the code replaced it): collected, so they are not relaunched.
        before = {p.name for p in rows_dir.glob("*.json")}
        found = collect_rows(runs_dir, rows_dir) if runs_dir.is_dir() else []
        print(f"piece: {len(restored)} committed row(s) restored into {runs_dir}; "
              f"{sum(p.name not in before for p in found)} row(s) of runs finished here collected", flush=True)
    left = plan(sweep, rows_dir, overhead_s=overhead_s, extra=list(overrides), device=device,
                results_dir=results)["left"]
    left = with_progress(left, steps_done(runs_dir) if runs_dir.is_dir() else {}, overhead_s)
    ran = []
    while left:
        remaining = deadline - time.monotonic()
        point = choose(left, remaining, margin, order, partial)
        if point is None or remaining < 1.0:
            break
        if dry_run:
            if point["est_s"] is None:
                break
            left.remove(point)
            fits = point["est_s"] * margin <= remaining  # else a partial launch: it takes what is left
            spent = point["est_s"] if fits else remaining
            ran.append((point, None if fits else "partial", spent))
            deadline -= spent
            continue
        left.remove(point)
        t0 = time.monotonic()
        status = run_point(sweep, point, str(log_dir), remaining, python, grace_s=max(stop_s, 1.0))
        ran.append((point, status, time.monotonic() - t0))
        if runs_dir.is_dir():
            collect_rows(runs_dir, rows_dir)
    used = sum(spent for _, _, spent in ran) if dry_run else time.monotonic() - start
    print(f"\npiece: {len(ran)} launch(es) in {used:.0f} of {seconds:.0f} s"
          + (" (dry run: nothing launched; each run taken at its estimate)" if dry_run else ""))
    for point, status, spent in ran:
        what = {0: "finished", None: "would launch", "partial": "would launch, to be stopped and saved at the deadline",
                -signal.SIGTERM: "stopped at the deadline (resumes from last.ckpt on this machine)"}
        est = "no estimate" if point["est_s"] is None else f"estimated {point['est_s']:.0f} s"
        if point.get("done_steps"):
            est += f", resumed at step {point['done_steps']} of {point['steps']}"
        print(f"  {' '.join(point['overrides'])}: {what.get(status, f'exit status {status}')}, "
              f"{spent:.0f} s ({est})")
    for point in left:
        est = "no estimate" if point["est_s"] is None else f"needs ~{point['est_s'] * margin:.0f} s"
        if point.get("done_steps"):
            est += f"; saved at step {point['done_steps']} of {point['steps']} here"
        print(f"  left for the next piece: {' '.join(point['overrides'])} ({est})")
    print(f"piece: {len(find_rows(rows_dir))} row(s) in {rows_dir}", flush=True)
    return {"ran": ran, "left": left, "rows": rows_dir}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vsa.scaling.piece", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a sweep config name (configs/sweep/), e.g. iso_footage")
    ap.add_argument("overrides", nargs="*", help="train.py overrides of every point, e.g. scaling.presets=[20m]")
    ap.add_argument("--seconds", type=float, required=True, help="the time limit of the whole piece")
    ap.add_argument("--rows", default=None, help="the sweep's rows (default: docs/results/SWEEP/rows)")
    ap.add_argument("--log-dir", default="logs", help="paths.log_dir of the runs (default: logs)")
    ap.add_argument("--order", default="grid", choices=("grid", "cheapest"), help="which fitting point first")
    ap.add_argument("--margin", type=float, default=1.1, help="launch a point only if estimate x margin fits")
    ap.add_argument("--overhead", type=float, default=45.0, help="seconds a run costs beside its steps")
    ap.add_argument("--device", default=None, help="estimate with the rows of this device only, e.g. H100")
    ap.add_argument("--stop-seconds", type=float, default=30.0,
                    help="a run still going this long before the end is stopped, so its save fits (default 30)")
    ap.add_argument("--dry-run", action="store_true", help="list what would launch; launch nothing")
    ap.add_argument("--partial", action="store_true",
                    help="when nothing fits, launch the cheapest point anyway; it is saved at the deadline "
                         "and the next piece on this machine finishes it")
    args = ap.parse_intermixed_args(argv)  # options before or after the overrides
    try:
        run_piece(args.sweep, args.seconds, args.overrides, args.rows, args.log_dir, args.margin, args.overhead,
                  args.order, device=args.device, dry_run=args.dry_run, partial=args.partial,
                  stop_s=args.stop_seconds)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
