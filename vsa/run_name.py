"""The name of a `train.py` run folder: a pure function of the command line.

A run is named by its experiment and the command-line overrides that change what is trained
(`run_name: ${run_name:${experiment_name}}` in configs/train.yaml):

    python train.py                                    -> logs/train/runs/default
    python train.py attention=full model=2.3m          -> logs/train/runs/default+attention:full+model:2.3m
    python train.py experiment=tiny seed=1 logger=csv  -> logs/train/runs/tiny+seed:1

Overrides under `run_name_ignores` (configs/train.yaml: where logs go, loggers, progress bars,
checkpoint and validation frequency, `trainer.max_steps`, ...) do not name a run. The name is a
pure function of the command line, so relaunching the same command (or a requeued SLURM job)
finds the same folder and resumes from its `checkpoints/last.ckpt`. Names use only characters
that Hydra and the shell take unquoted (no `=` or `,`): `ckpt_path=logs/train/runs/<name>/...`
works as typed.

`register_resolver()` registers `run_name` with OmegaConf (`import vsa` does it); the rest of the
run folder (the recorded config a relaunch is checked against) is `vsa.training.run_folder`.
"""

from __future__ import annotations

import hashlib
import re

from omegaconf import DictConfig, OmegaConf

MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-@%]+")  # characters Hydra and the shell take unquoted, less ':' '+'


def is_ignored(key: str, ignores) -> bool:
    """Whether config key / group `key` lies under one of the `ignores` prefixes."""
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in ignores)


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def run_name_from_overrides(experiment_name: str, overrides: list[str], ignores) -> str:
    """`<experiment>+<key>:<value>+...` over the overrides not under `ignores`, sorted by key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = []
    for override in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        key = override.key_or_group
        if is_ignored(key, ignores):
            continue
        # The value as typed (Hydra would write true as True and 3e-4 as 0.0003).
        value = "null" if override.is_delete() else str(override.input_line).partition("=")[2]
        items.append((key, f"{_safe(key)}:{_safe(value)}"))
    name = "+".join([_safe(str(experiment_name))] + [item for _, item in sorted(items)])
    if len(name) > MAX_NAME:  # file names have a length limit: keep a readable head + a digest
        name = f"{name[:MAX_NAME - 9]}+{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _run_name_resolver(experiment_name: str, *, _root_: DictConfig) -> str:
    """OmegaConf resolver `${run_name:${experiment_name}}`. Outside a Hydra job (compose() in
    tests) and in multiruns (a sweep names its points with hydra.sweep.subdir) it is the
    experiment name alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return str(experiment_name)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return str(experiment_name)
    ignores = _root_.get("run_name_ignores") or []
    return run_name_from_overrides(experiment_name, list(hydra_cfg.overrides.task), ignores)


def register_resolver() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name_resolver)
