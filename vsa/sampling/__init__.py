"""Sampling from trained checkpoints: `sample(cfg)` (sample.py), attention swaps, and the pattern
comparison (`vsa.sampling.compare`). Re-exported here from the layers below: generation
(`vsa.diffusion.generate`), the checkpoint schema (`vsa.checkpoint`) and the media writers
(`vsa.data.media`)."""

from vsa.checkpoint import load_model, model_from_checkpoint, model_state, read_checkpoint
from vsa.data.media import save_grid, to_uint8_frames, write_mp4
from vsa.diffusion.generate import default_labels, generate
from vsa.sampling.run import sample, swap_attention

__all__ = ["default_labels", "generate", "load_model", "model_from_checkpoint", "model_state",
           "read_checkpoint", "sample", "save_grid", "swap_attention", "to_uint8_frames", "write_mp4"]
