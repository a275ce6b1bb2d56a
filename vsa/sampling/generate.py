"""The old import path of generation: it lives in `vsa.diffusion.generate` (below training, whose
callbacks sample during training); scripts that import `vsa.sampling.generate` keep working."""

from vsa.diffusion.generate import check_sampling, default_labels, generate

__all__ = ["check_sampling", "default_labels", "generate"]
