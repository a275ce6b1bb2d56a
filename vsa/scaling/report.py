"""Scaling report: `python -m vsa.scaling.report SWEEP_DIR [--out DIR]`.

Collects every result.json under SWEEP_DIR and, per attention type (full, vsa, or vsa@sparsity
when a sweep holds several sparsities):

- the lower envelope of loss vs training FLOPs (the compute frontier: each point beats every
  cheaper one), and a fit of the frontier L(C) = E + A * C^-alpha (least squares in log L);
- IsoFLOP curves: loss vs parameters per budget, with the minimum of a parabola in log params;
- the compute multiplier of each sparse type over full attention at equal loss,
  C_full(L) / C_sparse(L), read off the two envelopes (log-log interpolation) over the loss range
  both cover, reported at the lowest loss both reach, with a bootstrap interval; from the fits too
  when both are determined;
- the same comparison in GPU time: loss vs measured GPU-seconds (steps x the median step time of
  the run's configuration on one device: the one that timed the most configurations), envelopes and the time multiplier;
  with --timings (default: a `timings` folder beside a `rows` folder), the step times come from
  timing runs, short runs of every configuration made together on one GPU, instead of from the
  result rows (which may span sessions, kernel versions and GPUs);
- the measurement noise: the validation set's standard error per run, and the spread between
  seeds where a point was run with several;
- the attention share of the training FLOPs per model.

Points and seeds: rows of one (model, attention, budget) point with different seeds are averaged
into one point. The bootstrap perturbs every point by its measured noise: its seeds resampled
with replacement (points run with one seed get the relative seed spread pooled over the points
run with several), plus a normal draw of the validation standard error; each resample rebuilds
both envelopes and reads the multiplier again. Its 5th-95th percentiles are the interval.

Writes report.md, summary.json and PNG plots (loss_vs_flops.png, isoflop.png, multiplier.png) to
--out (default SWEEP_DIR/report). With few points it says what it could not determine (a fit
with fewer than 4 frontier points, envelopes that do not overlap: extrapolated) and still reports
what it can.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vsa.scaling.rows import find_rows

BASELINE = "full"


# ----------------------------------------------------------------------------- rows

def row_loss(row: dict, loss: str = "auto") -> float | None:
    """The loss of a row: its chosen `val_loss` (auto), or the raw / EMA one."""
    key = {"auto": "val_loss", "raw": "val_loss_raw", "ema": "val_loss_ema"}[loss]
    value = row.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def attention_label(row: dict, vsa_sparsities: set) -> str:
    """"full", "vsa", "sta", ..., or "vsa@0.75" when the rows hold several VSA sparsities."""
    name = row["attention"]
    if name == "vsa" and len(vsa_sparsities) > 1 and row.get("sparsity") is not None:
        return f"{name}@{row['sparsity']:g}"
    return name


def compile_mode(row: dict) -> str:
    """How the run's blocks ran: "eager", or the torch.compile mode ("default", "reduce-overhead")."""
    return str(row.get("compile") or "eager")


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for label, row in labelled(rows):
        groups.setdefault(label, []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])))


# ----------------------------------------------------------------------------- points and noise

@dataclass
class Point:
    """One (model, budget) point of an attention type: the mean over its seeds."""

    preset: str
    params: float
    budget: float
    flops: float
    losses: list      # one per seed
    se: float         # validation standard error of the mean loss (0 when unknown)
    steps: float
    gpu_s: float | None = None  # steps x the configuration's median step time (None: not timed)

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))


def make_points(rows: list[dict], loss: str) -> list[Point]:
    """Average the seeds of each (preset, budget) point of one attention type's rows."""
    by_point: dict[tuple, list[dict]] = {}
    for r in rows:
        by_point.setdefault((r["preset"], float(r["budget"])), []).append(r)
    points = []
    for (preset, budget), group in sorted(by_point.items(), key=lambda kv: (kv[1][0]["params"], kv[0][1])):
        ses = [r.get("val_loss_se") for r in group]
        se = float(np.sqrt(np.mean([x * x for x in ses])) / math.sqrt(len(group))) if all(
            x is not None for x in ses) else 0.0
        points.append(Point(preset=preset, params=float(group[0]["params"]), budget=budget,
                            flops=float(np.mean([r["flops"] for r in group])),
                            losses=[row_loss(r, loss) for r in group], se=se,
                            steps=float(np.mean([r.get("steps") or 0 for r in group]))))
    return points


def seed_spread(groups_points: dict[str, list[Point]]) -> dict:
    """Relative spread between seeds, pooled over every point run with 2+ seeds: the root mean
    square of (seed loss / point mean - 1), with the number of points and seeds behind it."""
    deviations, n_points = [], 0
    for points in groups_points.values():
        for p in points:
            if len(p.losses) > 1:
                n_points += 1
                mean = p.loss
                deviations += [x / mean - 1.0 for x in p.losses]
    if not n_points:
        return {"relative_std": None, "n_points": 0, "n_runs": 0}
    # ddof: one mean per point was estimated from its own seeds
    dof = max(1, len(deviations) - n_points)
    return {"relative_std": float(math.sqrt(sum(d * d for d in deviations) / dof)), "n_points": n_points,
            "n_runs": len(deviations)}


def perturbed_losses(points: list[Point], rel_seed_std: float | None, rng) -> list[float]:
    """One bootstrap draw of the points' losses (see the module docstring)."""
    out = []
    for p in points:
        if len(p.losses) > 1:
            value = float(np.mean(rng.choice(p.losses, size=len(p.losses), replace=True)))
        elif rel_seed_std:
            value = p.loss * (1.0 + rel_seed_std * rng.standard_normal())
        else:
            value = p.loss
        out.append(max(value + p.se * rng.standard_normal(), 1e-12))
    return out


# ----------------------------------------------------------------------------- timing

def labelled(rows: list[dict], sparsities: set | None = None):
    """(attention label, row) pairs; `sparsities`: the VSA sparsities that decide the labels
    (default: the rows' own; timing rows take those of the result rows they time)."""
    if sparsities is None:
        sparsities = {r.get("sparsity") for r in rows if r["attention"] == "vsa"}
    return [(attention_label(r, sparsities), r) for r in rows]


CLOCKS = {"cuda_events": "CUDA events (no wait for the GPU inside the run)",
          "synced": "the wall clock with a wait for the GPU after every step (rows from before 2026-12-08)",
          "wall": "the wall clock (CPU)"}


def step_clock(row: dict) -> str:
    """How a row's steps were timed (`RunRecorder.clock`): "cuda_events" (no wait for the GPU),
    "wall" (CPU), or "synced" for rows from before the field existed, whose recorder waited for
    the GPU after every step (their step times include the host's time to launch each step)."""
    return str(row.get("step_clock") or "synced")


def timing_source(rows: list[dict], mode: str, sparsities: set | None = None) -> tuple[str, str] | None:
    """The (device, step clock) whose step times the GPU-time comparison uses for compile `mode`:
    the one that times the most configurations in that mode (ties: CUDA events before a per-step
    wait, then the most rows, then the name). Step times from different GPUs (an H100 and an H200
    row of one sweep) or clocks are never mixed."""
    configs: dict[tuple[str, str], set] = {}
    counts: dict[tuple[str, str], int] = {}
    for label, r in labelled(rows, sparsities):
        if compile_mode(r) == mode and r.get("step_time_s"):
            source = (str(r.get("device")), step_clock(r))
            configs.setdefault(source, set()).add((r["preset"], label))
            counts[source] = counts.get(source, 0) + 1
    if not configs:
        return None
    return max(sorted(configs), key=lambda d: (len(configs[d]), d[1] != "synced", counts[d]))


def step_time_table(rows: list[dict], mode: str, sparsities: set | None = None) -> dict[tuple[str, str], float]:
    """Median step time (s) per (preset, attention label) over the rows run in compile `mode` on
    the timing device with its clock (`timing_source`). A step's cost depends on the model,
    attention, batch and tokens, not on the run's budget, so every run of a configuration gets the
    same per-step time: its measured median. `rows` are the result rows themselves, or timing rows
    (short runs of each configuration made together on one GPU: `summarize(timings=...)`)."""
    source = timing_source(rows, mode, sparsities)
    times: dict[tuple[str, str], list[float]] = {}
    for label, r in labelled(rows, sparsities):
        if (compile_mode(r) == mode and r.get("step_time_s")
                and (str(r.get("device")), step_clock(r)) == source):
            times.setdefault((r["preset"], label), []).append(float(r["step_time_s"]))
    return {key: float(np.median(values)) for key, values in times.items()}


def timing_mode(rows: list[dict], wanted: str = "auto", sparsities: set | None = None) -> str | None:
    """The compile mode whose step times the GPU-time comparison uses: `wanted`, or (auto) the one
    that times the most configurations (ties: a compiled mode before eager)."""
    modes = {compile_mode(r) for r in rows if r.get("step_time_s")}
    if wanted != "auto":
        return wanted if wanted in modes else None
    if not modes:
        return None
    return max(sorted(modes), key=lambda m: (len(step_time_table(rows, m, sparsities)), m != "eager"))


# ----------------------------------------------------------------------------- frontier

def lower_envelope(points) -> list[tuple[float, float]]:
    """The compute frontier of (flops, loss) points: sorted by flops, each point's loss below
    that of every point with fewer flops."""
    frontier: list[tuple[float, float]] = []
    for c, loss in sorted(points):
        if not frontier or loss < frontier[-1][1]:
            if frontier and c == frontier[-1][0]:
                frontier[-1] = (c, loss)
            else:
                frontier.append((c, loss))
    return frontier


def envelope_flops_at(frontier, loss: float) -> tuple[float, bool]:
    """FLOPs the frontier needs to reach `loss` (log-log interpolation between its points;
    linear extrapolation of the end segment outside them) and whether it extrapolated.
    NaN for a frontier of fewer than 2 points unless `loss` is one of its losses."""
    if not frontier:
        return math.nan, True
    log_c = np.log([c for c, _ in frontier])
    log_l = np.log([l for _, l in frontier])  # decreasing
    target = math.log(loss)
    if len(frontier) == 1:
        return (float(frontier[0][0]), False) if math.isclose(target, log_l[0]) else (math.nan, True)
    inside = log_l[-1] <= target <= log_l[0]
    if inside:
        i = int(np.searchsorted(-log_l, -target, side="right"))
        i = min(max(i, 1), len(frontier) - 1)
    else:
        i = 1 if target > log_l[0] else len(frontier) - 1
    l0, l1, c0, c1 = log_l[i - 1], log_l[i], log_c[i - 1], log_c[i]
    value = c0 + (target - l0) * (c1 - c0) / (l1 - l0)
    return float(math.exp(value)), not inside


# ----------------------------------------------------------------------------- power-law fit

@dataclass
class PowerLawFit:
    """L(C) = E + A * C^-alpha, fitted to frontier points."""

    E: float = math.nan
    A: float = math.nan
    alpha: float = math.nan
    n_points: int = 0
    status: str = "underdetermined"  # ok | exact | at_bound | underdetermined | failed
    message: str = ""
    rmse_log: float = math.nan  # root mean square of log(L_fit / L)

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "exact") and math.isfinite(self.alpha)

    def loss(self, flops):
        return self.E + self.A * np.asarray(flops, dtype=float) ** -self.alpha

    def flops_at(self, loss: float) -> float:
        """C(L), the inverse; inf at or below the irreducible loss E."""
        if not self.usable or loss <= self.E:
            return math.inf
        return float((self.A / (loss - self.E)) ** (1.0 / self.alpha))


def fit_power_law(flops, losses) -> PowerLawFit:
    """Fit L = E + A C^-alpha by least squares on log L (so every point weighs the same).

    C is scaled by its geometric mean, x = log(C / C_ref), and the model is written
    log L = log(E + exp(a - alpha x)) with A = exp(a) C_ref^alpha. Bounds: 0 <= E < min L,
    1e-3 <= alpha <= 5. Several starts (E = 0, 0.5 min L, 0.9 min L, each with a and alpha from a
    line through log(L - E)); the best one wins. 4+ points: "ok"; 3: "exact" (as many parameters
    as points); 2: E fixed at 0, "underdetermined"; fewer: no fit.
    """
    from scipy.optimize import curve_fit

    c = np.asarray(flops, dtype=float)
    y = np.asarray(losses, dtype=float)
    n = len(c)
    if n != len(y) or n == 0 or np.any(c <= 0) or np.any(y <= 0):
        return PowerLawFit(n_points=n, status="failed", message="need positive FLOPs and losses, one each")
    if n < 2 or len(np.unique(c)) < 2:
        return PowerLawFit(n_points=n, message=f"{n} frontier point(s): no fit (needs 2+ budgets)")
    log_ref = float(np.mean(np.log(c)))
    x = np.log(c) - log_ref
    log_y = np.log(y)
    if n == 2:  # E = 0: a straight line in log-log through both points
        alpha = -(log_y[1] - log_y[0]) / (x[1] - x[0])
        a = log_y[0] + alpha * x[0]
        fit = PowerLawFit(E=0.0, A=math.exp(a + alpha * log_ref), alpha=float(alpha), n_points=2,
                          message="2 frontier points: E fixed at 0 (pure power law), E/A/alpha underdetermined")
        fit.rmse_log = 0.0
        return fit

    def model(x, E, a, alpha):
        return np.log(E + np.exp(a - alpha * x))

    upper_e = float(y.min()) * (1 - 1e-6)
    best = None
    for e0 in (0.0, 0.5 * upper_e, 0.9 * upper_e):
        slope, intercept = np.polyfit(x, np.log(y - e0), 1)
        p0 = [e0, float(np.clip(intercept, -49, 49)), float(np.clip(-slope, 2e-3, 4.9))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params, _ = curve_fit(model, x, log_y, p0=p0, bounds=([0.0, -50, 1e-3], [upper_e, 50, 5.0]),
                                      maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((model(x, *params) - log_y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, params)
    if best is None:
        return PowerLawFit(n_points=n, status="failed", message="curve_fit did not converge from any start")
    sse, (E, a, alpha) = best
    fit = PowerLawFit(E=float(E), A=float(math.exp(a + alpha * log_ref)), alpha=float(alpha), n_points=n,
                      status="ok" if n >= 4 else "exact", rmse_log=math.sqrt(sse / n))
    if n == 3:
        fit.message = "3 frontier points for 3 parameters: the fit passes through them (no error estimate)"
    at_alpha = alpha <= 1.001e-3 or alpha >= 4.99
    if at_alpha or E >= upper_e * 0.999 or E <= upper_e * 1e-6:
        bound = ("alpha" if at_alpha else "E (at the lowest loss)" if E >= upper_e * 0.999
                 else "E (at 0: a pure power law)")
        fit.status = "at_bound"
        fit.message = (fit.message + "; " if fit.message else "") + (
            f"{bound} sits at its bound: the points do not determine the law (more budgets, or longer runs)")
    return fit


# ----------------------------------------------------------------------------- IsoFLOP

def isoflop_curves(points: list[Point]) -> list[dict]:
    """Per budget: (params, loss) of each model, and the minimum of a parabola in log10(params)."""
    curves = []
    for budget in sorted({p.budget for p in points}):
        pts = sorted((p.params, p.loss) for p in points if p.budget == budget)
        curve = {"budget": budget, "params": [n for n, _ in pts], "loss": [l for _, l in pts],
                 "opt_params": None, "opt_loss": None, "note": ""}
        logs = np.log10([n for n, _ in pts]) if pts else np.array([])
        if len(np.unique(logs)) < 3:
            curve["note"] = f"{len(pts)} model size(s): no parabola (needs 3+)"
            if pts:
                n_best, l_best = min(pts, key=lambda p: p[1])
                curve.update(opt_params=n_best, opt_loss=l_best, note=curve["note"] + "; best run shown")
        else:
            a, b, c0 = np.polyfit(logs, curve["loss"], 2)
            if a <= 0:
                n_best, l_best = min(pts, key=lambda p: p[1])
                curve.update(opt_params=n_best, opt_loss=l_best, note="parabola has no minimum; best run shown")
            else:
                x_opt = -b / (2 * a)
                curve.update(opt_params=float(10 ** x_opt), opt_loss=float(c0 - b * b / (4 * a)),
                             coeffs=[float(a), float(b), float(c0)])
                if not logs.min() <= x_opt <= logs.max():
                    curve["note"] = "minimum outside the sizes run (extrapolated)"
        curves.append(curve)
    return curves


# ----------------------------------------------------------------------------- multiplier

def multiplier_at(base_frontier, sparse_frontier, loss: float) -> tuple[float, bool]:
    """C_base(loss) / C_sparse(loss) from two frontiers, and whether either was extrapolated."""
    c_base, ext_base = envelope_flops_at(base_frontier, loss)
    c_sparse, ext_sparse = envelope_flops_at(sparse_frontier, loss)
    return c_base / c_sparse, ext_base or ext_sparse


def reference_loss(base_frontier, sparse_frontier) -> tuple[float, bool]:
    """The lowest loss both frontiers reach, and whether their loss ranges overlap at all (if
    not: the geometric middle of the gap between them)."""
    lo_b, hi_b = base_frontier[-1][1], base_frontier[0][1]
    lo_s, hi_s = sparse_frontier[-1][1], sparse_frontier[0][1]
    lo, hi = max(lo_b, lo_s), min(hi_b, hi_s)
    if lo <= hi:
        return lo, True
    return math.sqrt(lo * hi), False


def bootstrap_multiplier(base: list[Point], sparse: list[Point], cost: str, loss_ref: float,
                         rel_seed_std: float | None, n: int = 1000, seed: int = 0) -> dict:
    """5th-95th percentile of the envelope multiplier at `loss_ref` when every point's loss is
    redrawn from its measured noise (`perturbed_losses`); `cost` is "flops" or "gpu_s"."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        fb = lower_envelope(list(zip([getattr(p, cost) for p in base], perturbed_losses(base, rel_seed_std, rng))))
        fs = lower_envelope(list(zip([getattr(p, cost) for p in sparse], perturbed_losses(sparse, rel_seed_std, rng))))
        value, _ = multiplier_at(fb, fs, loss_ref)
        if math.isfinite(value) and value > 0:
            values.append(value)
    if len(values) < max(10, n // 10):
        return {"low": None, "high": None, "ratio": None, "n_valid": len(values), "n": n,
                "note": "too few resamples gave a finite multiplier for an interval"}
    low, high = float(np.percentile(values, 5)), float(np.percentile(values, 95))
    noise = "validation standard errors" + (" and seed spread" if rel_seed_std else " only (no seed replicates)")
    return {"low": low, "high": high, "ratio": high / low, "n_valid": len(values), "n": n,
            "note": f"90% interval (5th-95th percentile), points redrawn from their {noise}"}


def compare(base: list[Point], sparse: list[Point], cost: str, label: str, rel_seed_std: float | None,
            n_bootstrap: int, notes: list[str], fits: tuple | None = None) -> dict:
    """The multiplier of `sparse` over `base` at equal loss along `cost` ("flops" or "gpu_s")."""
    what = "compute" if cost == "flops" else "GPU time"
    fb = lower_envelope([(getattr(p, cost), p.loss) for p in base])
    fs = lower_envelope([(getattr(p, cost), p.loss) for p in sparse])
    loss_ref, overlap = reference_loss(fb, fs)
    value, extrapolated = multiplier_at(fb, fs, loss_ref)
    entry: dict = {"loss": loss_ref, "multiplier": value, "extrapolated": extrapolated,
                   "loss_ranges_overlap": overlap, "frontier_base": fb, "frontier": fs}
    if overlap:
        lo, hi = loss_ref, min(fb[0][1], fs[0][1])
        grid = np.linspace(lo, hi, 25) if hi > lo else np.array([lo])
        curve = [multiplier_at(fb, fs, float(g))[0] for g in grid]
        entry["over_overlap"] = {"loss": grid.tolist(), "multiplier": curve,
                                 "min": float(np.nanmin(curve)), "max": float(np.nanmax(curve))}
    else:
        notes.append(f"{label} vs {BASELINE} ({what}): the frontiers' loss ranges do not overlap; the "
                     "multiplier is extrapolated along the end segments")
    if len(fb) < 2 or len(fs) < 2:
        notes.append(f"{label} vs {BASELINE} ({what}): a frontier has a single point; the multiplier needs "
                     "more budgets to be reliable")
    entry["from_fits"] = None
    if fits is not None:
        fit_b, fit_s = fits
        if fit_b.usable and fit_s.usable:
            entry["from_fits"] = fit_b.flops_at(loss_ref) / fit_s.flops_at(loss_ref)
        else:
            notes.append(f"{label} vs {BASELINE}: a fit is not determined ({fit_b.status} / {fit_s.status}); "
                         "multiplier from the envelopes only")
    entry["bootstrap"] = bootstrap_multiplier(base, sparse, cost, loss_ref, rel_seed_std, n=n_bootstrap)
    return entry


# ----------------------------------------------------------------------------- summary

def summarize(rows: list[dict], loss: str = "auto", n_bootstrap: int = 1000, timing: str = "auto",
              timings: list[dict] | None = None) -> dict:
    """The report's numbers. `timings`: rows of short timing runs (every configuration of the
    sweep run for a few hundred steps in one session on one GPU); when given, the GPU-time
    comparison takes its step times from them instead of from the result rows, whose step times
    may come from different sessions, kernel versions and GPUs."""
    notes: list[str] = []
    usable = [r for r in rows if row_loss(r, loss) is not None]
    if len(usable) < len(rows):
        notes.append(f"{len(rows) - len(usable)} row(s) without a {loss} validation loss left out")
    if not usable:
        raise ValueError(f"no result row with a {loss} validation loss; use --loss auto, raw or ema")
    for key in ("seq_len", "global_batch"):
        values = sorted({r.get(key) for r in usable}, key=str)
        if len(values) > 1:
            notes.append(f"rows differ in {key} ({values}): they are compared on FLOPs alone")
    groups = group_rows(usable)
    points = {label: make_points(group, loss) for label, group in groups.items()}
    spread = seed_spread(points)
    sparsities = {r.get("sparsity") for r in usable if r["attention"] == "vsa"}
    timed, source = usable, "the result rows"
    if timings:
        runs = {(r.get("seq_len"), r.get("global_batch"), r["attention"], r.get("sparsity")) for r in usable}
        timed = [r for r in timings if (r.get("seq_len"), r.get("global_batch"), r["attention"], r.get("sparsity"))
                 in runs]
        if len(timed) < len(timings):
            notes.append(f"{len(timings) - len(timed)} timing row(s) of a sequence length, batch or attention "
                         "that no result row has left out")
        source = f"timing runs ({len(timed)})"
    mode = timing_mode(timed, timing, sparsities)
    table = step_time_table(timed, mode, sparsities) if mode else {}
    for label, pts in points.items():
        for p in pts:
            step_s = table.get((p.preset, label))
            p.gpu_s = None if step_s is None else p.steps * step_s
    timer = timing_source(timed, mode, sparsities) if mode else None
    if timer and timer[1] == "synced":
        notes.append("step times measured with a wait for the GPU after every step (rows from before "
                     "2026-12-08): each step also paid the host's time to launch it, which weighs most on "
                     "the fastest configurations; timing runs with today's recorder (CUDA events) replace them")
    ses = [r["val_loss_se"] for r in usable if r.get("val_loss_se") is not None]
    summary: dict = {
        "loss": loss, "n_rows": len(usable), "sweeps": sorted({str(r.get("sweep")) for r in usable}),
        "groups": {}, "multipliers": {}, "gpu_time": {}, "notes": notes,
        "noise": {"val_se_min": min(ses) if ses else None, "val_se_median": float(np.median(ses)) if ses else None,
                  "val_se_max": max(ses) if ses else None, "seed": spread},
        "timing": {"mode": mode, "device": timer[0] if timer else None, "clock": timer[1] if timer else None,
                   "source": source,
                   "step_time_s": {f"{preset}/{label}": t for (preset, label), t in sorted(table.items())}},
    }
    if spread["n_points"] == 0:
        notes.append("no point was run with 2+ seeds: the intervals hold the validation noise only")
    fits = {}
    for label, group in groups.items():
        pts = points[label]
        frontier = lower_envelope([(p.flops, p.loss) for p in pts])
        fit = fit_power_law([c for c, _ in frontier], [l for _, l in frontier])
        fits[label] = fit
        if fit.message:
            notes.append(f"{label} fit: {fit.message}")
        share = {}
        for r in sorted(group, key=lambda r: r["params"]):
            share[r["preset"]] = r.get("attention_fraction")
        summary["groups"][label] = {
            "n_rows": len(group),
            "n_points": len(pts),
            "points": [asdict(p) | {"loss": p.loss} for p in pts],
            "frontier": [{"flops": c, "loss": l} for c, l in frontier],
            "fit": asdict(fit),
            "isoflop": isoflop_curves(pts),
            "attention_share": share,
        }
    summary["_fits"] = fits
    summary["equal_steps"] = equal_step_losses(points)
    if BASELINE not in groups:
        notes.append(f"no {BASELINE}-attention rows: no compute multiplier")
        return summary
    rel = spread["relative_std"]
    for label in groups:
        if label == BASELINE:
            continue
        summary["multipliers"][label] = compare(points[BASELINE], points[label], "flops", label, rel,
                                                n_bootstrap, notes, fits=(fits[BASELINE], fits[label]))
        timed_b = [p for p in points[BASELINE] if p.gpu_s is not None]
        timed_s = [p for p in points[label] if p.gpu_s is not None]
        untimed = len(points[BASELINE]) + len(points[label]) - len(timed_b) - len(timed_s)
        if untimed:
            notes.append(f"{label} vs {BASELINE} (GPU time): {untimed} point(s) left out, their configuration "
                         f"has no step time measured in mode {mode!r}")
        if timed_b and timed_s:
            summary["gpu_time"][label] = compare(timed_b, timed_s, "gpu_s", label, rel, n_bootstrap, notes)
    return summary


def _loss_at_steps(points: list[Point]):
    """Loss as a function of optimizer steps for one configuration's points: linear in log steps
    and log loss between them, None outside their range (no extrapolation)."""
    pts = sorted(points, key=lambda p: p.steps)
    xs, ys = np.log([p.steps for p in pts]), np.log([p.loss for p in pts])

    def at(steps: float) -> float | None:
        x = math.log(steps)
        if len(pts) < 2 or not xs[0] <= x <= xs[-1]:
            return None
        return float(np.exp(np.interp(x, xs, ys)))

    return at


def _flops_per_step(points: list[Point]) -> float:
    return float(np.median([p.flops / p.steps for p in points]))


def _ratio_summary(ratios: list[float]) -> dict:
    return {"n": len(ratios), "median": float(np.median(ratios)) if ratios else None,
            "min": min(ratios) if ratios else None, "max": max(ratios) if ratios else None}


def equal_step_losses(points: dict[str, list[Point]]) -> dict:
    """Where the multipliers come from. `attention`: for each sparse label and model size run with
    both attentions, each sparse point's loss over full attention's at the same number of steps
    (full's interpolated between its budgets of that size), and full's training FLOPs per step over
    the sparse model's. When the loss ratio is near 1, an attention type changes what a step costs
    but not what it learns, and the FLOP multiplier is about the FLOPs-per-step ratio. `sizes`: for
    each label, each model size's loss over the smallest size's at the same steps: how much the
    parameters matter at these step counts."""
    out: dict = {"attention": {}, "sizes": {}}
    base = points.get(BASELINE, [])
    for label, pts in points.items():
        presets = sorted({p.preset for p in pts}, key=lambda n: min(p.params for p in pts if p.preset == n))
        if label != BASELINE and base:
            rows = {}
            for preset in presets:
                mine = [p for p in pts if p.preset == preset]
                theirs = [p for p in base if p.preset == preset]
                if not theirs:
                    continue
                at = _loss_at_steps(theirs)
                ratios = [p.loss / ref for p in mine if (ref := at(p.steps)) is not None]
                rows[preset] = _ratio_summary(ratios) | {"flops_per_step_ratio": _flops_per_step(theirs)
                                                         / _flops_per_step(mine)}
            out["attention"][label] = rows
        if len(presets) > 1:
            smallest = _loss_at_steps([p for p in pts if p.preset == presets[0]])
            rows = {}
            for preset in presets[1:]:
                ratios = [p.loss / ref for p in pts if p.preset == preset and (ref := smallest(p.steps)) is not None]
                rows[preset] = _ratio_summary(ratios) | {"of": presets[0]}
            out["sizes"][label] = rows
    return out


# ----------------------------------------------------------------------------- output

def _equal_steps_markdown(equal: dict) -> list[str]:
    def span(r: dict) -> str:
        return "-" if not r["n"] else f"{r['median']:.3g} ({r['min']:.3g}-{r['max']:.3g})"

    lines: list[str] = []
    if any(equal.get("attention", {}).values()):
        lines += ["## Loss at equal steps (where the multipliers come from)", "",
                  f"Each point's loss over {BASELINE} attention's at the same number of optimizer steps and "
                  f"model size ({BASELINE} attention's loss interpolated in log steps and log loss between its "
                  "budgets of that size, never extrapolated), and the training FLOPs of one step, full over "
                  "sparse. A loss ratio near 1: the attention type changes what a step costs, not what it "
                  "learns, and the FLOP multiplier is then about the FLOPs-per-step ratio.", "",
                  "| attention | model | points compared | loss / full's at equal steps: median (range) | "
                  "FLOPs per step, full / sparse |", "|---|---|---:|---|---:|"]
        for label, rows in equal["attention"].items():
            for preset, r in rows.items():
                lines.append(f"| {label} | {preset} | {r['n']} | {span(r)} | {r['flops_per_step_ratio']:.3g} |")
        lines.append("")
    if any(equal.get("sizes", {}).values()):
        lines += ["## Loss at equal steps across model sizes", "",
                  "Each point's loss over the smallest size's at the same number of steps (same attention): "
                  "how much the parameters matter at the step counts run.", "",
                  "| attention | model | of | points compared | loss ratio: median (range) |", "|---|---|---|---:|---|"]
        for label, rows in equal["sizes"].items():
            for preset, r in rows.items():
                lines.append(f"| {label} | {preset} | {r['of']} | {r['n']} | {span(r)} |")
        lines.append("")
    return lines


def _fmt(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _interval(boot: dict) -> tuple[str, str]:
    if boot.get("low") is None:
        return "-", "-"
    return f"{boot['low']:.3g} - {boot['high']:.3g}", f"{boot['ratio']:.2f}"


def markdown(summary: dict, rows: list[dict], loss: str) -> str:
    lines = [f"# Scaling report: {', '.join(summary['sweeps'])}", "",
             f"{summary['n_rows']} runs; loss = final fixed-protocol validation loss ({loss}: "
             f"{'each row val_loss' if loss == 'auto' else 'val_loss_' + loss}); FLOPs = analytic training "
             "FLOPs actually spent; points = the mean over a point's seeds.", ""]
    if summary["multipliers"]:
        lines += ["## Compute multiplier over full attention (equal loss)", "",
                  "| attention | at loss | C_full / C_sparse (envelopes) | 90% bootstrap | high / low | from fits "
                  "| over the common loss range | note |", "|---|---:|---:|---|---:|---:|---|---|"]
        for label, m in summary["multipliers"].items():
            interval, ratio = _interval(m["bootstrap"])
            span = m.get("over_overlap")
            span = f"{span['min']:.3g} - {span['max']:.3g}" if span else "-"
            note = "extrapolated" if m["extrapolated"] else ""
            lines.append(f"| {label} | {m['loss']:.4g} | **{m['multiplier']:.3g}x** | {interval} | {ratio} | "
                         f"{_fmt(m['from_fits'], '.3g')} | {span} | {note} |")
        lines.append("")
    if summary["gpu_time"]:
        timing = summary["timing"]
        lines += ["## GPU-time multiplier over full attention (equal loss)", "",
                  f"GPU-seconds of a run = its steps x the median step time of its configuration (model, "
                  f"attention) over {timing.get('source', 'the result rows')} in compile mode `{timing['mode']}` on "
                  f"{timing['device']} (rows from other devices give losses, not times), timed by "
                  f"{CLOCKS.get(timing.get('clock'), timing.get('clock'))}: "
                  "training steps only (no compilation, autotuning or validation).", "",
                  "| attention | at loss | T_full / T_sparse (envelopes) | 90% bootstrap | high / low | note |",
                  "|---|---:|---:|---|---:|---|"]
        for label, m in summary["gpu_time"].items():
            interval, ratio = _interval(m["bootstrap"])
            note = "extrapolated" if m["extrapolated"] else ""
            lines.append(f"| {label} | {m['loss']:.4g} | **{m['multiplier']:.3g}x** | {interval} | {ratio} | {note} |")
        lines += ["", "| configuration | step time (ms) |", "|---|---:|"]
        for key, value in timing["step_time_s"].items():
            lines.append(f"| {key} | {1e3 * value:.1f} |")
        lines.append("")
    noise = summary["noise"]
    seed = noise["seed"]
    lines += ["## Measurement noise", "",
              f"- validation standard error per run (spread of the per-batch losses / sqrt(batches)): "
              f"{_fmt(noise['val_se_min'], '.2g')} to {_fmt(noise['val_se_max'], '.2g')} "
              f"(median {_fmt(noise['val_se_median'], '.2g')})",
              (f"- seed spread: {seed['relative_std']:.2%} of the loss (relative std, pooled over {seed['n_points']} "
               f"point(s) run with several seeds, {seed['n_runs']} runs)" if seed["n_points"] else
               "- seed spread: not measured (no point run with 2+ seeds)"), ""]
    lines += _equal_steps_markdown(summary.get("equal_steps") or {})
    lines += ["## Frontier fits L(C) = E + A C^-alpha", "",
              "| attention | frontier points | E | A | alpha | rmse (log L) | status |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for label, g in summary["groups"].items():
        f = g["fit"]
        lines.append(f"| {label} | {f['n_points']} | {_fmt(f['E'])} | {_fmt(f['A'])} | {_fmt(f['alpha'])} | "
                     f"{_fmt(f['rmse_log'], '.3g')} | {f['status']} |")
    lines += ["", "## IsoFLOP minima (parabola in log params)", "",
              "| attention | budget | sizes | optimal params | loss there | note |", "|---|---:|---:|---:|---:|---|"]
    for label, g in summary["groups"].items():
        for c in g["isoflop"]:
            lines.append(f"| {label} | {c['budget']:.3g} | {len(c['params'])} | {_fmt(c['opt_params'], '.3g')} | "
                         f"{_fmt(c['opt_loss'])} | {c['note']} |")
    lines += ["", "## Attention share of training FLOPs", "", "| attention | model | share |", "|---|---|---:|"]
    for label, g in summary["groups"].items():
        for preset, share in g["attention_share"].items():
            lines.append(f"| {label} | {preset} | {_fmt(share, '.1%')} |")
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    quality = any(r.get("class_acc") is not None or r.get("fd") is not None for r in rows)
    lines += ["", "## Runs", "",
              "| model | params | attention | sparsity | budget | FLOPs | steps | seed | val loss raw | val loss EMA "
              "| val s.e. | step ms | compile | wall-clock s |" + (" class acc | FD |" if quality else ""),
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
              + ("---:|---:|" if quality else "")]
    for r in sorted(rows, key=lambda r: (r["attention"], str(r.get("sparsity")), r["params"], r["budget"],
                                         r.get("seed", 0))):
        step_ms = None if not r.get("step_time_s") else 1e3 * r["step_time_s"]
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['attention']} | {_fmt(r.get('sparsity'), 'g')} "
                     f"| {r['budget']:.3g} | {r['flops']:.3g} | {r['steps']} | {r.get('seed', '-')} | "
                     f"{_fmt(r.get('val_loss_raw'))} | {_fmt(r.get('val_loss_ema'))} | "
                     f"{_fmt(r.get('val_loss_se'), '.2g')} | {_fmt(step_ms, '.1f')} | {compile_mode(r)} | "
                     f"{_fmt(r.get('wall_clock_s'), '.1f')} |"
                     + (f" {_fmt(r.get('class_acc'), '.3g')} | {_fmt(r.get('fd'), '.3g')} |" if quality else ""))
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)", "", "![loss vs steps](loss_vs_steps.png)", "",
              "![IsoFLOP](isoflop.png)", ""]
    if summary["gpu_time"]:
        lines += ["![loss vs GPU time](loss_vs_gpu_time.png)", ""]
    if summary["multipliers"]:
        lines += ["![multiplier](multiplier.png)", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(summary: dict, groups: dict[str, list[dict]], loss: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {label: f"C{i}" for i, label in enumerate(groups)}
    written = []

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, group in groups.items():
        g = summary["groups"][label]
        ax.scatter([r["flops"] for r in group], [row_loss(r, loss) for r in group], color=colors[label],
                   alpha=0.5, s=25, label=f"{label} runs")
        front = g["frontier"]
        ax.plot([p["flops"] for p in front], [p["loss"] for p in front], color=colors[label], lw=2,
                label=f"{label} envelope")
        fit = summary["_fits"][label]
        if fit.usable or fit.n_points == 2 and math.isfinite(fit.alpha):
            c_lo, c_hi = min(r["flops"] for r in group), max(r["flops"] for r in group)
            cs = np.geomspace(c_lo / 1.5, c_hi * 1.5, 100)
            ax.plot(cs, fit.loss(cs), color=colors[label], ls="--", lw=1,
                    label=f"{label} fit: E={fit.E:.3g}, alpha={fit.alpha:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"validation loss ({loss})")
    ax.set_title("Loss vs compute, lower envelope per attention type")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    written.append(_save(fig, out / "loss_vs_flops.png"))

    if summary["gpu_time"]:
        fig, ax = plt.subplots(figsize=(7, 5))
        labels = [BASELINE] + list(summary["gpu_time"])
        for label in labels:
            pts = [p for p in summary["groups"][label]["points"] if p["gpu_s"] is not None]
            ax.scatter([p["gpu_s"] for p in pts], [p["loss"] for p in pts], color=colors[label], alpha=0.5, s=25,
                       label=f"{label} points")
            entry = summary["gpu_time"][label] if label != BASELINE else next(iter(summary["gpu_time"].values()))
            front = entry["frontier"] if label != BASELINE else entry["frontier_base"]
            ax.plot([c for c, _ in front], [l for _, l in front], color=colors[label], lw=2, label=f"{label} envelope")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"GPU-seconds of training ({summary['timing']['mode']})")
        ax.set_ylabel(f"validation loss ({loss})")
        ax.set_title("Loss vs measured GPU time, lower envelope per attention type")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        written.append(_save(fig, out / "loss_vs_gpu_time.png"))

    # Loss against optimizer steps: one line per (attention, model size), a marker per size.
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*X"
    sizes = sorted({p["preset"] for g in summary["groups"].values() for p in g["points"]},
                   key=lambda n: min(p["params"] for g in summary["groups"].values() for p in g["points"]
                                     if p["preset"] == n))
    for label in groups:
        pts = summary["groups"][label]["points"]
        for i, preset in enumerate(sizes):
            mine = sorted((p for p in pts if p["preset"] == preset), key=lambda p: p["steps"])
            if mine:
                ax.plot([p["steps"] for p in mine], [p["loss"] for p in mine], marker=markers[i % len(markers)],
                        color=colors[label], alpha=0.8, lw=1, label=f"{label} {preset}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(f"validation loss ({loss})")
    ax.set_title("Loss vs steps, per attention type and model size")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    written.append(_save(fig, out / "loss_vs_steps.png"))

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, label in zip(axes[0], groups, strict=True):
        curves = summary["groups"][label]["isoflop"]
        for i, c in enumerate(curves):
            color = plt.cm.viridis(i / max(1, len(curves) - 1))
            ax.plot(c["params"], c["loss"], "o-", color=color, label=f"C={c['budget']:.2g}")
            if "coeffs" in c:
                xs = np.linspace(np.log10(min(c["params"])) - 0.1, np.log10(max(c["params"])) + 0.1, 50)
                ax.plot(10 ** xs, np.polyval(c["coeffs"], xs), "--", color=color, lw=1)
            if c["opt_params"]:
                ax.plot([c["opt_params"]], [c["opt_loss"]], "*", color=color, ms=12)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"validation loss ({loss})")
        ax.set_title(f"IsoFLOP: {label}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    written.append(_save(fig, out / "isoflop.png"))

    if summary["multipliers"]:
        panels = [("multipliers", "C_full(L) / C_sparse(L)", "FLOPs")]
        if summary["gpu_time"]:
            panels.append(("gpu_time", "T_full(L) / T_sparse(L)", "GPU time"))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (key, ylabel, what) in zip(axes[0], panels, strict=True):
            for label, m in summary[key].items():
                span = m.get("over_overlap")
                if span:
                    ax.plot(span["loss"], span["multiplier"], color=colors[label], label=f"{label} (envelopes)")
                ax.plot([m["loss"]], [m["multiplier"]], "o", color=colors[label],
                        label=f"{label}: {m['multiplier']:.3g}x at L={m['loss']:.3g}"
                              + (" (extrapolated)" if m["extrapolated"] else ""))
                boot = m["bootstrap"]
                if boot["low"] is not None:
                    below, above = max(0.0, m["multiplier"] - boot["low"]), max(0.0, boot["high"] - m["multiplier"])
                    ax.errorbar([m["loss"]], [m["multiplier"]], yerr=[[below], [above]], color=colors[label],
                                capsize=4)
            ax.axhline(1.0, color="gray", lw=1, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel(f"validation loss ({loss})")
            ax.set_ylabel(ylabel)
            ax.set_title(f"Multiplier over full attention at equal loss ({what})")
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "multiplier.png"))
    return written


def timings_folder(sweep_dir, timings="auto") -> Path | None:
    """The folder of timing rows: `timings` itself, none ("none"), or (auto) the `timings` folder
    beside a committed `rows` folder (docs/results/SWEEP/timings) when there is one."""
    if timings in (None, "none"):
        return None
    if timings != "auto":
        return Path(timings)
    sibling = Path(sweep_dir).parent / "timings"
    return sibling if Path(sweep_dir).name == "rows" and sibling.is_dir() else None


def write_report(sweep_dir, out=None, loss: str = "auto", n_bootstrap: int = 1000, timing: str = "auto",
                 timings="auto") -> dict:
    """Collect the rows under `sweep_dir`, write report.md, summary.json and the plots to `out`
    (default: sweep_dir/report); return the summary. `timings`: see `timings_folder`."""
    rows = find_rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no result.json under {sweep_dir}; run the sweep first (python train.py -m "
                                "sweep=...), or give the folder that holds its runs")
    folder = timings_folder(sweep_dir, timings)
    timing_rows = None
    if folder is not None:
        timing_rows = find_rows(folder) if folder.is_dir() else []
        if not timing_rows:
            raise FileNotFoundError(f"no timing rows under {folder}; give --timings none, or a folder of "
                                    "timing runs' rows (docs/scaling.md, 'Timing runs')")
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, loss, n_bootstrap, timing, timing_rows)
    usable = [r for r in rows if row_loss(r, loss) is not None]
    plots = plot(summary, group_rows(usable), loss, out)
    (out / "report.md").write_text(markdown(summary, usable, loss) + "\n")
    summary.pop("_fits")
    summary["plots"] = [p.name for p in plots]
    summary["rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} | {"path": r["_path"]} for r in rows]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsa.scaling.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="folder holding the sweep's runs (searched recursively for result.json)")
    parser.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--loss", choices=("auto", "raw", "ema"), default="auto",
                        help="which validation loss: each row's val_loss (auto), the raw or the EMA weights'")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")
    parser.add_argument("--timing", default="auto",
                        help="compile mode whose measured step times give the GPU-time comparison: eager, "
                             "default, reduce-overhead, or auto (the mode that times the most configurations)")
    parser.add_argument("--timings", default="auto",
                        help="folder of timing rows whose step times give the GPU-time comparison (short runs "
                             "of every configuration in one session on one GPU), 'none' for the result rows' "
                             "own, or auto: the 'timings' folder beside a 'rows' folder when there is one")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.sweep_dir, args.out, args.loss, max(args.bootstrap, 1), args.timing,
                               args.timings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.sweep_dir) / "report"
    print(f"{summary['n_rows']} runs -> {out / 'report.md'}")
    for label, m in summary["multipliers"].items():
        boot = m["bootstrap"]
        interval = f" (90% bootstrap {boot['low']:.3g}-{boot['high']:.3g})" if boot["low"] is not None else ""
        print(f"{label} over full: {m['multiplier']:.3g}x compute at loss {m['loss']:.4g}{interval}"
              + (" [extrapolated]" if m["extrapolated"] else ""))
    for label, m in summary["gpu_time"].items():
        boot = m["bootstrap"]
        interval = f" (90% bootstrap {boot['low']:.3g}-{boot['high']:.3g})" if boot["low"] is not None else ""
        print(f"{label} over full: {m['multiplier']:.3g}x GPU time at loss {m['loss']:.4g}{interval}"
              + (" [extrapolated]" if m["extrapolated"] else ""))
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
