"""Public VSA operations: `block_sparse_attention` (fine stage) and `video_sparse_attention`.

Both take `[B, S, H, D]` tensors with tokens in tile-major order (see `vsa.layout.TileLayout`).
On CUDA tensors they run the Triton kernels (registered as `torch.library` custom ops with fake
implementations, so `torch.compile(fullgraph=True)` traces through them); on CPU tensors a
vectorised pure-torch path. `impl="triton"` forces the kernels (on CPU only under
`TRITON_INTERPRET=1`, for tests), `impl="torch"` forces the torch path.

For callers that validate once and call every step (attention backends, the diffusers
integration): `check_impl` / `resolve_impl` (which path runs), `check_dtypes`, `fine_attention`
(the fine stage without the input checks) and `select_key_tiles` (VSA's top-K choice alone).
Kernel tuning knobs: `vsa.ops.options.KernelOptions`.
"""

from __future__ import annotations

import math

import torch

from vsa.layout import TileFill, TileLayout
from vsa.ops.block_sparse import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    bsa_backward,
    bsa_forward,
    interpreting,
)
from vsa.ops.coarse import coarse_stage, tile_broadcast
from vsa.ops.torch_impl import block_sparse_attention_torch
from vsa.ops.video_sparse import video_sparse_attention_triton

# --------------------------------------------------------------------------------------------------
# The fine stage as a custom op with autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("vsa::block_sparse_attention_fwd", mutates_args=())
def _bsa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
             kv_offsets: torch.Tensor, q2k_idx: torch.Tensor, q2k_cnt: torch.Tensor,
             max_q_tile: int, max_kv_tile: int, q_fill: int,
             kv_fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse, _ = bsa_forward(q, k, v, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile,
                            max_kv_tile, TileFill(q_fill), TileFill(kv_fill))
    return o, lse


@_bsa_fwd.register_fake
def _(q, k, v, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile, max_kv_tile, q_fill,
      kv_fill):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("vsa::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, q_offsets: torch.Tensor, kv_offsets: torch.Tensor,
             q2k_idx: torch.Tensor, q2k_cnt: torch.Tensor, max_q_tile: int, max_kv_tile: int,
             q_fill: int, kv_fill: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bsa_backward(do, q, k, v, o, lse, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile,
                        max_kv_tile, TileFill(q_fill), TileFill(kv_fill))


@_bsa_bwd.register_fake
def _(do, q, k, v, o, lse, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile, max_kv_tile,
      q_fill, kv_fill):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _bsa_setup(ctx, inputs, output):
    q, k, v, q_off, kv_off, idx, cnt, *ctx.static = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, q_off, kv_off, idx, cnt)


def _bsa_grad(ctx, do, dlse):
    q, k, v, o, lse, q_off, kv_off, idx, cnt = ctx.saved_tensors
    dq, dk, dv = _bsa_bwd(do, q, k, v, o, lse, q_off, kv_off, idx, cnt, *ctx.static)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_bsa_fwd.register_autograd(_bsa_grad, setup_context=_bsa_setup)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


IMPLS = (None, "triton", "torch")


def check_impl(impl: str | None) -> str | None:
    """`impl` if it names a path (None = auto, "triton", "torch"), else a ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be None (auto), 'triton' or 'torch', got {impl!r}")
    return impl


def resolve_impl(x: torch.Tensor, impl: str | None = None) -> str:
    """The path that runs for tensors like `x`: "triton" (the kernels) or "torch". `impl` None picks
    the kernels for CUDA tensors and torch for the rest; "triton" on CPU tensors needs the Triton
    interpreter (TRITON_INTERPRET=1 set before importing vsa, for tests)."""
    check_impl(impl)
    if impl == "torch":
        return "torch"
    if impl == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing vsa, for "
            "tests); use impl='torch' or impl=None for CPU tensors"
        )
    return "triton" if impl == "triton" or x.is_cuda else "torch"


def check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q, k, v share one of the kernels' dtypes (float16, bfloat16, float32)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of the dtypes {SUPPORTED_DTYPES}; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")


def _check_qkv(q, k, v, layout: TileLayout, kv_layout: TileLayout) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, S, H, D], got {got}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Sq, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head dim "
            "([B, S, H, D] layout; transpose [B, H, S, D] inputs with .transpose(1, 2))"
        )
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}")
    if not isinstance(layout, TileLayout) or not isinstance(kv_layout, TileLayout):
        raise TypeError("layout (and kv_layout) must be vsa.TileLayout objects")
    if Sq != layout.seq_len:
        raise ValueError(f"q has {Sq} tokens but the layout {layout.grid} has {layout.seq_len}")
    if k.shape[1] != kv_layout.seq_len:
        raise ValueError(
            f"k/v have {k.shape[1]} tokens but the kv layout {kv_layout.grid} has "
            f"{kv_layout.seq_len}; pass kv_layout= when q and k/v have different grids"
        )


def _check_lists(q2k_idx, q2k_cnt, B: int, H: int, n_q: int, n_kv: int) -> None:
    if q2k_idx.dim() != 4 or tuple(q2k_idx.shape[:3]) != (B, H, n_q):
        raise ValueError(f"q2k_idx must be [B, H, n_q_tiles, K] = [{B}, {H}, {n_q}, K], got "
                         f"{tuple(q2k_idx.shape)}")
    if tuple(q2k_cnt.shape) != (B, H, n_q):
        raise ValueError(f"q2k_cnt must be [B, H, n_q_tiles] = [{B}, {H}, {n_q}], got "
                         f"{tuple(q2k_cnt.shape)}")
    for name, x in (("q2k_idx", q2k_idx), ("q2k_cnt", q2k_cnt)):
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor (int32), got {x.dtype}")
    kmax = q2k_idx.shape[-1]
    if not q2k_cnt.numel():
        return
    # Both value checks reduce to one flag on the lists' device: one host sync per call (a masked
    # gather and min/max reads cost four; measured in docs/history/kernel_notes.md, v8 section 2).
    bad_cnt = ((q2k_cnt < 0) | (q2k_cnt > kmax)).any()
    listed = torch.arange(kmax, device=q2k_idx.device) < q2k_cnt[..., None]
    bad_idx = (listed & ((q2k_idx < 0) | (q2k_idx >= n_kv))).any()
    if not bool(bad_cnt | bad_idx):
        return
    if bool(bad_cnt):
        raise ValueError(f"q2k_cnt values must lie in [0, {kmax}] (the width of q2k_idx)")
    raise ValueError(f"q2k_idx entries must be key tile indices in [0, {n_kv})")


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _fine(q, k, v, layout, kv_layout, q2k_idx, q2k_cnt, use_triton: bool):
    args = (layout.offsets, kv_layout.offsets, q2k_idx, q2k_cnt, layout.max_tile_size,
            kv_layout.max_tile_size)
    if use_triton:
        return _bsa_fwd(q, k, v, *args, int(layout.fill), int(kv_layout.fill))[0]
    return block_sparse_attention_torch(q, k, v, *args)


def fine_attention(q, k, v, layout: TileLayout, q2k_idx, q2k_cnt, kv_layout=None,
                   impl: str | None = None):
    """`block_sparse_attention` without its input checks (no host sync): for callers that call
    every step with inputs they have validated once, such as the attention backends.

    Needs what `block_sparse_attention` checks: q/k/v of a supported dtype and head dim, `q2k_idx`
    / `q2k_cnt` int32 and contiguous on q's device with valid entries. A `TileLayout` on another
    device is moved to q's (once, `TileLayout.to` keeps the copy). `kv_layout` may also be any
    object with a layout's `offsets` (int32, on q's device), `max_tile_size` and `fill`, e.g. key
    segments that are not tiles of a grid. `impl`: None (Triton on CUDA, torch on CPU), "triton" or
    "torch"."""
    kv_layout = kv_layout or layout
    layout = layout.to(q.device)
    if isinstance(kv_layout, TileLayout):
        kv_layout = kv_layout.to(q.device)
    return _fine(q, k, v, layout, kv_layout, q2k_idx, q2k_cnt, resolve_impl(q, impl) == "triton")


def block_sparse_attention(q, k, v, layout: TileLayout, q2k_idx, q2k_cnt,
                           kv_layout: TileLayout | None = None, impl: str | None = None):
    """Block-sparse attention over ragged tiles (the fine stage of VSA).

    Args:
        q: [B, Sq, H, D]; k, v: [B, Skv, H, D]; tokens in tile-major order, D in {64, 128}.
        layout: TileLayout of the queries; kv_layout: of the keys (default: `layout`).
        q2k_idx: int [B, H, n_q_tiles, K]: key tiles listed for each query tile (distinct).
        q2k_cnt: int [B, H, n_q_tiles]: how many entries of each list are used.
        impl: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    Returns:
        O [B, Sq, H, D]: each query tile's exact softmax attention over its listed key tiles'
        tokens (rows whose list is empty are 0).
    """
    kv_layout = kv_layout or layout
    _check_qkv(q, k, v, layout, kv_layout)
    B, _, H, _ = q.shape
    _check_lists(q2k_idx, q2k_cnt, B, H, layout.n_tiles, kv_layout.n_tiles)
    q2k_idx = q2k_idx.to(device=q.device, dtype=torch.int32).contiguous()
    q2k_cnt = q2k_cnt.to(device=q.device, dtype=torch.int32).contiguous()
    return fine_attention(q, k, v, layout, q2k_idx, q2k_cnt, kv_layout, impl)


def resolve_topk(n_tiles: int, topk: int | None = None, sparsity: float | None = None) -> int:
    """K key tiles per query tile: `topk` (capped at n_tiles), or ceil((1 - sparsity) * n_tiles)."""
    if (topk is None) == (sparsity is None):
        raise ValueError("give exactly one of topk (key tiles per query tile) or sparsity in [0, 1)")
    if topk is not None:
        if int(topk) != topk or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        return min(int(topk), n_tiles)
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (0 = dense), got {sparsity!r}")
    return max(1, min(n_tiles, math.ceil((1.0 - float(sparsity)) * n_tiles)))


def select_key_tiles(q, k, v, layout: TileLayout, topk: int | None = None,
                     sparsity: float | None = None, impl: str | None = None):
    """VSA's selection alone: the K key tiles of largest coarse (tile-mean) score for each query
    tile, as `video_sparse_attention` chooses them (K from `topk` or `sparsity`, exactly one). No
    gradient. Returns (q2k_idx int32 [B, H, n_tiles, K] ascending, q2k_cnt int32 [B, H, n_tiles],
    all K), on q's device: the lists `fine_attention` / `block_sparse_attention` take. Inputs as
    for `video_sparse_attention`, checked only against the layout's length."""
    if not (q.shape[1] == k.shape[1] == v.shape[1] == layout.seq_len):
        raise ValueError(f"q, k, v have {q.shape[1]}, {k.shape[1]}, {v.shape[1]} tokens but the "
                         f"layout {layout.grid} has {layout.seq_len}")
    n_k = resolve_topk(layout.n_tiles, topk, sparsity)
    use_triton = resolve_impl(q, impl) == "triton"
    with torch.no_grad():
        _, q2k_idx = coarse_stage(q.detach(), k.detach(), v.detach(), layout.to(q.device), n_k,
                                  use_triton)
    q2k_cnt = torch.full(q2k_idx.shape[:3], n_k, dtype=torch.int32, device=q.device)
    return q2k_idx, q2k_cnt


def video_sparse_attention(q, k, v, layout: TileLayout, topk: int | None = None,
                           sparsity: float | None = None, gate_c=None, gate_f=None,
                           impl: str | None = None):
    """Video Sparse Attention: O = O_coarse * gate_c + O_fine * gate_f.

    Coarse stage: attention among the tile means of q, k, v (ragged tiles average their real
    tokens); each token receives its tile's coarse output. Selection: the top-K key tiles of each
    query tile by coarse score (no gradient). Fine stage: exact attention of each query tile over
    its K key tiles. A missing gate counts as 1.

    Args:
        q, k, v: [B, S, H, D] in tile-major order of `layout`, D in {64, 128}.
        topk / sparsity: exactly one. K = min(topk, n_tiles), or ceil((1 - sparsity) * n_tiles)
            clamped to [1, n_tiles].
        gate_c, gate_f: None or tensors broadcastable to [B, S, H, D].
        impl: None (Triton on CUDA, torch on CPU), "triton" or "torch".
    """
    _check_qkv(q, k, v, layout, layout)
    n_k = resolve_topk(layout.n_tiles, topk, sparsity)
    for name, g in (("gate_c", gate_c), ("gate_f", gate_f)):
        # Compared by hand, not by catching broadcast_shapes' RuntimeError: that handler would also
        # catch an unrelated RuntimeError raised asynchronously here (a data-loader worker's death,
        # which torch signals in the main process) and report it as a bad gate shape.
        if g is not None:
            ok = g.dim() <= q.dim() and all(a in (1, b) for a, b in zip(reversed(g.shape), reversed(q.shape)))
            if not ok:
                raise ValueError(f"{name} of shape {tuple(g.shape)} does not broadcast to q's shape "
                                 f"{tuple(q.shape)} ([B, S, H, D])")
    use_triton = resolve_impl(q, impl) == "triton"
    layout = layout.to(q.device)
    if use_triton:
        return video_sparse_attention_triton(q, k, v, layout, n_k, gate_c, gate_f)
    # Pure-torch path (CPU): the same maths composed from differentiable pieces.
    o_c_tiles, q2k_idx = coarse_stage(q, k, v, layout, n_k, use_triton)
    q2k_cnt = torch.full(q2k_idx.shape[:3], n_k, dtype=torch.int32, device=q.device)
    o_f = _fine(q, k, v, layout, layout, q2k_idx, q2k_cnt, use_triton)
    # The coarse output is per tile: cast it before broadcasting so the combine runs in q's dtype.
    o_c = tile_broadcast(o_c_tiles.to(q.dtype), layout.offsets, layout.tile_ids,
                         layout.max_tile_size, use_triton)
    out = o_f if gate_f is None else o_f * gate_f
    out = out + (o_c if gate_c is None else o_c * gate_c)
    return out.to(q.dtype)
