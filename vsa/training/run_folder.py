"""The run folder of `train.py`: what a relaunch finds in it (its name: `vsa.run_name`).

A run folder's name is a pure function of the command line (`vsa.run_name`), so relaunching the
same command (or a requeued SLURM job) finds the same folder and resumes from its
`checkpoints/last.ckpt`.

On a relaunch, `check_resume` compares the run folder's recorded config (`.hydra/config.yaml`,
written by `record_config` only when training starts) with the new one and refuses a resume
whose training config differs, or says the run is finished when its checkpoint already reached
`trainer.max_steps`. Hydra's own write of `.hydra/` is off (`hydra.output_subdir: null`) so a
refused or finished relaunch never rewrites the config a run was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vsa.checkpoint import RUN_CONFIG_DIR as CONFIG_DIR
from vsa.run_name import is_ignored


def config_differences(old: Any, new: Any, ignores, prefix: str = "") -> list[str]:
    """`key: old -> new` for every value that differs between two config containers (unresolved),
    keys under `ignores` and keys present on one side only (options added by a later version of
    the code, `+init_from`, which a resume ignores) left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in old:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key in new and not is_ignored(name, ignores):
                out += config_differences(old[key], new[key], ignores, name)
        return out
    if old == new:
        return []

    def short(value):
        text = "null" if value is None else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{prefix}: {short(old)} -> {short(new)}"]


def recorded_config(run_dir: Path) -> DictConfig | None:
    path = Path(run_dir) / CONFIG_DIR / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def record_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write the run's config as Hydra would (`.hydra/config.yaml`, and inside a Hydra job
    `hydra.yaml` and `overrides.yaml`); called when training starts, never for a run that is
    refused or already finished."""
    from hydra.core.hydra_config import HydraConfig

    folder = Path(run_dir) / CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")
