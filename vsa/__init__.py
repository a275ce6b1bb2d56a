"""vsa: video Diffusion Transformers with trainable Video Sparse Attention."""

from vsa.layout import TileLayout
from vsa.ops import block_sparse_attention, video_sparse_attention
from vsa.run_name import register_resolver

register_resolver()  # configs/train.yaml's run_name: ${run_name:${experiment_name}}

__all__ = ["TileLayout", "block_sparse_attention", "video_sparse_attention"]
__version__ = "0.1.0"
