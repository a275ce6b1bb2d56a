"""Pure-torch references of the VSA operations, written for clarity. Test oracles only.

They build dense masks and loop over tiles, so they cost O(S^2) memory: use them on small shapes,
in float64. Layouts are `vsa.layout.TileLayout`; tensors are `[B, S, H, D]` in tile-major order.
"""

from __future__ import annotations

import math

import torch

from vsa.layout import TileLayout


def tile_mean_reference(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Mean of x over the real tokens of each tile: [B, S, H, D] -> [B, n_tiles, H, D]."""
    offsets = layout.offsets.tolist()
    return torch.stack([x[:, offsets[t]:offsets[t + 1]].mean(dim=1) for t in range(layout.n_tiles)],
                       dim=1)


def selection_mask(q2k_idx: torch.Tensor, q2k_cnt: torch.Tensor, n_kv_tiles: int) -> torch.Tensor:
    """Dense tile-level mask [B, H, Nq, Nk]: True where query tile i keeps key tile j."""
    B, H, n_q, _ = q2k_idx.shape
    mask = torch.zeros(B, H, n_q, n_kv_tiles, dtype=torch.bool, device=q2k_idx.device)
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                for j in q2k_idx[b, h, i, : int(q2k_cnt[b, h, i])].tolist():
                    mask[b, h, i, j] = True
    return mask


def masked_attention_reference(q, k, v, token_mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention with a dense [B, H, Sq, Skv] boolean mask; rows with no key give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~token_mask, float("-inf"))
    has_key = token_mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(has_key, scores, 0.0), dim=-1) * has_key
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def block_sparse_attention_reference(q, k, v, layout: TileLayout, q2k_idx, q2k_cnt,
                                     kv_layout: TileLayout | None = None) -> torch.Tensor:
    """Each query tile attends (exact softmax) to the tokens of its listed key tiles."""
    kv_layout = kv_layout or layout
    tiles = selection_mask(q2k_idx, q2k_cnt, kv_layout.n_tiles)
    q_tile = layout.tile_ids.to(q.device)
    k_tile = kv_layout.tile_ids.to(q.device)
    token_mask = tiles[:, :, q_tile][:, :, :, k_tile]
    return masked_attention_reference(q, k, v, token_mask)


def num_selected_tiles(n_tiles: int, topk: int | None, sparsity: float | None) -> int:
    """K from an explicit top-k (capped at n_tiles) or from a sparsity in [0, 1)."""
    if topk is not None:
        return min(int(topk), n_tiles)
    return max(1, min(n_tiles, math.ceil((1.0 - sparsity) * n_tiles)))


def video_sparse_attention_reference(q, k, v, layout: TileLayout, topk=None, sparsity=None,
                                     gate_c=None, gate_f=None, return_selection: bool = False):
    """VSA: O = O_coarse * G_c + O_fine * G_f, written out step by step."""
    n = layout.n_tiles
    K = num_selected_tiles(n, topk, sparsity)
    # Coarse stage: attention among tile means; each token receives its tile's coarse output.
    qc, kc, vc = (tile_mean_reference(x, layout) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    coarse_scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    o_coarse_tiles = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(coarse_scores, dim=-1), vc)
    o_coarse = o_coarse_tiles[:, layout.tile_ids.to(q.device)]
    # Selection: top-K key tiles per query tile by coarse score (no gradient).
    q2k_idx = coarse_scores.detach().topk(K, dim=-1).indices
    q2k_cnt = torch.full(q2k_idx.shape[:-1], K, dtype=torch.int32, device=q.device)
    o_fine = block_sparse_attention_reference(q, k, v, layout, q2k_idx, q2k_cnt)
    g_c = 1.0 if gate_c is None else gate_c
    g_f = 1.0 if gate_f is None else gate_f
    out = o_coarse * g_c + o_fine * g_f
    return (out, q2k_idx) if return_selection else out


def block_sparse_attention_reference_grads(q, k, v, layout: TileLayout, q2k_idx, q2k_cnt, grad_out,
                                           kv_layout: TileLayout | None = None, chunk: int = 2048):
    """Forward and gradients of block-sparse attention with explicit formulas, chunked over queries.

    The same maths as `block_sparse_attention_reference` + autograd, but memory grows with
    chunk * S instead of S * S, so float64 checks fit on a GPU at 32K tokens. Returns (o, dq, dk, dv).
    """
    kv_layout = kv_layout or layout
    scale = 1.0 / math.sqrt(q.shape[-1])
    tiles = selection_mask(q2k_idx, q2k_cnt, kv_layout.n_tiles).to(q.device)
    q_tile = layout.tile_ids.to(q.device)
    k_tile = kv_layout.tile_ids.to(q.device)
    o, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo in range(0, q.shape[1], chunk):
        hi = min(lo + chunk, q.shape[1])
        mask = tiles[:, :, q_tile[lo:hi]][:, :, :, k_tile]  # [B, H, c, Skv]
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi], k) * scale
        s = s.masked_fill(~mask, float("-inf"))
        has_key = mask.any(-1, keepdim=True)
        p = torch.softmax(torch.where(has_key, s, 0.0), dim=-1) * has_key
        do = grad_out[:, lo:hi]
        o[:, lo:hi] = torch.einsum("bhqk,bkhd->bqhd", p, v)
        # dP = dO V^T; dS = P * (dP - rowsum(dO * O)); dQ = dS K * scale; dK = dS^T Q * scale.
        dp = torch.einsum("bqhd,bkhd->bhqk", do, v)
        delta = (do * o[:, lo:hi]).sum(-1).transpose(1, 2)[..., None]  # [B, H, c, 1]
        ds = p * (dp - delta)
        dq[:, lo:hi] = torch.einsum("bhqk,bkhd->bqhd", ds, k) * scale
        dk += torch.einsum("bhqk,bqhd->bkhd", ds, q[:, lo:hi]) * scale
        dv += torch.einsum("bhqk,bqhd->bkhd", p, do)
    return o, dq, dk, dv
