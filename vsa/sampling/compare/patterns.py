"""Applying pattern specs (`vsa.attention.spec`) to a loaded model, checking them before anything
runs, and what each pattern keeps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vsa.attention import StaticPatternAttention
from vsa.attention.spec import PatternSpec
from vsa.models import DiTConfig, VideoDiT
from vsa.sampling.run import needs_sparsity, swap_attention


def configure(model: VideoDiT, spec: PatternSpec) -> VideoDiT:
    """Give a freshly loaded model the attention and tile of `spec` (as sample.py would; options
    on the checkpoint's own backend rebuild it, unless it has trained parameters)."""
    if spec.name == model.cfg.attention and spec.options:
        if any(True for _ in model.blocks[0].attn.backend.parameters()):
            raise ValueError(f"pattern {spec.label!r}: the checkpoint's {spec.name} backend has "
                             "trained parameters and runs as trained; drop the options")
        model.set_attention(spec.name, **spec.options)
    swap_attention(model, spec.name, spec.options, spec.sparsity, spec.topk)
    if spec.sparsity is not None or spec.topk is not None:
        model.sparsity, model.topk = spec.sparsity, spec.topk
    if needs_sparsity(model) and model.sparsity is None and model.topk is None:
        name = model.cfg.attention
        raise ValueError(f"pattern {spec.label!r}: {name} needs a sparsity, e.g. {name}@0.875 or "
                         f"{name}:topk=8")
    if spec.tile is not None:
        model.set_tile(spec.tile)
    return model


def check_patterns(dit_config: dict, specs: Sequence[PatternSpec]) -> None:
    """Apply every spec to a weightless (meta-device) copy of the model: bad options, tiles or
    sparsities fail here, before anything runs."""
    for spec in specs:
        with torch.device("meta"):
            model = VideoDiT(DiTConfig(**dit_config))
        try:
            configure(model, spec)
        except (TypeError, ValueError) as err:
            message = str(err)
            if spec.label not in message:
                message = f"pattern {spec.label!r}: {message}"
            raise ValueError(message) from None


def backend_options(model: VideoDiT) -> dict:
    """The backend's options as it runs (static patterns: normalised, defaults filled in)."""
    backend = model.blocks[0].attn.backend
    options = dict(backend.options) if isinstance(backend, StaticPatternAttention) else dict(
        model.cfg.attention_options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def kept_fraction(model: VideoDiT, layout) -> float:
    """Fraction of (query, key) token pairs the model's attention computes on `layout` (VSA: the
    fine stage's K / n_tiles, its coarse stage not counted): `AttentionBackend.kept_fraction`."""
    backend = model.blocks[0].attn.backend
    options = dict(backend.options) if isinstance(backend, StaticPatternAttention) else dict(
        model.cfg.attention_options)
    return type(backend).kept_fraction(layout, options, model.sparsity, model.topk)
