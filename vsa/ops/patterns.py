"""Static block maps from tile geometry: GRAT-B, GRAT-X and sliding tile attention (STA).

A map says which key tiles each query tile attends to, as the int32 lists the block-sparse kernel
takes: `q2k_idx [n_tiles, K_max]` (key tiles of each query tile, ascending) and `q2k_cnt [n_tiles]`
(how many entries of each row are used; entries past the count are 0). Tiles are those of a
`TileLayout` (raster order over its tile grid); a "group" of the GRAT paper is one tile, so the
group size is the layout's tile size. Every pattern keeps the query tile itself.

    layout = TileLayout((32, 48, 80), tile=(4, 8, 8), device="cuda")   # 8 x 6 x 10 tiles
    idx, cnt = grat_b(layout)                   # 3x3x3 neighbourhood: 27 tiles inside, fewer at borders
    o = block_sparse_attention(q, k, v, layout, idx.expand(B, H, -1, -1), cnt.expand(B, H, -1))

- `grat_b(layout, radius)`: key tiles within `radius` tiles of the query tile on every axis
  (|dt| <= rt, |dh| <= rh, |dw| <= rw), clipped at the borders (border tiles keep fewer).
- `grat_x(layout, lines)`: criss-cross. Planes (default, as GRAT's released video code): key tiles
  that share the query tile's time index, tile-row or tile-column. Lines: only the three axis-aligned
  lines of tiles through the query tile. Axes with a single tile are left out, since every tile
  "shares" that index: on an image tile grid (1, nh, nw) both variants are the 2D criss-cross
  (same tile-row or same tile-column), not the whole grid.
- `sta(layout, window)`: a window of `window` tiles per axis centred on the query tile and shifted
  inward at the borders, so every query tile keeps the full window (a window larger than the grid
  is cut to the grid). An even window extends one tile further forward than backward.

Maps are built once per (tile grid, pattern, parameters, device), vectorised over all tiles (no
Python loop over tiles), and cached: the returned tensors are shared, do not modify them in place.
They depend on the layout only through its tile grid, so layouts with the same tile grid (ragged or
not) share one map.
"""

from __future__ import annotations

import functools

import torch

from vsa.layout import TileLayout, int_triple

Triple = tuple[int, int, int]

# Elements of the boolean [chunk, n_tiles] mask GRAT-X builds per step (bounds its memory).
_MASK_CHUNK_ELEMENTS = 1 << 22


def check_layout(layout) -> None:
    """Raise unless `layout` is a TileLayout of box tiles (the grid the patterns are built on)."""
    if not isinstance(layout, TileLayout):
        raise TypeError(f"expected a vsa.TileLayout (the tile grid the map is built on), got "
                        f"{type(layout).__name__}")
    if layout.order != "cubes":
        raise ValueError(f"static patterns are defined on a grid of box tiles; this layout's tile "
                         f"order is {layout.order!r}: use order 'cubes' (model.tile_order=cubes)")


# --------------------------------------------------------------------------------------------------
# Building blocks (CPU, vectorised)
# --------------------------------------------------------------------------------------------------


def _lists(keys: torch.Tensor, keep: torch.Tensor, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of candidate key tiles (`keys`, with `keep` marking the real ones; no duplicates among
    kept) -> ascending int32 lists [rows, K_max] padded with 0, and int32 counts [rows]."""
    ordered = torch.where(keep, keys, n_tiles).sort(dim=1).values
    cnt = keep.sum(dim=1)
    width = max(int(cnt.max()), 1) if cnt.numel() else 1
    idx = ordered[:, :width]
    idx = torch.where(idx == n_tiles, 0, idx)
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32)


def _separable(tile_grid: Triple, axes) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose kept set is a product over axes: query tile (t, h, w) keeps the key tiles
    (t', h', w') with t' in axes[0][t], h' in axes[1][h], w' in axes[2][w]. Each axis gives
    (candidates [n_a, k_a], valid [n_a, k_a]); costs n_tiles * k_t * k_h * k_w, not n_tiles^2."""
    nt, nh, nw = tile_grid
    (ct, vt), (ch, vh), (cw, vw) = axes
    t = (slice(None), None, None, slice(None), None, None)
    h = (None, slice(None), None, None, slice(None), None)
    w = (None, None, slice(None), None, None, slice(None))
    keys = (ct[t] * nh + ch[h]) * nw + cw[w]          # [nt, nh, nw, kt, kh, kw]
    keep = vt[t] & vh[h] & vw[w]
    n = nt * nh * nw
    keys = keys.expand(nt, nh, nw, *keys.shape[3:]).reshape(n, -1)
    keep = keep.expand(nt, nh, nw, *keep.shape[3:]).reshape(n, -1)
    return _lists(keys, keep, n)


def _axis_radius(n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices i - r .. i + r of each i in [0, n), valid where inside [0, n)."""
    cand = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]
    return cand, (cand >= 0) & (cand < n)


def _axis_window(n: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min(w, n) consecutive indices around each i in [0, n), shifted inward at the ends."""
    w = min(w, n)
    start = (torch.arange(n) - (w - 1) // 2).clamp(0, n - w)
    cand = start[:, None] + torch.arange(w)[None, :]
    return cand, torch.ones_like(cand, dtype=torch.bool)


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean rows [rows, n_tiles] -> the column indices of each row's True entries, ascending
    (int32 [rows, K_max], padded with 0), and int32 counts [rows]. One pass, no sort."""
    cnt = keep.sum(dim=1)
    width = max(int(cnt.max()), 1) if cnt.numel() else 1
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending columns within each row
    pos = torch.arange(rows.numel()) - (torch.cumsum(cnt, 0) - cnt)[rows]
    idx = torch.zeros((keep.shape[0], width), dtype=torch.int32)
    idx[rows, pos] = cols.to(torch.int32)
    return idx, cnt.to(torch.int32)


def _criss_cross(tile_grid: Triple, lines: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAT-X: a key tile is kept when it differs from the query tile on at most `allowed` of the
    axes that have more than one tile (planes: all but one such axis; lines: one axis). The mask is
    built from per-axis [n_a, n_a] "differs" tables broadcast over the grid, in chunks of time
    slices of query tiles to bound its memory (one chunk up to ~4M query-key pairs)."""
    nt, nh, nw = tile_grid
    n = nt * nh * nw
    n_active = sum(size > 1 for size in tile_grid)
    allowed = 1 if lines else max(1, n_active - 1)
    diff = [1 - torch.eye(size, dtype=torch.int8) for size in tile_grid]  # 0 on a 1-tile axis
    slices = max(1, _MASK_CHUNK_ELEMENTS // (nh * nw * n))
    parts = []
    for t0 in range(0, nt, slices):
        dt = diff[0][t0:t0 + slices]
        differ = (dt[:, None, None, :, None, None] + diff[1][None, :, None, None, :, None]
                  + diff[2][None, None, :, None, None, :])  # [chunk, nh, nw, nt, nh, nw]
        parts.append(_compact((differ <= allowed).reshape(-1, n)))
    width = max(p[0].shape[1] for p in parts)
    idx = torch.cat([torch.nn.functional.pad(p[0], (0, width - p[0].shape[1])) for p in parts])
    return idx, torch.cat([p[1] for p in parts])


@functools.lru_cache(maxsize=128)
def _build(pattern: str, tile_grid: Triple, params, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Build on the CPU (milliseconds even at thousands of tiles) and move to `device` once. The
    CPU is explicit, so building also works under a default-device context (e.g. meta)."""
    with torch.device("cpu"):
        if pattern == "grat_b":
            idx, cnt = _separable(tile_grid, [_axis_radius(n, r) for n, r in zip(tile_grid, params)])
        elif pattern == "sta":
            idx, cnt = _separable(tile_grid, [_axis_window(n, w) for n, w in zip(tile_grid, params)])
        else:
            idx, cnt = _criss_cross(tile_grid, lines=params)
    return idx.to(device), cnt.to(device)


# --------------------------------------------------------------------------------------------------
# Public patterns
# --------------------------------------------------------------------------------------------------

DEFAULT_OPTIONS = {"grat_b": {"radius": (1, 1, 1)}, "grat_x": {"lines": False}, "sta": {"window": (3, 3, 3)}}


def pattern_options(name: str, **options) -> dict:
    """The validated options of pattern `name`, defaults filled in, in a normal hashable form
    (radius / window as 3 ints). Builds nothing, so configs can be checked anywhere."""
    if name not in DEFAULT_OPTIONS:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {sorted(DEFAULT_OPTIONS)}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS[name]))
    if unknown:
        raise TypeError(f"bad options {options} for pattern {name!r}: it takes "
                        f"{sorted(DEFAULT_OPTIONS[name])}, not {unknown}")
    opts = {**DEFAULT_OPTIONS[name], **options}
    if name == "grat_b":
        return {"radius": int_triple("grat_b radius", opts["radius"], minimum=0, scalar=True)}
    if name == "sta":
        return {"window": int_triple("sta window", opts["window"], minimum=1, scalar=True)}
    if not isinstance(opts["lines"], bool):
        raise TypeError(f"grat_x lines must be True or False, got {opts['lines']!r}")
    return {"lines": opts["lines"]}


def grat_b(layout: TileLayout, radius=(1, 1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAT-B: the key tiles within `radius` tiles (int, or per axis (t, h, w)) of the query tile.

    Radius 1 is the paper's 3x3x3 neighbourhood. Clipped at the borders. Returns (q2k_idx int32
    [n_tiles, K_max], q2k_cnt int32 [n_tiles]) on the layout's device (cached, shared)."""
    check_layout(layout)
    r = pattern_options("grat_b", radius=radius)["radius"]
    return _build("grat_b", layout.tile_grid, r, str(layout.device))


def grat_x(layout: TileLayout, lines: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAT-X criss-cross: key tiles sharing the query tile's time index, tile-row or tile-column
    (`lines=False`), or only the three axis-aligned lines of tiles through it (`lines=True`).
    Axes with one tile are left out (see the module docstring). Returns (q2k_idx, q2k_cnt)."""
    check_layout(layout)
    lines = pattern_options("grat_x", lines=lines)["lines"]
    return _build("grat_x", layout.tile_grid, lines, str(layout.device))


def sta(layout: TileLayout, window=(3, 3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding tile attention: a window of `window` tiles (int, or per axis (t, h, w)) centred on
    the query tile and shifted inward at the borders, so every query tile keeps the full window
    (cut to the grid where the window is larger). Returns (q2k_idx, q2k_cnt)."""
    check_layout(layout)
    w = pattern_options("sta", window=window)["window"]
    return _build("sta", layout.tile_grid, w, str(layout.device))


PATTERNS = {"grat_b": grat_b, "grat_x": grat_x, "sta": sta}


def build_map(name: str, layout: TileLayout, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of pattern `name` ("grat_b", "grat_x" or "sta") with its options."""
    opts = pattern_options(name, **options)
    return PATTERNS[name](layout, **opts)


def prepend_keys(idx: torch.Tensor, cnt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists [..., n_q_tiles, K] + counts [..., n_q_tiles] with key segments 0 .. n-1 listed first
    in every list and the listed tiles shifted by n: for a key sequence of n extra segments (e.g.
    Flux's text chunks) followed by the layout's tiles. Contiguous int32."""
    if not n:
        return idx, cnt
    lead = torch.arange(n, device=idx.device, dtype=idx.dtype).expand(*idx.shape[:-1], n)
    return torch.cat([lead, idx + n], dim=-1).contiguous(), (cnt + n).contiguous()


@functools.lru_cache(maxsize=64)
def _batched(name: str, options: tuple, tile_grid: Triple, device: str, batch: int, heads: int,
             n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, cnt = _build(name, tile_grid, options[0][1], device)
    idx, cnt = prepend_keys(idx, cnt, n_prefix)
    return (idx.expand(batch, heads, -1, -1).contiguous(), cnt.expand(batch, heads, -1).contiguous())


def batched_map(name: str, layout: TileLayout, batch: int, heads: int, n_prefix: int = 0,
                **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of pattern `name` laid out as the kernel reads it: contiguous int32 q2k_idx
    [batch, heads, n_tiles, K] and q2k_cnt [batch, heads, n_tiles] on the layout's device, ready for
    `fine_attention`. `n_prefix` > 0 lists that many extra key segments first (`prepend_keys`).
    Cached per (pattern, options, tile grid, device, batch, heads, n_prefix), so the blocks of a
    model share one copy and a call costs a cache lookup; the tensors are shared, do not modify
    them in place."""
    check_layout(layout)
    try:  # validated once per spelling of the options (a backend calls this every step)
        opts = _options_key(name, tuple(sorted(options.items())))
    except TypeError:  # unhashable values, e.g. lists from a config: validate them every call
        opts = tuple(pattern_options(name, **options).items())
    return _batched(name, opts, layout.tile_grid, str(layout.device), batch, heads, n_prefix)


@functools.lru_cache(maxsize=256)
def _options_key(name: str, options: tuple) -> tuple:
    return tuple(pattern_options(name, **dict(options)).items())  # one option per pattern


def clear_cache() -> None:
    """Forget every cached map, batched or not (the next call builds it again; used to time cold
    builds)."""
    _build.cache_clear()
    _batched.cache_clear()


# --------------------------------------------------------------------------------------------------
# Inspecting maps
# --------------------------------------------------------------------------------------------------


def _check_map(idx: torch.Tensor, cnt: torch.Tensor) -> None:
    if idx.dim() < 2 or tuple(idx.shape[:-1]) != tuple(cnt.shape):
        raise ValueError(f"q2k_idx [..., n_q_tiles, K] and q2k_cnt [..., n_q_tiles] do not match: "
                         f"{tuple(idx.shape)} and {tuple(cnt.shape)}")


def kept_fraction(idx: torch.Tensor, cnt: torch.Tensor, n_tiles: int) -> float:
    """Fraction of (query tile, key tile) pairs a map keeps: sum(cnt) / (n_query_tiles * n_tiles).
    Takes maps of any leading shape ([n, K] or [B, H, n, K]); for full tiles this is also the
    fraction of the attention FLOPs that remain."""
    _check_map(idx, cnt)
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be >= 1, got {n_tiles}")
    return float(cnt.sum()) / (cnt.numel() * n_tiles)


def kept_token_fraction(layout: TileLayout, idx: torch.Tensor, cnt: torch.Tensor) -> float:
    """Fraction of (query token, key token) pairs a map [n_tiles, K] keeps on `layout`: the same
    as `kept_fraction` for full tiles, exact for ragged edge tiles (for FLOP accounting)."""
    check_layout(layout)
    _check_map(idx, cnt)
    if idx.dim() != 2 or idx.shape[0] != layout.n_tiles:
        raise ValueError(f"expected a map [n_tiles={layout.n_tiles}, K], got {tuple(idx.shape)}")
    sizes = layout.sizes.to(device=idx.device, dtype=torch.float64)
    listed = torch.arange(idx.shape[1], device=idx.device) < cnt[:, None].long()
    keys_per_tile = torch.where(listed, sizes[idx.long()], 0.0).sum(dim=1)
    return float((sizes * keys_per_tile).sum()) / float(layout.seq_len) ** 2


def tile_mask(idx: torch.Tensor, cnt: torch.Tensor, n_kv_tiles: int) -> torch.Tensor:
    """Dense boolean map [..., n_q_tiles, n_kv_tiles]: True where a query tile keeps a key tile."""
    _check_map(idx, cnt)
    listed = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None].long()
    target = torch.where(listed, idx.long(), n_kv_tiles)  # unused slots go to a dropped column
    mask = torch.zeros((*idx.shape[:-1], n_kv_tiles + 1), dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, target, True)[..., :n_kv_tiles]
