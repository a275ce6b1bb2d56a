"""Sampling from trained checkpoints: generation, media writers and the `sample(cfg)` entry."""

from vsa.sampling.checkpoint import load_model, model_from_checkpoint, model_state, read_checkpoint
from vsa.sampling.generate import default_labels, generate
from vsa.sampling.media import save_grid, to_uint8_frames, write_mp4
from vsa.sampling.run import sample, swap_attention

__all__ = ["default_labels", "generate", "load_model", "model_from_checkpoint", "model_state",
           "read_checkpoint", "sample", "save_grid", "swap_attention", "to_uint8_frames", "write_mp4"]
