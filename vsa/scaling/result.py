"""The result row of one scaling-sweep run: `<run folder>/result.json`.

`ResultRowWriter`, a callback the sweeps add (configs/sweep/_scaling.yaml), calls `write_result_row`
when `fit` ends; `train()` knows nothing of sweeps. The row holds what the report needs (docs/scaling.md lists every
field): model size, FLOPs actually spent, tokens, the final validation loss of the raw and of the
EMA weights under the fixed protocol, wall-clock and throughput.

Which weights are which: Lightning's `EMAWeightAveraging` swaps the EMA weights in for validation
(so the logged `val/loss` is the EMA one) and copies them into the model when training ends. So
after `fit` the model holds the EMA weights; `RunRecorder` keeps a CPU copy of the raw weights of
the final step (or, for a run that was already finished when relaunched, they come from
`last.ckpt`'s "current_model_state").
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from omegaconf import DictConfig, OmegaConf

from vsa.attention import BACKENDS
from vsa.config import config_section
from vsa.diffusion import validation_loss
from vsa.scaling.budget import run_spec
from vsa.scaling.rows import RESULT_FILE

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


class RunRecorder(Callback):
    """Measures a run for its result row and keeps the raw weights of its final step.

    - wall_clock_s: time inside `fit` (training, validation, checkpointing), summed over all
      launches of the run: the total is saved in checkpoints, so a resumed or requeued run adds
      to it (time lost since the last checkpoint of a killed launch counts again when redone).
    - train_time_s / launch tokens: training batches only (data loading included, validation
      excluded), for tokens/s.
    - step_times: the duration of each training step of this launch; their median x steps is
      the run's steady-state GPU time (`gpu_time_s` in the row), which leaves out one-off costs
      (compilation, the Triton autotuner's first calls, validation) that a longer run would not
      repeat and that would otherwise weigh on the short runs only.
    - clock: how the steps are timed, without stopping the GPU at each one. On a GPU ("cuda_events")
      a CUDA event is recorded on the stream at the end of every step and the durations between
      them are read every SETTLE_EVERY steps and when asked for: the time the GPU's stream took from
      one step's end to the next, its idle gaps included. (Until 2026-12-08 the recorder waited
      for the GPU after every step, "synced" in older rows: that wait kept the host from queueing
      the next step while the GPU worked, so every step also paid the host's own time to launch
      it, which weighs most on the fastest steps.) On the CPU ("wall") the wall clock.
    - raw_state: a CPU copy of the model's own (non-EMA) weights after the final step, taken on
      global rank 0 only, and only when a weight-averaging callback (EMA) is attached.
    """

    def __init__(self) -> None:
        self.previous_wall_clock = 0.0
        self.previous_train_time = 0.0
        self.launches = 0
        self.raw_state: dict[str, torch.Tensor] | None = None
        self._fit_start: float | None = None
        self._fit_end: float | None = None
        self.launch_steps = 0
        self._last: float | torch.cuda.Event | None = None
        self._first_step = 0
        self._pending: list[tuple] = []  # (start, end) marks whose duration is not read yet
        self._step_times: list[float] = []
        self._launch_train_time = 0.0
        self.clock: str | None = None

    def state_dict(self) -> dict:
        return {"wall_clock_s": self.wall_clock_s, "train_time_s": self.train_time_s,
                "launches": self.launches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.previous_wall_clock = float(state_dict.get("wall_clock_s", 0.0))
        self.previous_train_time = float(state_dict.get("train_time_s", 0.0))
        self.launches = int(state_dict.get("launches", 0))

    @property
    def wall_clock_s(self) -> float:
        if self._fit_start is None:
            return self.previous_wall_clock
        end = self._fit_end if self._fit_end is not None else time.perf_counter()
        return self.previous_wall_clock + end - self._fit_start

    SETTLE_EVERY = 200  # steps: one wait for the GPU per this many bounds the pending events

    @property
    def step_times(self) -> list[float]:
        self._settle()
        return self._step_times

    @property
    def launch_train_time(self) -> float:
        self._settle()
        return self._launch_train_time

    @property
    def train_time_s(self) -> float:
        return self.previous_train_time + self.launch_train_time

    @property
    def median_step_s(self) -> float | None:
        """Median duration of this launch's training steps (s), None before the first one."""
        times = self.step_times
        if not times:
            return None
        ordered = sorted(times)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def _mark(self) -> float | torch.cuda.Event:
        """A point in time: a CUDA event recorded on the current stream (no wait), or the wall clock."""
        if self.clock == "cuda_events":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _settle(self) -> None:
        """Turn the pending marks into step durations (on a GPU: one wait, for the last event)."""
        if self._pending and not isinstance(self._pending[-1][1], float):
            self._pending[-1][1].synchronize()
        for start, end in self._pending:
            seconds = end - start if isinstance(end, float) else start.elapsed_time(end) / 1e3
            self._step_times.append(seconds)
            self._launch_train_time += seconds
        self._pending.clear()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start, self._fit_end = time.perf_counter(), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.launches += 1  # after the checkpoint (and its launch count) was restored
        self._first_step = trainer.global_step
        self.clock = "cuda_events" if trainer.strategy.root_device.type == "cuda" else "wall"
        self._last = self._mark()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = self._mark()
        self._pending.append((self._last, now))
        self._last = now
        if len(self._pending) >= self.SETTLE_EVERY:
            self._settle()
        self.launch_steps = trainer.global_step - self._first_step
        final = 0 < trainer.max_steps <= trainer.global_step
        ema = any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)
        if final and ema and trainer.is_global_zero:
            self.raw_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last is not None and not trainer.sanity_checking:
            self._last = self._mark()  # validation is not training time

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle()
        self._fit_end = time.perf_counter()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


@torch.no_grad()
def fixed_protocol_loss(module, loader, precision_plugin, with_error: bool = False):
    """The validation loss `module.validation_step` logs (fixed protocol, batch-size weighted mean),
    computed for the weights the module holds now. With `with_error`: (loss, standard error), the
    error being the spread of the per-batch losses / sqrt(batches): how much the loss would move
    on another validation set of the same size (None with a single batch)."""
    total, count, per_batch = 0.0, 0, []
    for batch_idx, batch in enumerate(loader):
        module.check_labels(batch)  # on the CPU, before the move
        batch = move_data_to_device(batch, module.device)
        with precision_plugin.forward_context():
            x0 = module.encode(batch)
            loss = validation_loss(module.model, x0, module.condition(batch),
                                   seed=module.validation["seed"] + batch_idx, n_t=module.validation["n_t"])
        total += loss * x0.shape[0]
        count += x0.shape[0]
        per_batch.append(loss)
    if count == 0:
        raise ValueError("the validation set is empty; a scaling run needs data.datamodule.val_size > 0")
    if not with_error:
        return total / count
    error = float(torch.tensor(per_batch).std() / len(per_batch) ** 0.5) if len(per_batch) > 1 else None
    return total / count, error


def _raw_weights_from_checkpoint(run_dir: Path, step: int) -> dict | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if ckpt.get("global_step") != step or "current_model_state" not in ckpt:
        return None
    return ckpt["current_model_state"]


def validation_losses(trainer: L.Trainer, module, datamodule, run_dir: Path,
                      recorder: RunRecorder | None) -> tuple[float | None, float | None, str, float | None]:
    """(raw, ema, note, error): final fixed-protocol validation losses of the raw and the EMA
    weights, and the standard error of the EMA one (of the raw one without EMA)."""
    loader = datamodule.val_dataloader()
    ema = any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)
    if not ema:
        raw_loss, error = fixed_protocol_loss(module, loader, trainer.precision_plugin, with_error=True)
        return raw_loss, None, "no EMA callback", error
    # fit ended: the module holds the EMA weights
    ema_loss, error = fixed_protocol_loss(module, loader, trainer.precision_plugin, with_error=True)
    raw_state = recorder.raw_state if recorder is not None else None
    note = "raw weights: final-step copy"
    if raw_state is None:
        raw_state = _raw_weights_from_checkpoint(run_dir, trainer.global_step)
        note = "raw weights: last.ckpt current_model_state"
    if raw_state is None:
        return None, ema_loss, "raw weights unavailable (no final-step copy, no matching last.ckpt)", error
    ema_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    module.load_state_dict(raw_state)
    try:
        raw_loss = fixed_protocol_loss(module, loader, trainer.precision_plugin)
    finally:
        module.load_state_dict(ema_state)
    return raw_loss, ema_loss, note, error


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _write_json(path: Path, row: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, path)


def write_result_row(cfg: DictConfig, trainer: L.Trainer, module, datamodule) -> dict | None:
    """Evaluate the finished run and write `<run folder>/result.json` (global rank 0). Returns the
    row, or None when training did not reach max_steps (stopped early: the row comes later)."""
    if not trainer.is_global_zero:
        return None
    run_dir = Path(cfg.paths.output_dir)
    if trainer.global_step < trainer.max_steps:
        log.warning(f"run stopped at step {trainer.global_step} of {trainer.max_steps}: no result row yet "
                    "(relaunch to resume and finish it)")
        return None
    if "FSDP" in type(trainer.strategy).__name__:
        raise ValueError("result rows evaluate the model on rank 0, which FSDP's sharded weights "
                                  "do not allow; run scaling sweeps with trainer=ddp or single-device")
    scaling = cfg.scaling
    spec = run_spec(cfg)
    recorder = next((cb for cb in trainer.callbacks if isinstance(cb, RunRecorder)), None)
    # The trainer's teardown moved the module to the CPU: evaluate where it trained.
    module.to(trainer.strategy.root_device)
    raw, ema, note, val_error = validation_losses(trainer, module, datamodule, run_dir, recorder)
    wanted = str(scaling.get("loss") or "ema")
    if wanted not in ("ema", "raw"):
        raise ValueError(f"scaling.loss must be 'ema' or 'raw', got {wanted!r}")
    source = wanted if (ema if wanted == "ema" else raw) is not None else ("raw" if wanted == "ema" else "ema")
    chosen = ema if source == "ema" else raw

    steps = int(trainer.global_step)
    takes_sparsity = BACKENDS[spec.dit.attention].needs_sparsity
    final_sparsity = module.model.sparsity if takes_sparsity else None
    count = spec.sample_flops(final_sparsity)
    seq_len = count.tokens
    train_loss = trainer.callback_metrics.get("train/loss")
    tokens_per_s = None
    if recorder is not None and recorder.launch_train_time > 0:
        tokens_per_s = recorder.launch_steps * spec.global_batch * seq_len / recorder.launch_train_time
    overrides = None
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (e.g. train(cfg) called directly)
        pass
    row = {
        "schema": SCHEMA_VERSION,
        "sweep": str(scaling.get("sweep") or cfg.get("experiment_name")),
        "run_dir": str(run_dir),
        "overrides": overrides,
        "preset": cfg.model.name,
        "params": int(sum(p.numel() for p in module.model.parameters())),
        "attention": spec.dit.attention,
        "sparsity": final_sparsity,
        "topk": module.model.topk if takes_sparsity else None,
        "kept_fraction": count.kv_tokens / seq_len,
        "sparsity_schedule": (None if spec.schedule is None else
                              dict(zip(("target", "increment", "interval", "start"), spec.schedule))),
        "budget": float(scaling.budget),
        "budget_multiple": None if scaling.get("multiple") is None else float(scaling.multiple),
        "flops": spec.flops_for_steps(steps),
        "flops_per_sample": count.training,
        "attention_flops_per_sample": 3.0 * count.self_attention,
        "attention_fraction": count.self_attention / count.forward,
        "steps": steps,
        "global_batch": spec.global_batch,
        "batch_size": int(cfg.data.datamodule.batch_size),
        "world_size": int(trainer.world_size),
        "seq_len": seq_len,
        "latent_shape": list(spec.latent_shape),
        "samples": steps * spec.global_batch,
        "tokens": steps * spec.global_batch * seq_len,
        "val_loss": chosen,
        "val_loss_source": source,
        "val_loss_raw": raw,
        "val_loss_ema": ema,
        "val_note": note,
        "val_loss_se": val_error,
        "val_loss_se_of": "ema" if ema is not None else "raw",
        "val_samples": len(datamodule.val_set) if hasattr(datamodule, "val_set") else None,
        "val_n_t": int(module.validation["n_t"]),
        "train_loss": None if train_loss is None else float(train_loss),
        # sample quality of the final validation (vsa.eval; when callbacks.sample_quality is on)
        "class_acc": _metric(trainer, "val/class_acc"),
        "fd": _metric(trainer, "val/fd"),
        "shape_acc": _metric(trainer, "val/shape_acc"),
        "wall_clock_s": None if recorder is None else recorder.wall_clock_s,
        "train_time_s": None if recorder is None else recorder.train_time_s,
        "tokens_per_s": tokens_per_s,
        "compile": (str(module.compile_mode or "default") if getattr(module, "compile_blocks", False)
                    else "eager"),
        "step_time_s": None if recorder is None else recorder.median_step_s,
        "step_clock": None if recorder is None else recorder.clock,
        "gpu_time_s": (None if recorder is None or recorder.median_step_s is None
                       else recorder.median_step_s * steps),
        "launches": None if recorder is None else recorder.launches,
        "device": _device_name(module.device),
        "precision": str(trainer.precision),
        "seed": int(cfg.seed),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(run_dir / RESULT_FILE, row)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(
                {f"result/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
    log.info(f"result row {run_dir / RESULT_FILE}: {row['preset']} {row['attention']} budget "
             f"{row['budget']:.3g} -> {steps} steps, {row['flops']:.3g} FLOPs, val_loss {chosen}")
    return row


class ResultRowWriter(Callback):
    """Writes the run's result row (`write_result_row`) when `fit` ends, on global rank 0.

    `run`: the parts of the run's config the row reads (configs/sweep/_scaling.yaml passes them by
    interpolation: experiment_name, seed, paths.output_dir, and the scaling, model, data, trainer
    and callbacks.sparsity_schedule sections, from which `run_spec` derives the FLOPs). Errors
    come out as one-line ConfigErrors of the `scaling` section.

    A relaunch of a finished run (its checkpoint at trainer.max_steps) still fits, taking no step,
    so that the row gets written (`fit_when_finished`); a run stopped by a signal, or before
    max_steps, writes none yet.
    """

    fit_when_finished = True

    def __init__(self, run: dict) -> None:
        self.run = OmegaConf.create(run)
        self.row: dict | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(getattr(cb, "stopped_by", None) for cb in trainer.callbacks):
            return  # stopped by SIGTERM / SIGINT: the relaunch finishes the run and writes the row
        with config_section("scaling"):
            self.row = write_result_row(self.run, trainer, pl_module, trainer.datamodule)

