"""Training callbacks: the sparsity schedule, throughput/MFU, sample videos, sample quality
(class accuracy and Fréchet distance of generated videos), the run checkpoint.

EMA is Lightning's `EMAWeightAveraging` on an `AveragedModel` that does not wait for the GPU at
every update (`EMA`, configs/callbacks/default.yaml); learning-rate logging is Lightning's
`LearningRateMonitor`.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel

from vsa.diffusion import check_interval
from vsa.models.config import check_sparsity


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps up to trainer.max_steps, not batches of an epoch:
    a resumed run reads "500/1000", and its rate counts only the steps of this launch (tqdm's
    `initial`), not the 500 restored ones. Without max_steps it is Lightning's bar."""

    @property
    def total_train_batches(self):
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if trainer.max_steps and trainer.max_steps > 0 and bar is not None:
            bar.initial = bar.n = trainer.global_step
            bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not (trainer.max_steps and trainer.max_steps > 0):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class SparsitySchedule(Callback):
    """Dense -> VSA adaptation: a staircase of sparsities set on `pl_module.model.sparsity`.

        sparsity(step) = min(target, start + increment * (step // interval))

    It starts at `start` (0 = dense; with VSA "adapt" gates the model then equals the dense one)
    and rises by `increment` every `interval` optimizer steps until it reaches `target`. The value
    is a pure function of the global step, so resumed runs continue on the same staircase.
    """

    def __init__(self, target: float, increment: float, interval: int, start: float = 0.0) -> None:
        check_sparsity(target, None)
        check_sparsity(start, None)
        if not increment > 0:
            raise ValueError(f"sparsity schedule increment must be > 0, got {increment}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"sparsity schedule interval must be a positive int (steps), got {interval}")
        if start > target:
            raise ValueError(f"sparsity schedule start {start} is above its target {target}")
        self.target, self.increment, self.interval, self.start = (float(target), float(increment),
                                                                   int(interval), float(start))

    def value(self, step: int) -> float:
        return min(self.target, self.start + self.increment * (step // self.interval))

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.sparsity = self.value(trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)


def _is_log_step(trainer: L.Trainer, batches: int) -> bool:
    """Whether Lightning writes this training step's logged values (the rule it applies right
    after on_train_batch_end; a private attribute, so fall back to counting batches)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    return trainer.log_every_n_steps > 0 and batches % trainer.log_every_n_steps == 0


class NoWaitAveragedModel(AveragedModel):
    """torch's `AveragedModel` without its two waits for the GPU per update. Its step counter
    `n_averaged` is a buffer on the model's device, and `update_parameters` reads it on the host
    twice (`bool(n_averaged == 0)`, `n_averaged > 0`), so each update waits for all the work queued
    before it, the whole training step (pytorch/pytorch#157705 and #175085 discuss it). Here a host
    copy of the counter decides between the first update's copy and the average; it is read from
    the buffer once, at the first update after the model is made or loaded. Same arithmetic and
    state dict (the buffer still counts). Only the multi-tensor path (`multi_avg_fn`, what
    Lightning's `EMAWeightAveraging` uses) is rewritten; otherwise torch's own update runs."""

    host_count: int | None = None  # n_averaged on the host; None: read it at the next update

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.host_count = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.multi_avg_fn is None:
            self.host_count = None
            return super().update_parameters(model)
        if self.host_count is None:
            self.host_count = int(self.n_averaged)  # the one wait
        with_buffers = self.use_buffers
        averaged = [*self.module.parameters(), *self.module.buffers()] if with_buffers else list(self.parameters())
        current = [*model.parameters(), *model.buffers()] if with_buffers else list(model.parameters())
        groups: dict[tuple, tuple[list, list]] = {}
        for a, c in zip(averaged, current, strict=True):
            a, c = a.detach(), c.detach().to(a.device)
            if self.host_count == 0:
                a.copy_(c)
            group = groups.setdefault((a.device, a.dtype), ([], []))
            group[0].append(a)
            group[1].append(c)
        if self.host_count > 0:
            for (device, _), (avg, cur) in groups.items():
                self.multi_avg_fn(avg, cur, self.n_averaged.to(device))
        if not with_buffers:
            for b_avg, b_model in zip(self.module.buffers(), model.buffers(), strict=True):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
        self.n_averaged += 1
        self.host_count += 1


class EMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging` (same arguments, checkpoints and weight swaps) whose
    averaged model does not wait for the GPU at each update (`NoWaitAveragedModel`). Its state in a
    checkpoint keeps the key of Lightning's class, so runs saved before it resume with their state
    (and the other way round)."""

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        averaged = getattr(self, "_average_model", None)
        if stage == "fit" and type(averaged) is AveragedModel:
            averaged.__class__ = NoWaitAveragedModel


class TrainingSpeed(Callback):
    """Logs throughput and MFU of training steps, from Lightning's `Throughput` over a window.

    Reads `flops_per_batch`, `tokens_per_batch` and `samples_per_batch` from the LightningModule
    (set in its training_step from the analytic FLOP counter). Time is wall-clock over training
    batches (data loading included), validation and sampling excluded. The clock is read (after a
    CUDA synchronize) only on the steps Lightning logs (`log_every_n_steps`) and before
    validation, so the callback adds no per-step host sync; rates cover the last `window_size`
    such readings.

    Logged (per device; `perf/global_*` too when there is more than one device):
        perf/step_time, perf/samples_per_sec, perf/tokens_per_sec, perf/tflops_per_sec, perf/mfu,
        perf/peak_memory_gb (CUDA only).

    Args:
        peak_flops: the device's peak FLOP/s for MFU; default H100 SXM dense bf16 (989.4e12).
            None: Lightning's table for the detected device and precision (None on CPU: no MFU).
        window_size: number of clock readings the rates are averaged over (a reading every
            `log_every_n_steps` steps). Until that many readings exist, the rates are those of the
            last interval between two readings, so they appear from the second logged step on
            (the first interval, with compilation and warm-up, is never in a rate).
    """

    def __init__(self, peak_flops: float | None = 989.4e12, window_size: int = 10) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (rates need two points), got {window_size}")
        self.peak_flops = peak_flops
        self.window_size = window_size
        self._throughput: Throughput | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        peak = self.peak_flops
        if peak is None:
            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            peak = get_available_flops(trainer.strategy.root_device, dtype)
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size,
                                      window_size=self.window_size)
        # The last interval's rates, reported until the long window is full.
        self._recent = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=2)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._throughput.reset()
        self._recent.reset()
        self._readings = 0
        self._elapsed, self._batches, self._samples, self._tokens = 0.0, 0, 0, 0
        self._pending, self._flops = 0, 0.0  # batches and FLOPs since the last clock reading
        self._last = self._now(trainer)

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _read_clock(self, trainer: L.Trainer) -> bool:
        """Account the batches since the last reading; False when there were none."""
        if not self._pending:
            return False
        now = self._now(trainer)
        self._elapsed += now - self._last
        self._last = now
        for throughput in (self._throughput, self._recent):
            throughput.update(time=self._elapsed, batches=self._batches, samples=self._samples,
                              lengths=self._tokens, flops=self._flops if self._flops else None)
        self._pending, self._flops = 0, 0.0
        self._readings += 1
        return True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batches += 1
        self._pending += 1
        self._samples += pl_module.samples_per_batch
        self._tokens += pl_module.tokens_per_batch
        self._flops += pl_module.flops_per_batch or 0.0
        if not _is_log_step(trainer, self._batches) or not self._read_clock(trainer):
            return
        full = self._readings >= self.window_size
        metrics = (self._throughput if full else self._recent).compute()
        names = {"device/samples_per_sec": "perf/samples_per_sec",
                 "device/items_per_sec": "perf/tokens_per_sec",
                 "device/mfu": "perf/mfu",
                 "samples_per_sec": "perf/global_samples_per_sec",
                 "items_per_sec": "perf/global_tokens_per_sec"}
        logged = {new: float(metrics[old]) for old, new in names.items() if old in metrics}
        if "device/batches_per_sec" in metrics:
            logged["perf/step_time"] = 1.0 / float(metrics["device/batches_per_sec"])
        if "device/flops_per_sec" in metrics:
            logged["perf/tflops_per_sec"] = float(metrics["device/flops_per_sec"]) / 1e12
        if trainer.strategy.root_device.type == "cuda":
            logged["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if logged:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._throughput is not None and hasattr(self, "_last"):
            self._read_clock(trainer)  # the batches since the last reading end here

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._throughput is not None and hasattr(self, "_last"):
            self._last = self._now(trainer)  # validation (and sampling) time is not training time


class ValidationEveryNSteps(Callback):
    """Base of the callbacks that do something at the end of validation at most every
    `every_n_steps` training steps (not during the sanity check); `last_step` is saved in
    checkpoints, so a resumed run keeps the schedule."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last_step = 0

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = int(state_dict.get("last_step", 0))

    def due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.global_step >= self.last_step + self.every_n_steps


class SampleVideos(ValidationEveryNSteps):
    """Every `every_n_steps` (checked at the end of validation), sample a few videos, write them as
    mp4 files + a PNG grid under `<run folder>/samples/step_XXXXXXX/`, and log them to W&B
    (`samples/video`, `samples/grid`) when a WandbLogger is attached.

    Placed before the EMA callback in the callback list, it runs while the EMA weights are swapped
    in for validation, so the videos show the EMA model.
    """

    def __init__(self, every_n_steps: int = 1000, num_videos: int = 4, steps: int = 32,
                 method: str = "euler", cfg_scale: float = 4.0, seed: int = 0,
                 prompts: list[str] | None = None, text_encoder: str | None = None,
                 text_max_length: int = 512, cfg_interval: list[float] | None = None) -> None:
        super().__init__(every_n_steps)
        if num_videos < 1 or steps < 1:
            raise ValueError("num_videos and steps must be >= 1")
        self.num_videos, self.steps = num_videos, steps
        self.method, self.cfg_scale, self.seed = method, cfg_scale, seed
        self.cfg_interval = check_interval(cfg_interval)
        # Text-conditional models: the prompts, cycled over the videos; models trained on caption
        # embeddings also need the encoder's folder (loaded at the first sampling).
        self.prompts = list(prompts) if prompts else None
        self.text_encoder_path, self.text_max_length = text_encoder, text_max_length
        self._text_encoder = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        step = self.last_step = trainer.global_step
        from vsa.data.media import save_grid, to_uint8_frames, write_mp4
        from vsa.diffusion import generate

        prompts, model_cfg = None, pl_module.model.cfg
        if model_cfg.text_dim:
            if not self.prompts:
                rank_zero_warn("SampleVideos: the model is text-conditional; give it prompts "
                               "(callbacks.sample_videos.prompts=[...]); no samples written")
                return
            if not model_cfg.caption_words and self._text_encoder is None:
                if not self.text_encoder_path:
                    rank_zero_warn("SampleVideos: the model takes caption embeddings; give the text encoder "
                                   "(callbacks.sample_videos.text_encoder=PATH); no samples written")
                    return
                from vsa.data.text import TextEncoder

                self._text_encoder = TextEncoder.from_folder(self.text_encoder_path, self.text_max_length)
            prompts = [self.prompts[i % len(self.prompts)] for i in range(self.num_videos)]
        if self._text_encoder is not None:
            self._text_encoder.to(pl_module.device)
        with trainer.precision_plugin.forward_context():
            latents = generate(pl_module.model, pl_module.latent_shape, self.num_videos, prompts=prompts,
                               text_encoder=self._text_encoder,
                               steps=self.steps, method=self.method, cfg_scale=self.cfg_scale,
                               cfg_interval=self.cfg_interval, shift=pl_module.time_shift, seed=self.seed,
                               device=pl_module.device)
        videos = to_uint8_frames(pl_module.decode(latents.float()))
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}"
        paths = [write_mp4(folder / f"video_{i:02d}.mp4", v, pl_module.fps) for i, v in enumerate(videos)]
        grid = save_grid(folder / "grid.png", videos)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_video("samples/video", [str(p) for p in paths], step=step,
                                 caption=[p.stem for p in paths], format=["mp4"] * len(paths))
                logger.log_image("samples/grid", [str(grid)], step=step)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` after the final training step (max_steps
    reached, or the trainer asked to stop) when the periodic schedule did not just do it, so a
    finished run always ends with a checkpoint of its last step. Writing goes through the trainer's
    checkpoint IO (AtomicCheckpointIO in vsa.training.train: temp file + fsync + rename).

    Ctrl-C (SIGINT) or SIGTERM during training asks the trainer to stop after the step in flight,
    which then writes `last.ckpt` of that step like a final one; `stopped_by` records the signal
    (vsa.training.train exits with 128 + its number). A second Ctrl-C quits at once, without
    saving. Only in a single-process run outside SLURM: under SLURM the launcher owns the signals
    (submitit's requeue, docs/slurm.md), and the ranks of a multi-process run could stop at
    different steps.
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped_by: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if (trainer.world_size == 1 and not SLURMEnvironment.detect()
                and threading.current_thread() is threading.main_thread()):
            def stop(signum: int, frame: Any) -> None:
                self.stopped_by = signum
                trainer.should_stop = True
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits now
                print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving "
                      "checkpoints/last.ckpt (Ctrl-C again to quit without saving)", flush=True)

            self._previous_handlers = {s: signal.signal(s, stop) for s in self.STOP_SIGNALS}

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = (0 < trainer.max_steps <= trainer.global_step) or trainer.should_stop
        if (final and self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if trainer.fast_dev_run:  # Lightning 2.6 would write last.ckpt here even in fast_dev_run
            return
        if (self.stopped_by is not None and self.save_last
                and self._last_global_step_saved != trainer.global_step):  # stopped between steps
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class PromptFollowing(ValidationEveryNSteps):
    """Every `every_n_steps` (checked at the end of validation), generate `videos` videos of a
    text-to-video model of the captioned moving shapes from held-out prompts and log how well they
    follow them, read from the pixels (`vsa.eval.prompts`): `val/prompt_colour`,
    `val/prompt_motion` and `val/prompt_both` (fractions; the data's own clips score 1.00 / 0.97 /
    0.97, other clips' captions 0.12 both). Before the EMA callback, it scores the EMA weights.
    Models without a caption vocabulary: a warning once, nothing else."""

    def __init__(self, every_n_steps: int = 400, videos: int = 16, steps: int = 16, method: str = "euler",
                 cfg_scale: float = 4.0, seed: int = 0) -> None:
        super().__init__(every_n_steps)
        if videos < 1 or steps < 1:
            raise ValueError("videos and steps must be >= 1")
        self.videos, self.steps = videos, steps
        self.method, self.cfg_scale, self.seed = method, cfg_scale, seed
        self._warned = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        step = trainer.global_step
        if not pl_module.model.cfg.caption_words or pl_module.data_key != "video":
            if not self._warned:
                self._warned = True
                rank_zero_warn("PromptFollowing: the model has no caption vocabulary or trains on "
                               "latents; no val/prompt_* (set callbacks.prompt_following=null)")
            return
        self.last_step = step
        from vsa.eval.prompts import generate_and_score_prompts

        with trainer.precision_plugin.forward_context():
            scores, _, _ = generate_and_score_prompts(
                pl_module.model, pl_module.latent_shape, pl_module.decode, self.videos, self.steps,
                method=self.method, cfg_scale=self.cfg_scale, shift=pl_module.time_shift, seed=self.seed)
        # Every rank generates the same seeded videos: no sync needed.
        pl_module.log_dict({f"val/prompt_{k}": float(scores[k]) for k in ("colour", "motion", "both")},
                           on_step=False, on_epoch=True)


class SampleQuality(ValidationEveryNSteps):
    """Every `every_n_steps` (checked at the end of validation), generate `per_class` videos of
    every class with the model under validation, and log how much they look like the data:
    `val/class_acc` (a classifier trained on the data set assigns them their class; chance =
    1 / num_classes), `val/fd` (Fréchet distance to real videos in the classifier's features) and,
    on the procedural shapes, `val/shape_acc` (their objects have the class's shape, by a
    colour-blind classifier of silhouettes), beside `val/loss` in every logger (W&B, CSV). See
    `vsa.eval`.

    The classifier is trained once per data set config (seconds to a minute on a CPU) and cached
    (`cache_dir`, default ~/.cache/vsa/eval). Placed before the EMA callback, it scores the EMA
    weights. Class-conditional models on video data sets with labels only: otherwise it logs a
    warning once and does nothing.

    Args:
        dataset: the data set config (with `_target_`), e.g. ${data.datamodule.dataset}.
        every_n_steps, per_class, steps, method, cfg_scale, seed, cfg_interval: what to generate
            and when (cfg_interval: guidance only at t_lo <= t <= t_hi; None = every step).
        cache_dir: where the classifier is cached (None: $VSA_CACHE/eval or ~/.cache/vsa/eval).
        recipe, shape_recipe: ClassifierRecipe / ShapeRecipe fields to change (e.g. fewer steps for
            tests).
    """

    def __init__(self, dataset: dict, every_n_steps: int = 200, per_class: int = 4, steps: int = 16,
                 method: str = "euler", cfg_scale: float = 4.0, seed: int = 0,
                 cache_dir: str | None = None, recipe: dict | None = None,
                 shape_recipe: dict | None = None, cfg_interval: list[float] | None = None) -> None:
        super().__init__(every_n_steps)
        if per_class < 1 or steps < 1:
            raise ValueError("per_class and steps must be >= 1")
        self.dataset = dataset
        self.per_class, self.steps = per_class, steps
        self.method, self.cfg_scale, self.seed, self.cache_dir = method, cfg_scale, seed, cache_dir
        self.cfg_interval = check_interval(cfg_interval)
        self.recipe, self.shape_recipe = dict(recipe or {}), dict(shape_recipe or {})
        self._metrics = None
        self._disabled = False

    def state_dict(self) -> dict:
        from vsa.eval import plain_config

        return {**super().state_dict(), "dataset": plain_config(self.dataset)}

    def _usable(self, pl_module: L.LightningModule) -> bool:
        if self._disabled:
            return False
        problem = None
        if not pl_module.model.cfg.num_classes:
            problem = "the model is not class-conditional"
        elif pl_module.data_key != "video":
            problem = "the model trains on latents, not videos"
        if problem:
            self._disabled = True
            rank_zero_warn(f"SampleQuality: {problem}; no val/class_acc or val/fd (set "
                           "callbacks.sample_quality=null to silence this)")
        return problem is None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer) or not self._usable(pl_module):
            return
        self.last_step = trainer.global_step
        from vsa.eval.samples import generate_and_score, metrics_for

        if self._metrics is None:
            self._metrics = metrics_for(self.dataset, pl_module.model.cfg.num_classes,
                                        self.cache_dir, self.recipe, self.shape_recipe)
        with trainer.precision_plugin.forward_context():
            scores, _ = generate_and_score(
                pl_module.model, pl_module.latent_shape, pl_module.decode, self._metrics,
                per_class=self.per_class, steps=self.steps, method=self.method,
                cfg_scale=self.cfg_scale, shift=pl_module.time_shift, seed=self.seed,
                cfg_interval=self.cfg_interval)
        # Every rank generates the same seeded videos: no sync needed.
        pl_module.log_dict({f"val/{k}": v for k, v in scores.items()}, on_step=False, on_epoch=True)
