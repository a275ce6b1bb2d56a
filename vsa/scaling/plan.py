"""What is left of a sweep and what it will cost: every grid point without a result row, its steps
(from its budget, with the FLOP counter, as the sweep derives them) and its GPU time estimated from
the rows already measured, then which points fit the next session's device minutes.

    python -m vsa.scaling.plan iso_footage                         # rows: docs/results/iso_footage/rows
    python -m vsa.scaling.plan iso_footage --minutes 25 seed=1     # a second seed's points
    python -m vsa.scaling.plan iso_shapes --device H200            # timed with H200 rows only

Estimates: a point's steps x the median step time of the measured rows of the same model and
attention config, from any committed sweep of the same sequence length and batch (a step's time
does not depend on the data; in the sweep's compile mode where there are such rows); for a model
without rows, the time per training FLOP of the nearest measured model with that attention, times
the point's FLOPs; plus `--overhead` seconds a run (start-up, compilation, validation, the row). A
point with no measured row of its attention gets no estimate. Extra arguments are train.py
overrides of every point (e.g. seed=1).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def sweep_names() -> list[str]:
    """The sweep configs (configs/sweep/*.yaml), without the shared `_` parts."""
    return sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml") if not p.stem.startswith("_"))


def check_sweep(sweep: str) -> None:
    """Raise ValueError, naming the sweeps there are, unless `sweep` is one of `sweep_names()`."""
    if sweep not in sweep_names():
        raise ValueError(f"no sweep named {sweep!r}; give one of {', '.join(sweep_names())} (configs/sweep/)")


def compose_point(sweep: str, overrides: list[str]) -> DictConfig:
    """The train config of `sweep` with `overrides` (one grid point), resolvers registered."""
    from hydra import compose, initialize_config_dir

    import vsa.scaling  # noqa: F401  (registers steps_for_budget, budget_for, ...)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"sweep={sweep}", *overrides])


def grid_points(sweep: str, extra: list[str] = ()) -> list[dict]:
    """Every point of the sweep's grid (scaling.presets x scaling.attentions x scaling.multiples or
    scaling.budgets): its overrides, model, attention, budget, steps and training FLOPs."""
    from vsa.scaling.budget import run_spec

    cfg = compose_point(sweep, list(extra))
    axis = ("scaling.multiple", cfg.scaling.multiples) if cfg.scaling.get("multiples") else \
        ("scaling.budget", cfg.scaling.budgets)
    points = []
    for preset in cfg.scaling.presets:
        for attention in cfg.scaling.attentions:
            for value in axis[1]:
                overrides = [f"model={preset}", f"attention={attention}", f"{axis[0]}={value}", *extra]
                point = compose_point(sweep, overrides)
                spec = run_spec(point)
                steps = int(point.trainer.max_steps)
                module = point.module
                points.append({"overrides": overrides, "preset": point.model.name, "attention": attention,
                               "budget": float(point.scaling.budget), "seed": int(point.seed), "steps": steps,
                               "flops": spec.flops_for_steps(steps), "global_batch": spec.global_batch,
                               "seq_len": math.prod(spec.dit.token_grid(spec.latent_shape[1:])),
                               "compile": str(module.compile_mode or "default") if module.compile_blocks else None})
    return points


def attention_name(row: dict) -> str:
    """The attention config a row was trained with (`attention=vsa75` among its overrides), else
    its backend's name."""
    for override in row.get("overrides") or ():
        if override.startswith("attention="):
            return override.split("=", 1)[1]
    return row["attention"]


def point_key(preset: str, attention: str, budget: float, seed) -> tuple:
    """What identifies a grid point: model preset, attention config, budget, seed."""
    return preset, attention, round(math.log2(float(budget)), 6), int(seed or 0)


def estimate(points: list[dict], rows: list[dict], overhead_s: float, timing: list[dict] | None = None) -> list[dict]:
    """The points without a row among `rows`, each with "est_s" (None: nothing to estimate from)
    and "basis". Times come from `timing` (default: `rows`), the rows of the points' sequence
    length and global batch (a step's time does not depend on the data), in the points' compile
    mode when there are any (eager rows of a sweep now compiled would overstate it)."""
    done = {point_key(r["preset"], attention_name(r), r["budget"], r.get("seed")) for r in rows}
    shapes = {(p["seq_len"], p["global_batch"]) for p in points}
    timed = [r for r in (rows if timing is None else timing)
             if r.get("step_time_s") and r.get("flops") and r.get("steps")
             and (r.get("seq_len"), r.get("global_batch")) in shapes]
    modes = {p["compile"] for p in points}
    if any(r.get("compile") in modes for r in timed):
        timed = [r for r in timed if r.get("compile") in modes]
    step_times: dict[tuple, list[float]] = {}
    per_flop: dict[tuple, list[tuple[float, float]]] = {}
    for r in timed:
        step_times.setdefault((r["preset"], attention_name(r)), []).append(r["step_time_s"])
        per_flop.setdefault((attention_name(r),), []).append(
            (float(r["params"]), r["step_time_s"] * r["steps"] / r["flops"]))
    left = []
    for p in points:
        if point_key(p["preset"], p["attention"], p["budget"], p["seed"]) in done:
            continue
        p = dict(p)
        measured = step_times.get((p["preset"], p["attention"]))
        if measured:
            p["est_s"] = p["steps"] * statistics.median(measured) + overhead_s
            p["basis"] = f"step time of {len(measured)} {p['preset']} {p['attention']} row(s)"
        elif per_flop.get((p["attention"],)):
            params = _preset_params(p["preset"])
            near_params, seconds_per_flop = min(per_flop[(p["attention"],)],
                                                key=lambda pf: abs(math.log(pf[0] / params)))
            p["est_s"] = p["flops"] * seconds_per_flop + overhead_s
            p["basis"] = f"s/FLOP of the {near_params / 1e6:.0f}M {p['attention']} rows"
        else:
            p["est_s"], p["basis"] = None, f"no measured {p['attention']} row"
        left.append(p)
    return left


@functools.cache
def _preset_params(preset: str) -> float:
    from vsa.models import preset_params

    return float(preset_params(preset))


def plan(sweep: str, rows_dir: str | Path | None = None, minutes: float | None = None, overhead_s: float = 45.0,
         extra: list[str] = (), device: str | None = None, results_dir: str | Path | None = None) -> dict:
    """{"points", "left" (with estimates), "fits" (the cheapest left points within `minutes`)}.
    `device`: time only with rows whose device name contains it (e.g. "H200"). `results_dir`: the
    folder of committed sweeps (SWEEP/rows, SWEEP/timings) whose step times it borrows (default
    docs/results)."""
    from vsa.scaling.rows import find_rows

    results = Path(results_dir) if results_dir is not None else CONFIG_DIR.parent / "docs" / "results"
    rows_dir = Path(rows_dir) if rows_dir is not None else results / sweep / "rows"
    rows = find_rows(rows_dir) if rows_dir.is_dir() else []
    # Step times from every committed sweep and its timing runs (same shape, same model: same step,
    # whatever the data).
    timing = list(rows)
    seen = {r["_path"] for r in rows}
    for folder in sorted([*results.glob("*/rows"), *results.glob("*/timings")]):
        timing += [r for r in find_rows(folder) if r["_path"] not in seen]
    if device:
        timing = [r for r in timing if device.lower() in str(r.get("device", "")).lower()]
    points = grid_points(sweep, list(extra))
    left = estimate(points, rows, overhead_s, timing)
    fits, spent = [], 0.0
    if minutes is not None:
        for p in sorted((p for p in left if p["est_s"] is not None), key=lambda p: p["est_s"]):
            if spent + p["est_s"] > 60.0 * minutes:
                break
            fits.append(p)
            spent += p["est_s"]
    return {"points": points, "rows": len(rows), "left": left, "fits": fits, "fits_s": spent}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a sweep config name (configs/sweep/), e.g. iso_footage")
    ap.add_argument("overrides", nargs="*", help="train.py overrides of every point, e.g. seed=1")
    ap.add_argument("--rows", default=None, help="the sweep's rows (default: docs/results/SWEEP/rows)")
    ap.add_argument("--minutes", type=float, default=None, help="device minutes to fill, cheapest points first")
    ap.add_argument("--overhead", type=float, default=45.0, help="seconds a run costs beside its steps")
    ap.add_argument("--device", default=None, help="time with the rows of this device only, e.g. H200")
    args = ap.parse_args(argv)
    try:
        check_sweep(args.sweep)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    result = plan(args.sweep, args.rows, args.minutes, args.overhead, args.overrides, args.device)
    left, known = result["left"], [p for p in result["left"] if p["est_s"] is not None]
    print(f"{args.sweep}: {len(result['points'])} grid points, {len(result['points']) - len(left)} with rows "
          f"({result['rows']} rows read), {len(left)} left; estimated {sum(p['est_s'] for p in known) / 60:.1f} "
          f"GPU-minutes for {len(known)} of them")
    print("| model | attention | budget | seed | steps | est. minutes | basis |")
    print("|---|---|---:|---:|---:|---:|---|")
    for p in left:
        est = "-" if p["est_s"] is None else f"{p['est_s'] / 60:.1f}"
        print(f"| {p['preset']} | {p['attention']} | {p['budget']:.2e} | {p['seed']} | {p['steps']} | {est} | "
              f"{p['basis']} |")
    if args.minutes is not None:
        print(f"\nWithin {args.minutes:g} minutes (cheapest first, {result['fits_s'] / 60:.1f} estimated):")
        for p in result["fits"]:
            print("  " + " ".join(p["overrides"]))
    return result


if __name__ == "__main__":
    main()
