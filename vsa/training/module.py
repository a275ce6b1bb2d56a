"""`VideoDiffusionModule`: a VideoDiT trained with the rectified-flow objective under Lightning.

    batch {video | latents, label, [text_emb, text_mask]}
      -> codec.encode (videos only) -> x0 [B, C, T, H, W]
      -> t ~ logit-normal, shifted for the sequence length -> flow-matching MSE

- Optimiser: AdamW; weight decay only on the weights of linear layers (not on biases, norms,
  embeddings or the adaLN offsets). Learning rate: linear warm-up, then constant or cosine decay
  (`WarmupSchedule`). Gradient clipping and mixed precision are the trainer's job.
- Randomness: noise, timesteps and condition dropout are drawn per sample from a seed of (seed,
  step, micro-batch, the sample's position in the global batch) (`sample_draws`), so a step does
  not depend on what ran before it (a resumed run draws exactly what an uninterrupted one would)
  nor on the number of GPUs (1 GPU with batch B and N ranks with B/N draw the same). The global
  RNG is also re-seeded before every batch from (seed, step, micro-batch, rank).
- Validation: the fixed protocol of `vsa.diffusion.validation` (fixed t grid, seeded noise),
  logged as `val/loss`, weighted by batch size.
- `flops_per_batch` / `tokens_per_batch` / `samples_per_batch` are updated every training step
  (the Lightning convention read by throughput callbacks); FLOPs come from the analytic counter
  at the model's current sparsity.
- Checkpoints carry, under the key "vsa" (`vsa.checkpoint`), everything `vsa.sampling` needs to rebuild and run the
  model without the training config: the DiTConfig, the latent shape, the codec, the timestep
  shift recipe, the fps and the current sparsity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from vsa.attention import BACKENDS
from vsa.checkpoint import CHECKPOINT_KEY, sampling_spec
from vsa.config import RunStopped
from vsa.data.codecs import build_codec
from vsa.diffusion import flow_matching_loss, sample_timesteps, timestep_shift, validation_loss
from vsa.models import VideoDiT
from vsa.training.flops import training_flops

# What a non-finite training loss does (VideoDiffusionModule's nonfinite_loss).
NONFINITE_ACTIONS = ("stop", "skip")
NO_BAD_STEP = 2**62

# torch.compile modes accepted for the blocks (None = torch's default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class WarmupSchedule:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then `decay` ("constant" or
    "cosine" down to `min_ratio` at `total_steps`, flat after it). A callable object, so LambdaLR
    can save it."""

    warmup_steps: int = 0
    total_steps: int = 0
    decay: str = "cosine"
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule.decay must be 'constant' or 'cosine', got {self.decay!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and min_ratio in [0, 1], got "
                             f"{self.warmup_steps}, {self.min_ratio}")
        if self.decay == "cosine" and self.total_steps < 1:
            raise ValueError(f"cosine decay needs total_steps >= 1, got {self.total_steps}; set "
                             "lr_schedule.total_steps (default: trainer.max_steps) or use decay=constant")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        # A run shorter than its warm-up (a benchmark of a long recipe) never gets here.
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, *indices: int) -> int:
    """A well-mixed 63-bit seed for (seed, *indices)."""
    words = np.random.SeedSequence((seed, *indices)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class VideoDiffusionModule(L.LightningModule):
    """Flow-matching training of a VideoDiT (see the module docstring).

    Args:
        model: the VideoDiT (its config fixes architecture, attention backend and sparsity), or
            a pretrained diffusers Wan with VSA (`vsa.models.wan.WanVideoModel`, docs/wan.md).
        codec: codec spec for `vsa.data.build_codec`, e.g. {"name": "space_to_depth", "factor":
            [1, 2, 2]}; applied to `video` batches, and used to decode samples to pixels.
        data_key: batch key of the model input: "video" (encoded by the codec) or "latents".
        latent_shape: (C, T, H, W) of one model input, for sampling from a checkpoint.
        fps: frame rate of written sample videos.
        optimizer: AdamW keyword arguments (lr, betas, eps, weight_decay, fused, ...).
        lr_schedule: WarmupSchedule fields (warmup_steps, total_steps, decay, min_ratio).
        timesteps: logit-normal `mean`, `std`; `shift` (None: resolution shift from `base_seq_len`,
            `base_shift`).
        validation: fixed protocol settings `n_t` (time points) and `seed`.
        seed: seed of the per-step training randomness.
        compile_blocks: torch.compile every DiT block (VideoDiT.compile_blocks) when the trainer
            starts fitting: fused norms/RoPE/modulation, one graph per block, ~first steps slow.
        compile_mode: torch.compile mode for the blocks (None = default; "reduce-overhead" adds
            CUDA graphs, which hide the per-op host time: 400M VSA step 178 -> 165 ms on an H100).
        nonfinite_loss: what a NaN or inf training loss does. "stop" (default): the run stops
            with RunStopped, naming the first bad step and the last checkpoint, and writes no
            checkpoint after it; the check costs no host sync: the first bad step is kept on the
            device and read on the logged steps and before every checkpoint write. "skip": the
            step is skipped (no backward, no update) and counted in `train/skipped_steps`; this
            reads the loss on the host every step (one sync).
    """

    def __init__(self, model: VideoDiT, codec: dict | None = None, data_key: str = "video",
                 latent_shape: Sequence[int] | None = None, fps: int = 8,
                 optimizer: dict | None = None, lr_schedule: dict | None = None,
                 timesteps: dict | None = None, validation: dict | None = None, seed: int = 0,
                 compile_blocks: bool = False, compile_mode: str | None = None,
                 nonfinite_loss: str = "stop") -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_ACTIONS:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_ACTIONS}, got {nonfinite_loss!r}")
        if data_key not in ("video", "latents"):
            raise ValueError(f"data_key must be 'video' or 'latents', got {data_key!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.save_hyperparameters(ignore=["model"], logger=False)
        self.model = model
        self.codec_spec = dict(codec or {"name": "identity"})
        # The codec is kept out of the module tree: a VAE's frozen weights must not enter
        # checkpoints, the optimiser or the EMA copy.
        self._codec = [build_codec(**self.codec_spec)]
        self.data_key = data_key
        self.latent_shape = None if latent_shape is None else tuple(int(s) for s in latent_shape)
        self.fps = int(fps)
        self.optimizer_kwargs = dict(optimizer or {"lr": 1e-4})
        self.schedule = WarmupSchedule(**(lr_schedule or {"decay": "constant"}))
        self.timesteps = {"mean": 0.0, "std": 1.0, "shift": None, "base_seq_len": 4096,
                          "base_shift": 1.0, **(timesteps or {})}
        self.validation = {"n_t": 8, "seed": 0, **(validation or {})}
        self.seed = int(seed)
        self.compile_blocks = bool(compile_blocks)
        self.compile_mode = compile_mode
        self.nonfinite_loss = nonfinite_loss
        self.skipped_steps = 0
        self._first_bad_step: torch.Tensor | None = None  # stop mode: on the device, NO_BAD_STEP = none
        self.flops_per_batch: float | None = None
        self.tokens_per_batch = 0
        self.samples_per_batch = 0

    # ---- inputs ------------------------------------------------------------------------------

    @property
    def codec(self) -> nn.Module:
        return self._codec[0]

    def encode(self, batch: dict) -> torch.Tensor:
        """x0 [B, C, T, H, W]: the batch's latents, or its videos through the codec."""
        if self.data_key not in batch:
            raise KeyError(f"batch has no {self.data_key!r} (keys: {sorted(batch)}); set data.key to "
                           "'video' for video datasets or 'latents' for latent shards")
        x = batch[self.data_key].float()
        if self.data_key == "latents":
            return x
        codec = self.codec
        param = next(codec.parameters(), None)
        if param is not None and param.device != x.device:
            codec.to(x.device)
        return codec.encode(x)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> pixels (through the codec)."""
        codec = self.codec
        param = next(codec.parameters(), None)
        if param is not None and param.device != x0.device:
            codec.to(x0.device)
        return codec.decode(x0)

    def check_labels(self, batch: dict) -> None:
        """Raise if a batch's class labels reach past the model's classes. Reads the labels only
        where they are on the CPU: reading a GPU tensor makes the host wait for all the work queued
        before it (the previous step), every step. Lightning's batches are checked before they move
        to the device (`on_before_batch_transfer`)."""
        labels = batch.get("label") if self.model.cfg.num_classes else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and labels.numel():
            top = int(labels.max())
            if top >= self.model.cfg.num_classes:
                raise ValueError(f"label {top} >= num_classes {self.model.cfg.num_classes}; set "
                                 "data.num_classes to the number of classes in the data")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):
            self.check_labels(batch)
        return batch

    def condition(self, batch: dict) -> dict:
        """Model keyword arguments from a batch: class labels (-1 = none -> the null class) and/or
        text embeddings, as the model's config asks for. Labels are range-checked here when they
        are on the CPU (`check_labels`)."""
        cfg = self.model.cfg
        cond: dict[str, Any] = {}
        if cfg.num_classes:
            labels = batch.get("label")
            if labels is None:
                raise KeyError("the model is class-conditional (num_classes > 0) but the batch has no "
                               "`label`; set model.num_classes=0 for unlabelled data")
            self.check_labels(batch)
            cond["labels"] = torch.where(labels < 0, cfg.num_classes, labels)
        if cfg.text_dim and cfg.caption_words:  # the model embeds the captions itself
            if "caption" not in batch:
                raise KeyError("the model embeds captions (model.caption_words) but the batch has no "
                               "`caption`; use a data set with captions (data.datamodule.dataset.captions=true)")
            cond["text"], cond["text_mask"] = self.model.embed_captions(batch["caption"])
        elif cfg.text_dim:
            if "text_emb" not in batch:
                raise KeyError("the model cross-attends to text (text_dim > 0) but the batch has no "
                               "`text_emb`; use latent shards written with text embeddings")
            cond["text"] = batch["text_emb"]
            cond["text_mask"] = batch.get("text_mask")
        return cond

    def seq_len(self, x0: torch.Tensor) -> int:
        return math.prod(self.model.cfg.token_grid(x0.shape[2:]))

    def time_shift(self, seq_len: int) -> float:
        ts = self.timesteps
        return timestep_shift(seq_len, ts["shift"], ts["base_seq_len"], ts["base_shift"])

    def on_fit_start(self) -> None:
        # After the callbacks' setup, so the EMA copy (made there) is a plain module; not in
        # configure_model, which the EMA callback calls before copying. Compiles once per model.
        if self.compile_blocks and not self.model.blocks_compiled:
            self.model.compile_blocks(**({"mode": self.compile_mode} if self.compile_mode else {}))

    # ---- training ----------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        seed = step_seed(self.seed, self.global_step, micro, self.global_rank)
        # The generators a step can use, the CPU's and the GPUs', as torch.manual_seed seeds them.
        # torch.manual_seed also queues a seed for every device type not started yet (XPU, MTIA,
        # CUDA on a CPU machine), formatting a stack trace for each: ~1.8 ms a step on the CPU.
        torch.random.default_generator.manual_seed(seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)

    def sample_draws(self, x0: torch.Tensor, batch_idx: int):
        """Timesteps [B], noise (x0's shape) and CFG-dropout mask [B] of a training batch, drawn
        per sample from a seed of (seed, step, micro-batch, the sample's position in the global
        batch). Rank r of N holds the global batch's positions r, r + N, r + 2N, ... (the sampler
        shards the data so), so one GPU with batch B and N ranks with batch B/N draw the same noise
        for the same samples: their loss curves agree up to the order of the gradient sums."""
        B, device = x0.shape[0], x0.device
        world, rank = self.trainer.world_size, self.trainer.global_rank
        micro = batch_idx % self.trainer.accumulate_grad_batches
        ts = self.timesteps
        shift = self.time_shift(self.seq_len(x0))
        t, noise, drop = [], [], []
        for j in range(B):
            gen = torch.Generator(device=device)
            gen.manual_seed(step_seed(self.seed, self.global_step, micro, rank + world * j))
            t.append(sample_timesteps(1, ts["mean"], ts["std"], shift, device=device, generator=gen))
            noise.append(torch.randn(x0.shape[1:], generator=gen, device=device))
            drop.append(torch.rand(1, generator=gen, device=device) < self.model.cfg.cond_dropout)
        return torch.cat(t), torch.stack(noise), torch.cat(drop)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x0 = self.encode(batch)
        cond = self.condition(batch)
        B, L_tokens = x0.shape[0], self.seq_len(x0)
        t, noise, drop = self.sample_draws(x0, batch_idx)
        loss = flow_matching_loss(self.model, x0, t, noise, cond_drop=drop, **cond)

        text_len = cond["text"].shape[1] if "text" in cond else 0
        self.flops_per_batch = B * training_flops(self.model.cfg, x0.shape[2:], text_len,
                                                  sparsity=self.model.sparsity, topk=self.model.topk)
        self.tokens_per_batch, self.samples_per_batch = B * L_tokens, B
        # The global batch's mean (ranks hold equal shares): comparable across GPU counts.
        self.log("train/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        if BACKENDS[self.model.cfg.attention].needs_sparsity and self.model.sparsity is not None:
            # As a tensor filled on the device: Lightning turns a logged Python number into one with
            # torch.tensor(value, device=...), a copy from the host that waits for the GPU.
            sparsity = torch.full((), float(self.model.sparsity), device=loss.device)
            self.log("train/sparsity", sparsity, batch_size=B)
        return self._guard_nonfinite(loss)

    # ---- non-finite losses -------------------------------------------------------------------

    def _guard_nonfinite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """The loss to train on, or None to skip the step (skip mode, a NaN/inf loss on any rank)."""
        bad = ~torch.isfinite(loss.detach())
        if self.nonfinite_loss == "skip":
            skip = self.trainer.strategy.reduce(bad.float(), reduce_op="max").item() > 0
            if skip:
                self.skipped_steps += 1
                print(f"step {self.global_step}: train/loss is {loss.item()}; step skipped "
                      f"({self.skipped_steps} so far, module.nonfinite_loss=skip)", flush=True)
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None if skip else loss
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.long, device=loss.device)
        self._first_bad_step = torch.where(bad, torch.clamp(self._first_bad_step, max=self.global_step),
                                           self._first_bad_step)
        return loss

    def check_finite(self, saving: bool = False) -> None:
        """Stop mode: raise RunStopped when a step since the run began had a non-finite loss on any
        rank (every rank calls this at the same steps). `saving`: called before a checkpoint write,
        which the error then prevents."""
        if self._first_bad_step is None:
            return
        step = int(self.trainer.strategy.reduce(self._first_bad_step.float(), reduce_op="min").item())
        if step >= NO_BAD_STEP:
            return
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        last = os.path.join(folder, "last.ckpt") if folder else None
        last = last if last and os.path.isfile(last) else "none written yet"
        raise RunStopped(
            f"train/loss was NaN or inf at step {step} (found at step {self.trainer.global_step}"
            f"{', before writing a checkpoint' if saving else ''}); stopped without saving, so the "
            f"last checkpoint stays as it was: {last}. Relaunch the same command to resume from it "
            "(e.g. with a lower module.optimizer.lr), or add module.nonfinite_loss=skip to skip "
            "such steps")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # On the logged steps, which read the metrics on the host anyway.
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = self.encode(batch)
        cond = self.condition(batch)
        loss = validation_loss(self.model, x0, cond, seed=self.validation["seed"] + batch_idx,
                               n_t=self.validation["n_t"])
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        if self._validates_ema():  # the same number, under a name that says which weights made it
            self.log("val/loss_ema", loss, batch_size=x0.shape[0], sync_dist=True)

    def _validates_ema(self) -> bool:
        """Whether validation runs on EMA weights: Lightning's weight-averaging callbacks swap the
        averaged weights in for validation."""
        from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

        trainer = self._trainer
        return trainer is not None and any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        # FSDP shards the gradients: Lightning's precision plugin refuses norm clipping there, and
        # FSDP's own clip_grad_norm_ computes the norm over all shards.
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        if (isinstance(model, FullyShardedDataParallel) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
        kwargs = dict(self.optimizer_kwargs)
        weight_decay = kwargs.pop("weight_decay", 0.0)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------------

    def sampling_spec(self) -> dict:
        """What a sampler needs besides the weights (stored in every checkpoint: `vsa.checkpoint`)."""
        return sampling_spec(self.model, self.latent_shape, self.codec_spec, self.timesteps, self.fps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite(saving=True)  # never write weights a NaN step has reached
        checkpoint[CHECKPOINT_KEY] = self.sampling_spec()
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
