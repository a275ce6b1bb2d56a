"""Generating latents with a VideoDiT: seeded noise -> Euler/Heun ODE with classifier-free guidance."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from vsa.diffusion.samplers import METHODS, guided_velocity, sample_ode

if TYPE_CHECKING:  # (a model is used through its interface: cfg, null_condition, calls)
    from vsa.models import VideoDiT


def default_labels(model: VideoDiT, num_videos: int, labels: Sequence[int] | None = None) -> list[int] | None:
    """Class labels of the videos: `labels` (checked), or classes 0, 1, 2, ... cycling."""
    num_classes = model.cfg.num_classes
    if not num_classes:
        if labels:
            raise ValueError("labels were given but the model is not class-conditional (num_classes=0)")
        return None
    if labels is None or len(labels) == 0:
        return [i % num_classes for i in range(num_videos)]
    labels = [int(x) for x in labels]
    if len(labels) != num_videos or min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"labels must be {num_videos} class ids in [0, {num_classes}), got {labels}")
    return labels


def check_sampling(num_videos: int, steps: int, method: str, cfg_scale: float, seed: int) -> None:
    """Raise ValueError (one line, with the fix) for sampling arguments out of range."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(num_videos) or num_videos < 1:
        raise ValueError(f"num_videos must be an integer >= 1, got {num_videos!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be a number >= 0 (1 = no guidance, 4 = the default "
                         f"guidance, 0 = unconditional), got {cfg_scale!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def check_guide(model: VideoDiT, guide: VideoDiT) -> None:
    """Raise ValueError (one line, with the fix) when `guide` cannot guide `model`: it must take
    the same input and the same condition (channels, patch, classes, text width, prediction)."""
    fields = ("in_channels", "out_channels", "patch", "num_classes", "text_dim", "prediction")
    differ = [f for f in fields if getattr(model.cfg, f, None) != getattr(guide.cfg, f, None)]
    if differ:
        raise ValueError(f"the guide model differs from the model in {', '.join(differ)}; autoguidance needs "
                         "a weaker model of the same kind: an earlier checkpoint of the same run, say")


@torch.no_grad()
def generate(model: VideoDiT, latent_shape: Sequence[int], num_videos: int, *,
             labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
             text_encoder: Callable | None = None, steps: int = 32, method: str = "euler",
             cfg_scale: float = 4.0, cfg_interval: Sequence[float] | None = None,
             shift: float | Callable[[int], float] = 1.0, seed: int = 0,
             device: torch.device | str | None = None, progress: bool = False,
             guide: VideoDiT | None = None) -> torch.Tensor:
    """Sample `num_videos` model-space tensors [N, C, T, H, W] (fp32) from a VideoDiT.

    Noise comes from a CPU generator seeded with `seed`, so a seed gives the same videos on every
    device. `shift` is the timestep shift, or a function of the token count that returns it.
    Class-conditional models get `labels` (default: classes 0, 1, 2, ...), guided with weight
    `cfg_scale` against the null class, at every step or only at times t_lo <= t <= t_hi of
    `cfg_interval` (t = 1 is noise; the conditional velocity elsewhere). Models with a caption
    vocabulary (`caption_words`) get `prompts`, one per video, guided against the null (all-zero)
    text; models trained on text embeddings (`text_dim` without `caption_words`) get them from
    `text_encoder` (captions -> (emb [N, L, text_dim], mask [N, L]), e.g.
    `vsa.data.text.TextEncoder`: the one the training shards were encoded with; an empty prompt is
    the null text). `guide`: a weaker model of the same kind (e.g. an early checkpoint of the same
    run) that replaces the null condition as guidance's reference (autoguidance; `cfg_scale` is
    its weight). `progress` shows a bar over model evaluations.
    """
    text_conditional = bool(model.cfg.text_dim)
    if text_conditional and (prompts is None or isinstance(prompts, str) or len(prompts) != num_videos):
        raise ValueError(f"this model is text-conditional: give prompts, one per video ({num_videos}), "
                         f"got {prompts!r}")
    if prompts is not None and not text_conditional:
        raise ValueError("prompts given, but this model is not text-conditional")
    if text_conditional and not model.cfg.caption_words and text_encoder is None:
        raise ValueError("this model was trained on text embeddings: give the text encoder its shards were "
                         "encoded with (sample.py text_encoder=PATH)")
    check_sampling(num_videos, steps, method, cfg_scale, int(seed))
    if latent_shape is None or len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (C, T, H, W), got {latent_shape}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((num_videos, *(int(s) for s in latent_shape)), generator=generator).to(device)
    if callable(shift):
        shift = shift(math.prod(model.cfg.token_grid(latent_shape[1:])))

    cond: dict = {}
    ids = default_labels(model, num_videos, labels)
    if ids is not None:
        cond["labels"] = torch.tensor(ids, dtype=torch.long, device=device)
    if prompts is not None and model.cfg.caption_words:
        cond["text"], cond["text_mask"] = model.embed_captions(list(prompts))
    elif prompts is not None:
        emb, mask = text_encoder(list(prompts))
        if emb.dim() != 3 or emb.shape[-1] != model.cfg.text_dim:
            raise ValueError(f"the text encoder gives embeddings {tuple(emb.shape)} but the model expects "
                             f"width text_dim={model.cfg.text_dim}; use the encoder its shards were encoded with")
        emb, mask = emb.to(device, torch.float32), mask.to(device, torch.bool)
        # An empty prompt is the model's null text (what CFG dropout trains).
        null = model.null_condition({"text": emb, "text_mask": mask})
        empty = torch.tensor([not p.strip() for p in prompts], device=device)
        cond["text"] = torch.where(empty[:, None, None], null["text"], emb)
        cond["text_mask"] = torch.where(empty[:, None], null["text_mask"], mask)
    if guide is not None:
        check_guide(model, guide)
        uncond = None
    else:
        uncond = model.null_condition(cond) if cond and cfg_scale != 1.0 else None
    velocity = guided_velocity(model, cond, uncond, cfg_scale, cfg_interval, guide=guide)

    evaluations = steps * (2 if method == "heun" else 1)
    bar = tqdm(total=evaluations, desc=f"{method} x{steps}", unit="eval", disable=not progress)

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x, t)
        bar.update(1)
        return v

    modules = [model] if guide is None else [model, guide]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        return sample_ode(counted, noise, steps=steps, method=method, shift=float(shift))
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)
        bar.close()
