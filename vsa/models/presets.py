"""Model presets, named by their real parameter count, and the builders that use them.

A preset fixes depth, width and head dim, read from its YAML file in configs/model/; everything
else (channels, patch, conditioning, attention backend) is an override. Names are checked against
the real count (within 10%) for the defaults `in_channels=16, patch=(1, 2, 2)`, no class / text
conditioning, with every attention backend: `full`, `vsa` with "adapt" gates (+width^2 per block)
and `vsa` with "pretrain" gates (+2 width^2 per block). Dense models sit ~7% under their name,
VSA-pretrain ones ~7% over.

    model = build_model("150M", attention="vsa", num_classes=10)
    print(preset_table())        # the markdown table in docs/models.md
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from vsa.attention import BACKENDS
from vsa.models.config import DiTConfig
from vsa.models.dit import VideoDiT, count_params

# The presets live in the Hydra config group, one YAML file each (configs/model/60m.yaml:
# name, depth, width, head_dim), the lightning-hydra-template convention: the numbers are read
# where a user changes them. Python validates them and counts the parameters.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
ARCH_KEYS = ("depth", "width", "head_dim")


def nominal_params(name: str) -> float:
    """The parameter count a preset's name states ("60M" -> 6e7, "1.4B" -> 1.4e9)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}
    return float(name[:-1]) * scale[name[-1]]


def preset_files(folder: Path = CONFIG_DIR) -> list[Path]:
    """The VideoDiT presets among the model config group's YAML files: not those that build
    another model, i.e. name their own `_target_` or inherit one through `defaults` (e.g.
    configs/model/wan*.yaml, a pretrained diffusers Wan transformer)."""
    files = []
    for path in sorted(Path(folder).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        if not (isinstance(node, dict) and ("_target_" in node or "defaults" in node)):
            files.append(path)
    return files


def load_presets(folder: Path = CONFIG_DIR) -> dict[str, dict[str, int]]:
    """{name: {depth, width, head_dim}} from the model config group's YAML files (`preset_files`),
    smallest first. Other keys of a file (e.g. mlp_conv) are overrides of the runs that use it,
    not part of the preset."""
    folder = Path(folder)
    files = preset_files(folder)
    if not files:
        raise FileNotFoundError(f"no model presets in {folder}: they are the YAML files of the repository's "
                                "configs/model/; install vsa from a checkout (pip install -e .)")
    presets: dict[str, dict[str, int]] = {}
    for path in files:
        node = OmegaConf.to_container(OmegaConf.load(path))
        name = node.get("name") if isinstance(node, dict) else None
        if not isinstance(name, str) or name[-1:] not in ("K", "M", "B"):
            raise ValueError(f"{path}: `name` must be a parameter count such as 60M or 1.4B, got {name!r}")
        arch = {}
        for key in ARCH_KEYS:
            value = node.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{path}: `{key}` must be a positive int, got {value!r}")
            arch[key] = value
        if arch["width"] % arch["head_dim"]:
            raise ValueError(f"{path}: width {arch['width']} is not a multiple of head_dim {arch['head_dim']}")
        if name in presets:
            raise ValueError(f"{path}: preset {name!r} is defined twice in {folder}")
        presets[name] = arch
    return dict(sorted(presets.items(), key=lambda item: nominal_params(item[0])))


PRESETS: dict[str, dict[str, int]] = load_presets()

# Attention set-ups whose parameter counts the preset names must match: full attention (as every
# backend without parameters of its own), and each variant of the backends with learned gates.
BACKEND_VARIANTS: dict[str, dict] = {"full": dict(attention="full")} | {
    f"{name} {label}".strip(): dict(attention=name, attention_options=dict(options))
    for name, backend in BACKENDS.items() if backend.needs_gates
    for label, options in backend.param_variants.items()
}


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
