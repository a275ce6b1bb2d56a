"""VSA kernels: the fine stage (block-sparse attention), the coarse stage and the whole op."""

from vsa.ops.api import block_sparse_attention, resolve_topk, video_sparse_attention
from vsa.ops.block_sparse import SUPPORTED_HEAD_DIMS, transpose_block_lists
from vsa.ops.coarse import coarse_stage, tile_mean

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "block_sparse_attention",
    "coarse_stage",
    "resolve_topk",
    "tile_mean",
    "transpose_block_lists",
    "video_sparse_attention",
]
