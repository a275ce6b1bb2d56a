"""Pure-torch paths of the VSA ops for CPU tensors (training without a GPU).

Vectorised and memory-bounded: tiles are gathered into a padded [B, H, n_tiles, tile, D] view and
query tiles are processed in chunks, so memory grows with S * K * tile, never with S * S. Gradients
come from torch autograd (index ops on the CPU accumulate deterministically).
"""

from __future__ import annotations

import math

import torch

# Elements of the largest score tensor of one chunk ([B, H, chunk, tile, K * tile]).
CHUNK_ELEMENTS = 1 << 24


def _pad_index(offsets: torch.Tensor, max_tile: int):
    """Token index of every (tile, slot) and whether the slot is a real token."""
    starts, sizes = offsets[:-1].long(), (offsets[1:] - offsets[:-1]).long()
    slot = torch.arange(max_tile, device=offsets.device)
    valid = slot[None, :] < sizes[:, None]
    index = starts[:, None] + torch.minimum(slot[None, :], (sizes - 1).clamp(min=0)[:, None])
    return index, valid


def _to_padded_tiles(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B, H, n_tiles, max_tile, D] (slots past a tile's end repeat its last token)."""
    B, _, H, D = x.shape
    n_tiles, max_tile = index.shape
    return x.index_select(1, index.reshape(-1)).view(B, n_tiles, max_tile, H, D).permute(0, 3, 1, 2, 4)


def block_sparse_attention_torch(q, k, v, q_offsets, kv_offsets, q2k_idx, q2k_cnt, max_q_tile: int,
                                 max_kv_tile: int) -> torch.Tensor:
    B, Sq, H, D = q.shape
    n_q, kmax = q2k_idx.shape[2], q2k_idx.shape[3]
    scale = 1.0 / math.sqrt(D)
    q_index, q_valid = _pad_index(q_offsets, max_q_tile)
    kv_index, kv_valid = _pad_index(kv_offsets, max_kv_tile)
    qt, kt, vt = _to_padded_tiles(q, q_index), _to_padded_tiles(k, kv_index), _to_padded_tiles(v, kv_index)
    b_idx = torch.arange(B, device=q.device)[:, None, None, None]
    h_idx = torch.arange(H, device=q.device)[None, :, None, None]
    per_q_tile = B * H * max_q_tile * kmax * max_kv_tile
    chunk = max(1, CHUNK_ELEMENTS // max(per_q_tile, 1))
    outs = []
    for c0 in range(0, n_q, chunk):
        c1 = min(n_q, c0 + chunk)
        listed = torch.arange(kmax, device=q.device) < q2k_cnt[:, :, c0:c1, None]  # [B,H,c,K]
        sel = torch.where(listed, q2k_idx[:, :, c0:c1].long(), 0)
        keys = kt[b_idx, h_idx, sel].flatten(3, 4)  # [B, H, c, K * tile, D]
        vals = vt[b_idx, h_idx, sel].flatten(3, 4)
        key_ok = (listed[..., None] & kv_valid[sel]).flatten(3, 4)  # [B, H, c, K * tile]
        scores = torch.einsum("bhcmd,bhcnd->bhcmn", qt[:, :, c0:c1], keys).float() * scale
        scores = scores.masked_fill(~key_ok[:, :, :, None, :], float("-inf"))
        any_key = key_ok.any(-1)[:, :, :, None, None]
        probs = torch.softmax(torch.where(any_key, scores, 0.0), dim=-1) * any_key
        outs.append(torch.einsum("bhcmn,bhcnd->bhcmd", probs.to(vals.dtype), vals))
    o_tiles = torch.cat(outs, dim=2)  # [B, H, Nq, max_q_tile, D]
    # Back to tokens: token s sits in slot (tile(s), s - offsets[tile(s)]).
    flat_slot = torch.nonzero(q_valid.reshape(-1)).squeeze(1)
    o = o_tiles.reshape(B, H, n_q * max_q_tile, D).index_select(2, flat_slot)
    return o.permute(0, 2, 1, 3)


def tile_sum_torch(x: torch.Tensor, tile_ids: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Sum over the tokens of each tile in fp32: [B, S, H, D] -> [B, n_tiles, H, D]."""
    B, _, H, D = x.shape
    out = torch.zeros((B, n_tiles, H, D), device=x.device, dtype=torch.float32)
    return out.index_add_(1, tile_ids, x.float())
