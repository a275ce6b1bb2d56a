"""The coarse stage of VSA: tile mean-pooling, coarse attention among tile means, top-K selection.

Pooling and its adjoint (broadcasting a per-tile value back to the tile's tokens) are a pair of
custom ops, each the other's backward. Both are deterministic: the tile sum is one Triton program
per (tile, b*h) that adds the tile's rows in a fixed order (torch's CUDA index_add uses atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vsa.ops.torch_impl import tile_sum_torch


@triton.jit
def _tile_sum_kernel(
    X, OUT, OFF,
    sx_b, sx_s, sx_h, so_b, so_t, so_h, H,
    HEAD_D: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """OUT[b, t, h] = sum of X[b, s, h] over the tokens s of tile t (fp32)."""
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    lo = tl.load(OFF + t)
    hi = tl.load(OFF + t + 1)
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BLOCK, HEAD_D], tl.float32)
    for c in range(N_CHUNKS):
        offs = lo + c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + b * sx_b + h * sx_h + offs[:, None] * sx_s + offs_d[None, :],
                    mask=(offs < hi)[:, None], other=0.0)
        acc += x.to(tl.float32)
    tl.store(OUT + b * so_b + t * so_t + h * so_h + offs_d, tl.sum(acc, 0))


def _tile_sum_triton(x: torch.Tensor, offsets: torch.Tensor, max_tile: int) -> torch.Tensor:
    B, _, H, D = x.shape
    n_tiles = offsets.numel() - 1
    out = torch.empty((B, n_tiles, H, D), device=x.device, dtype=torch.float32)
    block = min(64, triton.next_power_of_2(max_tile))
    _tile_sum_kernel[(n_tiles, B * H)](
        x, out, offsets, x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H,
        HEAD_D=D, BLOCK=block, N_CHUNKS=math.ceil(max_tile / block),
    )
    return out


@torch.library.custom_op("vsa::tile_sum", mutates_args=())
def tile_sum(x: torch.Tensor, offsets: torch.Tensor, tile_ids: torch.Tensor, max_tile: int,
             use_triton: bool) -> torch.Tensor:
    """Sum of x over each tile's tokens in fp32: [B, S, H, D] -> [B, n_tiles, H, D]."""
    if use_triton:
        return _tile_sum_triton(x, offsets, max_tile)
    return tile_sum_torch(x, tile_ids, offsets.numel() - 1)


@tile_sum.register_fake
def _(x, offsets, tile_ids, max_tile, use_triton):
    return x.new_empty((x.shape[0], offsets.numel() - 1, x.shape[2], x.shape[3]), dtype=torch.float32)


@torch.library.custom_op("vsa::tile_broadcast", mutates_args=())
def tile_broadcast(xc: torch.Tensor, offsets: torch.Tensor, tile_ids: torch.Tensor, max_tile: int,
                   use_triton: bool) -> torch.Tensor:
    """Each token receives its tile's value: [B, n_tiles, H, D] -> [B, S, H, D]."""
    return xc.index_select(1, tile_ids)


@tile_broadcast.register_fake
def _(xc, offsets, tile_ids, max_tile, use_triton):
    return xc.new_empty((xc.shape[0], tile_ids.numel(), xc.shape[2], xc.shape[3]))


def _save_index_args(ctx, inputs, output):
    _, ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton = inputs
    ctx.in_dtype = inputs[0].dtype


def _tile_sum_backward(ctx, grad):
    gx = tile_broadcast(grad.float(), ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton)
    return gx.to(ctx.in_dtype), None, None, None, None


def _tile_broadcast_backward(ctx, grad):
    gc = tile_sum(grad.contiguous(), ctx.offsets, ctx.tile_ids, ctx.max_tile, ctx.use_triton)
    return gc.to(ctx.in_dtype), None, None, None, None


tile_sum.register_autograd(_tile_sum_backward, setup_context=_save_index_args)
tile_broadcast.register_autograd(_tile_broadcast_backward, setup_context=_save_index_args)


def tile_mean(x: torch.Tensor, layout, use_triton: bool) -> torch.Tensor:
    """Mean over the real tokens of each tile (ragged tiles divide by their own size), fp32."""
    total = tile_sum(x, layout.offsets, layout.tile_ids, layout.max_tile_size, use_triton)
    return total / layout.sizes.to(torch.float32)[None, :, None, None]


def coarse_stage(q, k, v, layout, topk: int, use_triton: bool):
    """Coarse attention among tile means and the top-K key tiles of each query tile.

    Returns O_c per tile (fp32 [B, n_tiles, H, D]) and q2k_idx (int32 [B, H, n_tiles, topk]).
    """
    qc, kc, vc = [tile_mean(x, layout, use_triton) for x in (q, k, v)]
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * (1.0 / math.sqrt(q.shape[-1]))
    o_c = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vc)
    # Ascending tile order: a fixed accumulation order for the fine stage and forward memory walks.
    q2k_idx = scores.detach().topk(topk, dim=-1, sorted=False).indices.sort(dim=-1).values
    return o_c, q2k_idx.to(torch.int32).contiguous()
