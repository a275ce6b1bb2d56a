"""VSA kernels: the fine stage (block-sparse attention), the coarse stage and the whole op.

Public names, for every layer above (attention backends, integrations, scripts):
- the ops: `video_sparse_attention`, `block_sparse_attention`, and for callers that validate once
  and call every step `fine_attention` (no input checks) and `select_key_tiles` (VSA's top-K
  choice alone);
- helpers: `resolve_topk`, `check_impl` / `resolve_impl` (which path runs), `check_dtypes`,
  `coarse_stage`, `tile_mean`, `transpose_block_lists`, `SUPPORTED_HEAD_DIMS`, `SUPPORTED_DTYPES`;
- tuning: `KernelOptions`, `kernel_options(...)` (a context manager), `set_kernel_options`,
  `current_kernel_options` (vsa/ops/options.py).
"""

from vsa.ops.api import (
    IMPLS,
    block_sparse_attention,
    check_dtypes,
    check_impl,
    fine_attention,
    resolve_impl,
    resolve_topk,
    select_key_tiles,
    video_sparse_attention,
)
from vsa.ops.block_sparse import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, transpose_block_lists
from vsa.ops.coarse import coarse_stage, tile_mean
from vsa.ops.options import KernelOptions, current_kernel_options, kernel_options, set_kernel_options

__all__ = [
    "IMPLS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "KernelOptions",
    "block_sparse_attention",
    "check_dtypes",
    "check_impl",
    "coarse_stage",
    "current_kernel_options",
    "fine_attention",
    "kernel_options",
    "resolve_impl",
    "resolve_topk",
    "select_key_tiles",
    "set_kernel_options",
    "tile_mean",
    "transpose_block_lists",
    "video_sparse_attention",
]
