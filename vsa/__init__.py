"""vsa: video Diffusion Transformers with trainable Video Sparse Attention."""

from vsa.layout import TileLayout
from vsa.ops import block_sparse_attention, video_sparse_attention

__all__ = ["TileLayout", "block_sparse_attention", "video_sparse_attention"]
__version__ = "0.1.0"
