"""VSA kernels: the fine stage (block-sparse attention), the coarse stage and the whole op.

Kernel tuning knobs: `KernelOptions`, `kernel_options(...)` (a context manager),
`set_kernel_options`, `current_kernel_options` (vsa/ops/options.py).
"""

from vsa.ops.api import block_sparse_attention, resolve_topk, video_sparse_attention
from vsa.ops.block_sparse import SUPPORTED_HEAD_DIMS, transpose_block_lists
from vsa.ops.coarse import coarse_stage, tile_mean
from vsa.ops.options import KernelOptions, current_kernel_options, kernel_options, set_kernel_options

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "KernelOptions",
    "block_sparse_attention",
    "coarse_stage",
    "current_kernel_options",
    "kernel_options",
    "resolve_topk",
    "set_kernel_options",
    "tile_mean",
    "transpose_block_lists",
    "video_sparse_attention",
]
