"""Scaling report: `python -m vsa.scaling.report SWEEP_DIR [--out DIR]`.

Collects every result.json under SWEEP_DIR and, per attention type (full, vsa, or vsa@sparsity
when a sweep holds several sparsities):

- the lower envelope of loss vs training FLOPs (the compute frontier: each point beats every
  cheaper one), and a fit of the frontier L(C) = E + A * C^-alpha (least squares in log L);
- IsoFLOP curves: loss vs parameters per budget, with the minimum of a parabola in log params;
- the compute multiplier of each sparse type over full attention at equal loss,
  C_full(L) / C_sparse(L), read off the two envelopes (log-log interpolation) over the loss range
  both cover, reported at the lowest loss both reach, with a bootstrap interval (rows resampled
  with replacement within each attention type); from the fits too when both are determined;
- the attention share of the training FLOPs per model.

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
    """"full", "vsa", or "vsa@0.75" when the rows hold several VSA sparsities."""
    name = row["attention"]
    if name != BASELINE and len(vsa_sparsities) > 1:
        return f"{name}@{row.get('sparsity'):g}"
    return name


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    sparsities = {r.get("sparsity") for r in rows if r["attention"] != BASELINE}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(attention_label(row, sparsities), []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])))


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
    status: str = "underdetermined"  # ok | exact | underdetermined | failed
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
    if alpha <= 1.001e-3 or alpha >= 4.99 or E >= upper_e * 0.999:
        fit.message = (fit.message + "; " if fit.message else "") + "a parameter sits at its bound"
    return fit


# ----------------------------------------------------------------------------- IsoFLOP

def isoflop_curves(rows: list[dict], loss: str) -> list[dict]:
    """Per budget: (params, loss) of each model, and the minimum of a parabola in log10(params)."""
    curves = []
    for budget in sorted({r["budget"] for r in rows}):
        points = sorted((r["params"], row_loss(r, loss)) for r in rows if r["budget"] == budget)
        points = [(n, l) for n, l in points if l is not None]
        curve = {"budget": budget, "params": [n for n, _ in points], "loss": [l for _, l in points],
                 "opt_params": None, "opt_loss": None, "note": ""}
        logs = np.log10([n for n, _ in points]) if points else np.array([])
        if len(np.unique(logs)) < 3:
            curve["note"] = f"{len(points)} model size(s): no parabola (needs 3+)"
            if points:
                n_best, l_best = min(points, key=lambda p: p[1])
                curve.update(opt_params=n_best, opt_loss=l_best, note=curve["note"] + "; best run shown")
        else:
            a, b, c0 = np.polyfit(logs, curve["loss"], 2)
            if a <= 0:
                n_best, l_best = min(points, key=lambda p: p[1])
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


def bootstrap_multiplier(base_rows, sparse_rows, loss_ref: float, loss: str, n: int = 1000,
                         seed: int = 0) -> dict:
    """5th-95th percentile of the envelope multiplier at `loss_ref` over resampled rows."""
    rng = np.random.default_rng(seed)
    base = [(r["flops"], row_loss(r, loss)) for r in base_rows]
    sparse = [(r["flops"], row_loss(r, loss)) for r in sparse_rows]
    values = []
    for _ in range(n):
        fb = lower_envelope([base[i] for i in rng.integers(0, len(base), len(base))])
        fs = lower_envelope([sparse[i] for i in rng.integers(0, len(sparse), len(sparse))])
        value, _ = multiplier_at(fb, fs, loss_ref)
        if math.isfinite(value) and value > 0:
            values.append(value)
    if len(values) < max(10, n // 10):
        return {"low": None, "high": None, "n_valid": len(values), "n": n,
                "note": "too few resamples gave a finite multiplier for an interval"}
    return {"low": float(np.percentile(values, 5)), "high": float(np.percentile(values, 95)),
            "n_valid": len(values), "n": n, "note": "90% interval (5th-95th percentile)"}


# ----------------------------------------------------------------------------- summary

def summarize(rows: list[dict], loss: str = "auto", n_bootstrap: int = 1000) -> dict:
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
    summary: dict = {"loss": loss, "n_rows": len(usable), "sweeps": sorted({str(r.get("sweep")) for r in usable}),
                     "groups": {}, "multipliers": {}, "notes": notes}
    frontiers = {}
    for label, group in groups.items():
        frontier = lower_envelope([(r["flops"], row_loss(r, loss)) for r in group])
        frontiers[label] = frontier
        fit = fit_power_law([c for c, _ in frontier], [l for _, l in frontier])
        if fit.message:
            notes.append(f"{label} fit: {fit.message}")
        share = {}
        for r in sorted(group, key=lambda r: r["params"]):
            share[r["preset"]] = r.get("attention_fraction")
        summary["groups"][label] = {
            "n_rows": len(group),
            "frontier": [{"flops": c, "loss": l} for c, l in frontier],
            "fit": asdict(fit),
            "isoflop": isoflop_curves(group, loss),
            "attention_share": share,
        }
    summary["_fits"] = {label: PowerLawFit(**g["fit"]) for label, g in summary["groups"].items()}
    if BASELINE not in groups:
        notes.append(f"no {BASELINE}-attention rows: no compute multiplier")
    for label in groups:
        if label == BASELINE or BASELINE not in groups:
            continue
        fb, fs = frontiers[BASELINE], frontiers[label]
        loss_ref, overlap = reference_loss(fb, fs)
        value, extrapolated = multiplier_at(fb, fs, loss_ref)
        entry: dict = {"loss": loss_ref, "multiplier": value, "extrapolated": extrapolated,
                       "loss_ranges_overlap": overlap}
        if overlap:
            lo, hi = loss_ref, min(fb[0][1], fs[0][1])
            grid = np.linspace(lo, hi, 25) if hi > lo else np.array([lo])
            curve = [multiplier_at(fb, fs, float(g))[0] for g in grid]
            entry["over_overlap"] = {"loss": grid.tolist(), "multiplier": curve,
                                     "min": float(np.nanmin(curve)), "max": float(np.nanmax(curve))}
        else:
            notes.append(f"{label} vs {BASELINE}: the frontiers' loss ranges do not overlap; the multiplier "
                         "is extrapolated along the end segments")
        if len(fb) < 2 or len(fs) < 2:
            notes.append(f"{label} vs {BASELINE}: a frontier has a single point; the multiplier needs "
                         "more budgets to be reliable")
        fit_b, fit_s = summary["_fits"][BASELINE], summary["_fits"][label]
        if fit_b.usable and fit_s.usable:
            entry["from_fits"] = fit_b.flops_at(loss_ref) / fit_s.flops_at(loss_ref)
        else:
            entry["from_fits"] = None
            notes.append(f"{label} vs {BASELINE}: fits underdetermined; multiplier from the envelopes only")
        entry["bootstrap"] = bootstrap_multiplier(groups[BASELINE], groups[label], loss_ref, loss,
                                                  n=n_bootstrap)
        summary["multipliers"][label] = entry
    return summary


# ----------------------------------------------------------------------------- output

def _fmt(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def markdown(summary: dict, rows: list[dict], loss: str) -> str:
    lines = [f"# Scaling report: {', '.join(summary['sweeps'])}", "",
             f"{summary['n_rows']} runs; loss = final fixed-protocol validation loss ({loss}: "
             f"{'each row val_loss' if loss == 'auto' else 'val_loss_' + loss}); FLOPs = analytic training "
             "FLOPs actually spent.", ""]
    if summary["multipliers"]:
        lines += ["## Compute multiplier over full attention (equal loss)", "",
                  "| attention | at loss | C_full / C_sparse (envelopes) | 90% bootstrap | from fits "
                  "| over the common loss range | note |", "|---|---:|---:|---|---:|---|---|"]
        for label, m in summary["multipliers"].items():
            boot = m["bootstrap"]
            interval = f"{_fmt(boot['low'], '.3g')} - {_fmt(boot['high'], '.3g')}" if boot["low"] else "-"
            span = m.get("over_overlap")
            span = f"{span['min']:.3g} - {span['max']:.3g}" if span else "-"
            note = "extrapolated" if m["extrapolated"] else ""
            lines.append(f"| {label} | {m['loss']:.4g} | **{m['multiplier']:.3g}x** | {interval} | "
                         f"{_fmt(m['from_fits'], '.3g')} | {span} | {note} |")
        lines.append("")
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
    lines += ["", "## Runs", "",
              "| model | params | attention | sparsity | budget | FLOPs | steps | val loss raw | val loss EMA "
              "| wall-clock s | tokens/s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["attention"], r["params"], r["budget"])):
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['attention']} | {_fmt(r.get('sparsity'), 'g')} "
                     f"| {r['budget']:.3g} | {r['flops']:.3g} | {r['steps']} | {_fmt(r.get('val_loss_raw'))} | "
                     f"{_fmt(r.get('val_loss_ema'))} | {_fmt(r.get('wall_clock_s'), '.1f')} | "
                     f"{_fmt(r.get('tokens_per_s'), '.3g')} |")
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)", "", "![IsoFLOP](isoflop.png)", ""]
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
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, m in summary["multipliers"].items():
            span = m.get("over_overlap")
            if span:
                ax.plot(span["loss"], span["multiplier"], color=colors[label], label=f"{label} (envelopes)")
            ax.plot([m["loss"]], [m["multiplier"]], "o", color=colors[label],
                    label=f"{label}: {m['multiplier']:.3g}x at L={m['loss']:.3g}"
                          + (" (extrapolated)" if m["extrapolated"] else ""))
            boot = m["bootstrap"]
            if boot["low"] is not None:
                below, above = max(0.0, m["multiplier"] - boot["low"]), max(0.0, boot["high"] - m["multiplier"])
                ax.errorbar([m["loss"]], [m["multiplier"]], yerr=[[below], [above]], color=colors[label], capsize=4)
        ax.axhline(1.0, color="gray", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"validation loss ({loss})")
        ax.set_ylabel("C_full(L) / C_sparse(L)")
        ax.set_title("Compute multiplier over full attention at equal loss")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "multiplier.png"))
    return written


def write_report(sweep_dir, out=None, loss: str = "auto", n_bootstrap: int = 1000) -> dict:
    """Collect the rows under `sweep_dir`, write report.md, summary.json and the plots to `out`
    (default: sweep_dir/report); return the summary."""
    rows = find_rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no result.json under {sweep_dir}; run the sweep first (python train.py -m "
                                "sweep=...), or give the folder that holds its runs")
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, loss, n_bootstrap)
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
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.sweep_dir, args.out, args.loss, max(args.bootstrap, 1))
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
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
