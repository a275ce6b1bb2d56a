"""`train(cfg)`: build data, model, LightningModule, callbacks, loggers and trainer from a Hydra
config (configs/train.yaml), then fit, resuming from the run folder's `last.ckpt` when it exists.

Mistakes in the configuration (a missing mandatory value, an unknown preset, a sparsity outside
[0, 1), a data folder that does not exist, an unknown keyword) raise `ConfigError`, which Hydra
reports as one line naming the config section; `HYDRA_FULL_ERROR=1` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import uuid
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from vsa.checkpoint import CHECKPOINT_KEY, find_checkpoint, model_state, read_checkpoint
from vsa.config import ConfigError, RunStopped, check_missing, config_section
from vsa.data.codecs import build_codec
from vsa.models import VideoDiT
from vsa.ops import KernelOptions, current_kernel_options, kernel_options
from vsa.training.callbacks import RunCheckpoint, StepProgressBar
from vsa.training.checkpoint_io import AtomicCheckpointIO
from vsa.training.module import VideoDiffusionModule

WANDB_ID_FILE = "wandb_run_id.txt"


def check_values(cfg: DictConfig) -> None:
    """Reject values that would otherwise fail only after the model is built (or deep inside
    torch), with one line each: the seed, the learning rate, a GPU trainer on a machine without."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}; e.g. seed=1")
    lr = OmegaConf.select(cfg, "module.optimizer.lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"module.optimizer.lr must be a positive number, got {lr!r}; e.g. "
                          "module.optimizer.lr=3e-4")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        experiment = cfg.get("experiment_name", "this run")
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
                          f"({experiment} is a GPU recipe); run it on a GPU machine, or add "
                          "trainer.accelerator=cpu trainer.precision=32-true to try it on the CPU")


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this launch resumes from: ckpt_path=last -> the run folder's last.ckpt when
    it exists; a path -> that file (a run folder -> its checkpoints/last.ckpt); null -> None."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = last_checkpoint(cfg, run_dir)
        return intact_checkpoint(last) if last.is_file() else None
    with config_section("ckpt_path"):
        return find_checkpoint(ckpt_path)


def last_checkpoint(cfg: DictConfig, run_dir: Path) -> Path:
    """Where the run keeps its last.ckpt."""
    dirpath = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath", default=None)
    return Path(dirpath or run_dir / "checkpoints") / "last.ckpt"


def saved_so_far(cfg: DictConfig, run_dir: Path) -> str:
    """"<path> holds step N", for a message after a fault."""
    last = last_checkpoint(cfg, run_dir)
    try:
        return f"{last} holds step {read_checkpoint(last, mmap=True).get('global_step')}"
    except (FileNotFoundError, ValueError):
        return f"no checkpoint was written yet ({last})"


def intact_checkpoint(last: Path) -> Path:
    """`last` when it reads as a checkpoint; else the newest other intact checkpoint of its folder
    (save_top_k > 0 keeps some), said in one line; else a ConfigError that changes no file."""
    try:
        read_checkpoint(last, mmap=True)
        return last
    except ValueError as exc:
        message = str(exc)  # "<path> is not a [readable] checkpoint of vsa.training (<why>); <advice>"
        damage = message.split("vsa.training (", 1)[-1].rsplit("); ", 1)[0]
    others = sorted((p for p in last.parent.glob("*.ckpt") if p != last and not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        try:
            step = read_checkpoint(other, mmap=True).get("global_step")
        except ValueError:
            continue
        rank_zero_info(f"{last} is damaged ({damage}); resuming from {other} (step {step}), the newest "
                       "intact checkpoint of the run")
        return other
    raise ConfigError(f"ckpt_path=last: {last} is damaged ({damage}) and the run folder holds no other "
                      "intact checkpoint; no file was changed. Start the run over with ckpt_path=null "
                      "(it overwrites this run's checkpoints), or start another with run_name=NEW_NAME")


def check_resume(cfg: DictConfig, run_dir: Path, ckpt: Path) -> dict:
    """Read the resume checkpoint (tensors mapped, not loaded) and, when it is the run folder's
    own, refuse a training config that differs from the run's recorded one. Returns the
    checkpoint dict."""
    from vsa.training.run_folder import config_differences, recorded_config

    with config_section("ckpt_path"):
        checkpoint = read_checkpoint(ckpt, mmap=True)
    recorded = recorded_config(run_dir) if cfg.get("ckpt_path") == "last" else None
    if recorded is not None:
        ignores = list(cfg.get("run_name_ignores") or [])
        diffs = config_differences(OmegaConf.to_container(recorded, resolve=False),
                                   OmegaConf.to_container(cfg, resolve=False), ignores)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 3 else "")
            raise ConfigError(f"run folder {run_dir} holds a run trained with another config ({shown}); "
                              "start a new run with run_name=NEW_NAME, or start this one over with "
                              "ckpt_path=null")
    return checkpoint


def check_checkpoint_model(checkpoint: dict, model: VideoDiT, ckpt: Path) -> None:
    """One line instead of Lightning's state_dict mismatch when the checkpoint holds another model."""
    import dataclasses

    saved = checkpoint[CHECKPOINT_KEY].get("dit_config", {})
    own = dataclasses.asdict(model.cfg)
    diffs = [f"{k}: {saved[k]} -> {own[k]}" for k in own if k in saved and saved[k] != own[k]]
    if diffs:
        raise ConfigError(f"ckpt_path: {ckpt} holds another model ({'; '.join(diffs[:4])}); resume it "
                          "with the config it was trained with, or start fresh with ckpt_path=null "
                          "(or name a new run with run_name=NEW_NAME)")


def check_conditioning(item: dict, cfg) -> None:
    """Before any step: a text-conditioned model (text_dim > 0, embeddings from the data) needs
    `text_emb` of its width in the data set's items."""
    if not cfg.text_dim or cfg.caption_words:
        return
    if "text_emb" not in item:
        raise ValueError(f"the model cross-attends to text (text_dim={cfg.text_dim}) but the data set's "
                         f"items have no text_emb (keys: {sorted(item)}); use latent shards written "
                         "with caption embeddings (scripts/encode_latents.py --text-encoder DIR)")
    width = item["text_emb"].shape[-1]
    if width != cfg.text_dim:
        raise ValueError(f"the data's text embeddings are {width} wide but the model's text_dim is "
                         f"{cfg.text_dim}; encode the captions with the text encoder the model was "
                         "trained with (Wan 2.1: UMT5-XXL, 4096) or set model.text_dim to the encoder's width")


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """'auto' -> bf16-mixed on a CUDA GPU with bf16 support, else 32-true; others unchanged."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id of this run folder, created (and stored) on the first launch. Only global
    rank 0 reads or writes it: it is the only rank that talks to W&B."""
    if rank_zero_only.rank != 0:
        return None
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        kwargs = {}
        with config_section(f"logger.{name}"):
            cls = get_class(node._target_)
            if issubclass(cls, WandbLogger) and node.get("id") is None:
                kwargs["id"] = wandb_run_id(run_dir)
            logger = instantiate(node, _convert_="all", **kwargs)
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous", 0) is None:
                # Lightning passes anonymous=None, and wandb warns that the setting has no effect.
                del logger._wandb_init["anonymous"]
            loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        with config_section(f"callbacks.{name}"):
            callbacks.append(instantiate(node, _convert_="all"))
    return callbacks


def fits_when_finished(cfg: DictConfig) -> bool:
    """Whether a configured callback has work at the end of every fit, even of a run that is
    already finished (`fit_when_finished`, e.g. the sweeps' result row): the run then fits again,
    taking no step, instead of returning at once."""
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" in node:
            with config_section(f"callbacks.{name}"):
                if getattr(get_class(node._target_), "fit_when_finished", False):
                    return True
    return False


def load_init_weights(model: VideoDiT, path: str | os.PathLike) -> list[str]:
    """Load another run's weights (EMA when present) into `model` for finetuning.

    Attention-backend parameters may differ (a dense checkpoint has no VSA gates: they keep the
    backend's own init, e.g. "adapt" gates G_c = 0, G_f = 1); everything else must match exactly.
    Returns the names of the parameters left at their init.
    """
    state = model_state(read_checkpoint(path), ema=True)
    own = model.state_dict()

    def is_backend(key: str) -> bool:
        return ".attn.backend." in key

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {k}" for k in missing if not is_backend(k)]
                + [f"unexpected {k}" for k in unexpected if not is_backend(k)] + mismatched)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise ConfigError(f"init_from: {path} does not fit this model ({shown}); choose the model "
                          "preset, patch and data the checkpoint was trained with")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing


def single_console_log() -> None:
    """`import lightning` gives the "lightning" logger its own console handler, and the logger
    also propagates to the root handlers Hydra set up: every message would print twice. Keep
    Hydra's (console + the run folder's train.log)."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence messages that say nothing to a user of train.py: Lightning's "srun is available
    but not used" outside a SLURM job (SLURM is installed on the machine, but this run is no SLURM
    job; inside an allocation the hint stays), Lightning's advertising tips (litlogger,
    litmodels), Lightning's own use of a torch API that torch deprecated (`_pytree`), and its note
    that the module's `on_before_batch_transfer` (the labels' range check on the CPU) runs although
    a DataModule feeds the batches: that is the intent."""
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system")
    warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` "
                                              r"but have passed in a `LightningDataModule`")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in rank_zero_logger.filters:
        rank_zero_logger.addFilter(_not_a_tip)


def checked_kernel_options(changes) -> KernelOptions:
    """The kernel options in force with the config's `kernel_options` (vsa.ops.KernelOptions
    fields) applied; unknown names and bad values are refused with the fields."""
    names = [f.name for f in dataclasses.fields(KernelOptions)]
    with config_section("kernel_options"):
        changes = OmegaConf.to_container(changes, resolve=True) if isinstance(changes, DictConfig) else dict(changes)
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"no field {', '.join(unknown)}; the fields are {', '.join(names)}")
        return dataclasses.replace(current_kernel_options(), **changes)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; return the final callback metrics (train/loss, val/loss, ...).

    A relaunch of a finished run (its checkpoint already at trainer.max_steps) trains nothing,
    says so and returns {} (unless a callback asks to see the end of fit: `fits_when_finished`);
    a run stopped by Ctrl-C / SIGTERM saves last.ckpt at the step it
    reached and exits with status 130 / 143 (`RunCheckpoint`). The config's `kernel_options` are
    in force while it trains (the previous options come back after).
    """
    with kernel_options(checked_kernel_options(cfg.get("kernel_options") or {})):
        return fit(cfg)


def fit(cfg: DictConfig) -> dict[str, float]:
    """`train` without the kernel options."""
    from vsa.training.run_folder import record_config

    single_console_log()
    quiet_known_noise()
    check_missing(cfg)
    check_values(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt = resume_checkpoint(cfg, run_dir)
    checkpoint = check_resume(cfg, run_dir, ckpt) if ckpt is not None else None
    with config_section("trainer.max_steps"):
        max_steps = int(cfg.trainer.get("max_steps", -1) or -1)
    if (checkpoint is not None and 0 < max_steps <= checkpoint.get("global_step", 0)
            and not fits_when_finished(cfg)):
        rank_zero_info(f"{run_dir}: finished (step {checkpoint['global_step']} of trainer.max_steps="
                       f"{max_steps}); nothing to train. To train it longer, relaunch with a larger "
                       "trainer.max_steps; to start it over, add ckpt_path=null; for another run, "
                       "add run_name=NEW_NAME")
        return {}
    L.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        record_config(cfg, run_dir)

    with config_section("data"):
        datamodule = instantiate(cfg.data.datamodule, _convert_="all")
        item = datamodule.dataset[0]
        if cfg.data.key not in item:
            raise KeyError(f"data.key={cfg.data.key!r} but the dataset's items have keys {sorted(item)}")
        # A null codec argument means "not given" (an experiment switching the codec to identity
        # nulls the space-to-depth factor it inherits).
        codec_spec = {k: v for k, v in OmegaConf.to_container(cfg.data.codec, resolve=True).items()
                      if v is not None}
        codec = build_codec(**codec_spec)
        shape = tuple(item[cfg.data.key].shape)
        # Videos go through the codec; latents are the model's input as they are.
        latent_shape = codec.latent_shape(shape) if cfg.data.key == "video" else shape

    with config_section("model"):
        model = instantiate(cfg.model, in_channels=latent_shape[0], _convert_="all")
        tokens = math.prod(model.cfg.token_grid(latent_shape[1:]))
    with config_section("data"):
        check_conditioning(item, model.cfg)
    if checkpoint is not None:
        check_checkpoint_model(checkpoint, model, ckpt)
        del checkpoint  # Lightning reads it again, for real
    with config_section("module"):
        module = instantiate(cfg.module, model=model, codec=codec_spec, data_key=cfg.data.key,
                             latent_shape=list(latent_shape), fps=cfg.data.fps, _convert_="all")
    if not isinstance(module, VideoDiffusionModule):
        raise ConfigError(f"module._target_ must build a VideoDiffusionModule, got {type(module).__name__}")
    if cfg.get("init_from"):
        with config_section("init_from"):
            fresh = load_init_weights(model, cfg.init_from)
        rank_zero_info(f"Initialised from {cfg.init_from} ({len(fresh)} backend tensors at their init)")

    callbacks = build_callbacks(cfg)
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # Each refresh turns the bar's metrics into Python floats (a GPU sync): refresh on the
        # logged steps only, not after every step.
        callbacks.append(StepProgressBar(refresh_rate=max(1, int(cfg.trainer.get("log_every_n_steps", 1)))))
    loggers = build_loggers(cfg, run_dir)
    plugins = [AtomicCheckpointIO()]
    from lightning.fabric.plugins.environments import SLURMEnvironment
    if SLURMEnvironment.detect():
        # One requeue mechanism: the launcher's (submitit's SIGUSR2 handler under
        # hydra/launcher=slurm, the batch script's trap in scripts/slurm/train.sbatch). Lightning's
        # own SIGUSR1 auto-requeue would write hpc_ckpt_N.ckpt files that resuming from last.ckpt
        # ignores (docs/slurm.md).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    with config_section("trainer"):
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
            precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
            default_root_dir=str(run_dir), _convert_="all")

    rank_zero_info(f"Run folder {run_dir}: {type(model).__name__} {model.cfg.attention} "
                   f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), input "
                   f"{list(latent_shape)} = {tokens} tokens")
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt is not None else None)
    except RuntimeError as exc:
        # torch.utils.data: "DataLoader worker (pid N) is killed by signal: ..." / "exited unexpectedly"
        if "DataLoader worker" not in str(exc):
            raise
        raise RunStopped(f"a data-loader worker died at step {trainer.global_step} "
                         f"({str(exc).strip().splitlines()[0]}); {saved_so_far(cfg, run_dir)}. Relaunch "
                         "the same command to resume (the worker may have run out of memory: fewer "
                         "data.datamodule.num_workers, or 0 to load in the main process)") from exc
    stopped_by = next((c.stopped_by for c in callbacks if isinstance(c, RunCheckpoint) and c.stopped_by), None)
    if stopped_by is not None:
        import signal

        rank_zero_info(f"Stopped by {signal.Signals(stopped_by).name} at step {trainer.global_step}: "
                       f"{run_dir}/checkpoints/last.ckpt holds that step; relaunch the same command "
                       "to resume")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish(exit_code=128 + stopped_by)
        raise SystemExit(128 + stopped_by)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
    return {name: float(value) for name, value in trainer.callback_metrics.items()}
