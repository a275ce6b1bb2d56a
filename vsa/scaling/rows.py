"""Result rows on disk: where a run's row lives, reading rows back, and the finished-run check.

Light on purpose (json and pathlib only): train.py asks `finished_row(cfg)` before it imports
torch or Lightning, so relaunching a sweep skips its finished points in well under a second each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

RESULT_FILE = "result.json"


def read_row(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def find_rows(folder: str | os.PathLike) -> list[dict]:
    """Every result row under `folder`, each with its file's path under "_path": the run folders'
    result.json files (recursively), or a flat folder of collected rows (`collect_rows`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the sweep folder, e.g. "
                                "logs/train/multiruns/scaling_micro")
    rows = []
    paths = sorted(folder.rglob(RESULT_FILE)) or sorted(p for p in folder.glob("*.json"))
    for path in paths:
        try:
            row = read_row(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable result row ({exc}); delete it and relaunch "
                             "that run to rewrite it") from exc
        if path.name != RESULT_FILE and not (isinstance(row, dict) and "schema" in row and "budget" in row):
            continue  # another JSON file beside collected rows (e.g. a report's summary.json)
        row["_path"] = str(path)
        rows.append(row)
    return rows


def finished_row(cfg: DictConfig) -> dict | None:
    """The run's result row when it is already written for this very sweep point, else None.

    A sweep point is (model preset, attention, sparsity, budget); the run folder is a fixed
    function of the sweep overrides, so a relaunched sweep finds its finished rows here. Delete a
    run's result.json to run it again.
    """
    scaling = cfg.get("scaling")
    if not scaling or scaling.get("budget") is None:
        return None
    path = Path(cfg.paths.output_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        row = read_row(path)
    except (OSError, ValueError):
        return None  # unreadable: run (resume) again, which rewrites it
    attention = cfg.attention.name
    sparsity = cfg.attention.get("sparsity") if attention == "vsa" else None
    same_sparsity = (row.get("sparsity") is None) == (sparsity is None) and (
        sparsity is None or row.get("sparsity_schedule") is not None
        or float(row["sparsity"]) == float(sparsity))
    same = (row.get("preset") == cfg.model.name and row.get("attention") == attention
            and float(row.get("budget", -1)) == float(scaling.budget) and same_sparsity)
    return row if same else None


def collect_rows(sweep_dir: str | os.PathLike, rows_dir: str | os.PathLike) -> list[Path]:
    """Copy every finished run's result.json under `sweep_dir` to `rows_dir/<run folder>.json`
    (the form in which a sweep's rows are committed, e.g. docs/results/<sweep>/rows/)."""
    rows_dir = Path(rows_dir)
    rows_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for row in find_rows(sweep_dir):
        source = Path(row.pop("_path"))
        target = rows_dir / f"{source.parent.name}.json"
        target.write_text(json.dumps(row, indent=1) + "\n")
        written.append(target)
    return written


def restore_rows(rows_dir: str | os.PathLike, sweep_dir: str | os.PathLike) -> list[Path]:
    """The reverse of `collect_rows`: put each `rows_dir/<run folder>.json` back as
    `sweep_dir/<run folder>/result.json`, so a relaunched sweep on another machine (or a fresh
    one) skips the runs that are already finished. Existing result.json files are kept."""
    rows_dir, sweep_dir = Path(rows_dir), Path(sweep_dir)
    if not rows_dir.is_dir():
        raise FileNotFoundError(f"{rows_dir} is not a folder of result rows (<run folder>.json files)")
    restored = []
    for source in sorted(rows_dir.glob("*.json")):
        try:
            row = read_row(source)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source} is not a readable result row ({exc}); fix or delete it") from exc
        if not (isinstance(row, dict) and "schema" in row and "budget" in row):
            continue  # another JSON file beside the rows
        target = sweep_dir / source.stem / RESULT_FILE
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
        restored.append(target)
    return restored


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m vsa.scaling.rows",
        description="Move a sweep's finished result rows between its run folders and a folder of rows: "
                    "collect SWEEP_DIR ROWS_DIR after a (partial) sweep; restore ROWS_DIR SWEEP_DIR before "
                    "relaunching it elsewhere, so that finished runs are skipped.")
    parser.add_argument("action", choices=("collect", "restore"))
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    try:
        if args.action == "collect":
            paths = collect_rows(args.source, args.target)
        else:
            paths = restore_rows(args.source, args.target)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.action}: {len(paths)} row(s) -> {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
