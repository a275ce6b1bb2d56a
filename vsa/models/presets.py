"""Model presets, named by their real parameter count, and the builders that use them.

A preset fixes depth, width and head dim; everything else (channels, patch, conditioning,
attention backend) is an override. Names are checked against the real count (within 10%) for the
defaults `in_channels=16, patch=(1, 2, 2)`, no class / text conditioning, with every attention
backend: `full`, `vsa` with "adapt" gates (+width^2 per block) and `vsa` with "pretrain" gates
(+2 width^2 per block). Dense models sit ~7% under their name, VSA-pretrain ones ~7% over.

    model = build_model("150M", attention="vsa", num_classes=10)
    print(preset_table())        # the markdown table in docs/models.md
"""

from __future__ import annotations

import torch

from vsa.attention import BACKENDS
from vsa.models.config import DiTConfig
from vsa.models.dit import VideoDiT, count_params

PRESETS: dict[str, dict[str, int]] = {
    # tiny, for CPU tests
    "0.6M": dict(depth=2, width=128, head_dim=64),
    "1M": dict(depth=4, width=128, head_dim=64),  # the default `python train.py` model
    "2.3M": dict(depth=2, width=256, head_dim=128),
    # small, for the one-GPU scaling sweep (configs/sweep/scaling_micro.yaml)
    "5M": dict(depth=5, width=256, head_dim=64),
    "10M": dict(depth=7, width=320, head_dim=64),
    "20M": dict(depth=10, width=384, head_dim=64),
    # the scaling ladder
    "60M": dict(depth=17, width=512, head_dim=64),
    "150M": dict(depth=19, width=768, head_dim=64),
    "300M": dict(depth=28, width=896, head_dim=64),
    "600M": dict(depth=34, width=1152, head_dim=64),
    "1.4B": dict(depth=33, width=1792, head_dim=128),
}

# Attention set-ups whose parameter counts the preset names must match: full attention (as every
# backend without parameters of its own), and each variant of the backends with learned gates.
BACKEND_VARIANTS: dict[str, dict] = {"full": dict(attention="full")} | {
    f"{name} {label}".strip(): dict(attention=name, attention_options=dict(options))
    for name, backend in BACKENDS.items() if backend.needs_gates
    for label, options in backend.param_variants.items()
}


def nominal_params(name: str) -> float:
    """The parameter count a preset's name states ("60M" -> 6e7, "1.4B" -> 1.4e9)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}
    return float(name[:-1]) * scale[name[-1]]


def preset_config(name: str, **overrides) -> DiTConfig:
    """The DiTConfig of preset `name`, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {list(PRESETS)}")
    return DiTConfig(**{**PRESETS[name], **overrides})


def build_model(name: str, **overrides) -> VideoDiT:
    """A VideoDiT from preset `name` plus overrides (any DiTConfig field)."""
    return VideoDiT(preset_config(name, **overrides))


def preset_params(name: str, **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return count_params(build_model(name, **overrides))


def _format_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def preset_table() -> str:
    """Markdown table of the presets and their parameter counts under each attention backend."""
    lines = [
        "| preset | depth | width | heads | head dim | "
        + " | ".join(f"params ({label})" for label in BACKEND_VARIANTS) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(BACKEND_VARIANTS),
    ]
    for name, arch in PRESETS.items():
        counts = [preset_params(name, **variant) for variant in BACKEND_VARIANTS.values()]
        cells = [name, arch["depth"], arch["width"], arch["width"] // arch["head_dim"],
                 arch["head_dim"], *(_format_count(n) for n in counts)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
