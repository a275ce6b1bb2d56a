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
    """Every result row under `folder` (recursively), each with its file's path under "_path"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the sweep folder, e.g. "
                                "logs/train/multiruns/scaling_micro")
    rows = []
    for path in sorted(folder.rglob(RESULT_FILE)):
        try:
            row = read_row(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable result row ({exc}); delete it and relaunch "
                             "that run to rewrite it") from exc
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
