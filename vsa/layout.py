"""Tile layout of a video token grid: raster order <-> tile-major order.

The (T, H, W) token grid is cut into tiles of `tile = (tt, th, tw)` tokens (default 4x4x4 = 64).
Tiles are numbered in raster order over the tile grid; inside a tile, tokens keep their raster
(t, h, w) order. When a grid dimension is not a multiple of the tile, the last tile on that axis is
smaller (ragged edge tiles): tokens stay densely packed, nothing is padded.

    layout = TileLayout((5, 6, 7))          # 8 tiles, sizes 64, 48, ..., 18
    x_tiles = layout.to_tiles(x, dim=1)     # [B, S, ...] raster -> tile-major
    x = layout.from_tiles(x_tiles, dim=1)   # and back

`order="curve"` is the alternative for grids the tile does not divide: tokens follow a 3D Z-order
(Morton) curve over the grid and are cut into groups of `tile` volume, so every group but the
last is full (ragged 4x4x4 cubes leave partial tiles at every edge: 21x30x52 = 32,760 tokens is 624
cubes but 512 curve groups). On a grid that the (power-of-two, cubic) tile divides, the curve's
groups are exactly the cubes. Groups are compact but not boxes: the static patterns (GRAT, STA),
which are defined on the tile grid, need `order="cubes"`.

All index tensors are built once per (grid, tile, order, device) and cached.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers

import torch

Grid = tuple[int, int, int]


def int_triple(name: str, value, minimum: int = 1, scalar: bool = False) -> Grid:
    """`value` as 3 ints (t, h, w), each >= `minimum`; with `scalar`, one int stands for all three
    axes. Entries must be integral numbers (4 or 4.0, not 4.5, True or "4"). The one validator of
    grids, tiles, radii and windows: raises TypeError for a value that is no sequence, ValueError
    for a sequence of the wrong length or values, naming `name` and what it takes."""
    ints = "3 positive ints" if minimum == 1 else "3 ints"
    takes = f"an int or {ints} (t, h, w)" if scalar else f"{ints} (t, h, w)"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and scalar:
        values = (value, value, value)
    elif isinstance(value, (str, bytes, numbers.Number)):
        raise TypeError(f"{name} must be {takes}, got {value!r}")
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be {takes}, got {value!r}") from None
    if len(values) != 3 or not all(_is_integral(v) for v in values):
        raise ValueError(f"{name} must be {takes}, got {value!r}")
    triple = tuple(int(v) for v in values)
    if min(triple) < minimum:
        if minimum == 1 and not scalar:  # grids and tiles
            raise ValueError(f"{name} must be {takes}, got {value!r}")
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return triple  # type: ignore[return-value]


def _is_integral(v) -> bool:
    if isinstance(v, (bool, str, bytes)):
        return False
    try:
        return int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


def _normalize(device) -> torch.device:
    """"cuda" and "cuda:0" name the same tensors: give CUDA devices their index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


ORDERS = ("cubes", "curve")


class TileFill(enum.IntEnum):
    """How the tiles of a layout fill the kernels' row blocks (`TileLayout.fill`); the kernels drop
    row masks where tiles are known to be full."""

    RAGGED = 0  # any tile may be short (ragged edge cubes)
    FULL_BUT_LAST = 1  # every tile full but possibly the last (Z-order groups)
    FULL = 2  # every tile holds the tile's volume


def morton_codes(grid: Grid) -> torch.Tensor:
    """Z-order (Morton) code of every token of a (T, H, W) grid, raster order: the bits of t, h, w
    interleaved (w lowest), so each aligned 2^k x 2^k x 2^k block is a run of 8^k codes."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    code = torch.zeros(T, H, W, dtype=torch.int64)
    for bit in range(max(T, H, W).bit_length()):
        for shift, axis in ((2, t), (1, h), (0, w)):
            code |= ((axis >> bit) & 1) << (3 * bit + shift)
    return code.reshape(-1)


def _build_curve(grid: Grid, volume: int) -> dict[str, torch.Tensor]:
    """Groups of `volume` consecutive tokens along the Z-order curve (the last may be smaller)."""
    seq = math.prod(grid)
    n = math.ceil(seq / volume)
    sizes = torch.full((n,), volume, dtype=torch.int64)
    sizes[-1] = seq - (n - 1) * volume
    perm = torch.sort(morton_codes(grid), stable=True).indices
    return {"sizes": sizes, "perm": perm}


@functools.lru_cache(maxsize=256)
def _build(grid: Grid, tile: Grid, order: str, device: str) -> dict[str, torch.Tensor]:
    """All index tensors of one layout, computed on the CPU and moved to `device` once."""
    if order == "curve":
        return _finish(**_build_curve(grid, math.prod(tile)), device=device)
    T, H, W = grid
    tt, th, tw = tile
    nt, nh, nw = (math.ceil(g / t) for g, t in zip(grid, tile))
    # Tile extent along each axis (the last one is smaller when ragged), then the size of every tile.
    ext = [torch.clamp(torch.tensor([t] * n), max=g - torch.arange(n) * t)
           for g, t, n in zip(grid, tile, (nt, nh, nw))]
    sizes = (ext[0][:, None, None] * ext[1][None, :, None] * ext[2][None, None, :]).reshape(-1)
    # Tile index of every token in raster order; a stable sort by it keeps raster order inside tiles.
    t_idx = torch.arange(T) // tt
    h_idx = torch.arange(H) // th
    w_idx = torch.arange(W) // tw
    tile_of_raster = (t_idx[:, None, None] * nh + h_idx[None, :, None]) * nw + w_idx[None, None, :]
    perm = torch.sort(tile_of_raster.reshape(-1), stable=True).indices
    return _finish(sizes, perm, device)


def _finish(sizes: torch.Tensor, perm: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """Offsets, inverse permutation and per-token group ids from group sizes and the permutation."""
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    tile_ids = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    out = {
        "sizes": sizes.to(torch.int32),
        "offsets": offsets.to(torch.int32),
        "perm": perm,
        "inv_perm": inv_perm,
        "tile_ids": tile_ids,
    }
    return {k: v.to(device) for k, v in out.items()}


class TileLayout:
    """Tile-major order of a (T, H, W) token grid with ragged edge tiles (order "cubes"), or
    groups of the tile's volume along a Z-order curve (order "curve"; see the module docstring).

    Attributes (tensors on `device`):
        sizes     int32 [n_tiles]      tokens in each tile
        offsets   int32 [n_tiles + 1]  start of each tile in tile-major order (offsets[-1] = S)
        perm      int64 [S]            perm[i] = raster index of the token at tile-major position i
        inv_perm  int64 [S]            inv_perm[r] = tile-major position of raster token r
        tile_ids  int64 [S]            tile of the token at each tile-major position
    """

    def __init__(self, grid, tile=(4, 4, 4), device: torch.device | str = "cpu", order: str = "cubes"):
        self.grid = int_triple("grid", grid)
        self.tile = int_triple("tile", tile)
        self.device = _normalize(device)
        if order not in ORDERS:
            raise ValueError(f"unknown tile order {order!r}; choose one of {ORDERS}")
        self.order = order
        self.seq_len = math.prod(self.grid)
        self.tile_volume = math.prod(self.tile)
        if order == "curve":
            self.tile_grid = None  # groups are not boxes
            self.n_tiles = math.ceil(self.seq_len / self.tile_volume)
            self.max_tile_size = min(self.tile_volume, self.seq_len)
        else:
            self.tile_grid: Grid | None = tuple(math.ceil(g / t) for g, t in zip(self.grid, self.tile))
            self.n_tiles = math.prod(self.tile_grid)
            # Largest tile: a full tile unless the grid is smaller than the tile along some axis.
            self.max_tile_size = math.prod(min(g, t) for g, t in zip(self.grid, self.tile))
        self._t = _build(self.grid, self.tile, order, str(self.device))
        self._on_device: dict[torch.device, TileLayout] = {self.device: self}

    sizes = property(lambda self: self._t["sizes"])
    offsets = property(lambda self: self._t["offsets"])
    perm = property(lambda self: self._t["perm"])
    inv_perm = property(lambda self: self._t["inv_perm"])
    tile_ids = property(lambda self: self._t["tile_ids"])

    @property
    def is_ragged(self) -> bool:
        """Whether some tile (group) holds fewer tokens than the tile's volume."""
        if self.order == "curve":
            return self.seq_len % self.tile_volume != 0
        return any(g % t for g, t in zip(self.grid, self.tile))

    @property
    def fill(self) -> TileFill:
        """How tiles fill the kernels' blocks: FULL when every tile holds the tile's volume,
        FULL_BUT_LAST when all but the last do (Z-order groups), RAGGED otherwise."""
        if not self.is_ragged:
            return TileFill.FULL
        return TileFill.FULL_BUT_LAST if self.order == "curve" else TileFill.RAGGED

    def to(self, device: torch.device | str) -> TileLayout:
        """The same layout with its index tensors on `device`.

        The copy is made once per device and kept: a layout built on the CPU and used with CUDA
        tensors (the ops call `layout.to(q.device)`) costs one dictionary lookup per call after the
        first, and `copy.to(original.device)` returns the original object."""
        device = _normalize(device)
        moved = self._on_device.get(device)
        if moved is None:
            moved = TileLayout(self.grid, self.tile, device, self.order)
            moved._on_device = self._on_device  # one cache for all copies of this layout
            self._on_device[device] = moved
        return moved

    def _check(self, x: torch.Tensor, dim: int) -> int:
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"tensor has {x.shape[dim]} tokens along dim {dim} but the layout {self.grid} has "
                f"{self.seq_len}; pass the dim that holds the T*H*W tokens"
            )
        return dim

    def to_tiles(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reorder tokens along `dim` from raster order to tile-major order."""
        dim = self._check(x, dim)
        return x.index_select(dim, self.to(x.device).perm)

    def from_tiles(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reorder tokens along `dim` from tile-major order back to raster order."""
        dim = self._check(x, dim)
        return x.index_select(dim, self.to(x.device).inv_perm)

    def __eq__(self, other) -> bool:
        return isinstance(other, TileLayout) and ((self.grid, self.tile, self.order)
                                                  == (other.grid, other.tile, other.order))

    def __hash__(self) -> int:
        return hash((self.grid, self.tile, self.order))

    def __repr__(self) -> str:
        return (f"TileLayout(grid={self.grid}, tile={self.tile}, order={self.order}, "
                f"n_tiles={self.n_tiles}, device={self.device})")
