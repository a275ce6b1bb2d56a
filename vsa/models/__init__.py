"""Video Diffusion Transformers: the model, its config and its presets."""

from vsa.models.config import DiTConfig
from vsa.models.dit import DiTBlock, VideoDiT, count_params
from vsa.models.presets import PRESETS, build_model, preset_config, preset_params, preset_table
from vsa.models.rope import apply_rope, rope_angles, rope_axis_dims

__all__ = [
    "PRESETS",
    "DiTBlock",
    "DiTConfig",
    "VideoDiT",
    "apply_rope",
    "build_model",
    "count_params",
    "preset_config",
    "preset_params",
    "preset_table",
    "rope_angles",
    "rope_axis_dims",
]
