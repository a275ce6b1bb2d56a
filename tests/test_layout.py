import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsa import TileLayout
from vsa.layout import TileFill, int_triple

dims = st.integers(min_value=1, max_value=11)
tiles = st.integers(min_value=1, max_value=5)


def brute_force_perm(grid, tile):
    """Tile-major order by explicit enumeration: tiles in raster order, tokens raster inside."""
    T, H, W = grid
    tt, th, tw = tile
    order = []
    for it in range(0, T, tt):
        for ih in range(0, H, th):
            for iw in range(0, W, tw):
                for t in range(it, min(it + tt, T)):
                    for h in range(ih, min(ih + th, H)):
                        for w in range(iw, min(iw + tw, W)):
                            order.append((t * H + h) * W + w)
    return order


@settings(max_examples=60, deadline=None)
@given(T=dims, H=dims, W=dims, tt=tiles, th=tiles, tw=tiles)
def test_layout_matches_enumeration_and_round_trips(T, H, W, tt, th, tw):
    layout = TileLayout((T, H, W), tile=(tt, th, tw))
    S = T * H * W
    assert layout.perm.tolist() == brute_force_perm((T, H, W), (tt, th, tw))
    assert layout.perm[layout.inv_perm].tolist() == list(range(S))
    assert layout.sizes.dtype == torch.int32 and layout.offsets.dtype == torch.int32
    assert layout.offsets[0] == 0 and layout.offsets[-1] == S
    assert torch.equal(layout.offsets[1:] - layout.offsets[:-1], layout.sizes)
    assert layout.n_tiles == layout.sizes.numel() == len(layout.offsets) - 1
    assert int(layout.sizes.max()) == layout.max_tile_size
    x = torch.randn(2, S, 3)
    xt = layout.to_tiles(x, dim=1)
    assert torch.equal(layout.from_tiles(xt, dim=1), x)
    assert torch.equal(xt, x[:, layout.perm])
    # Every tile holds exactly the tokens of its box.
    ntw, nth = -(-W // tw), -(-H // th)
    coords = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"),
                         -1).reshape(-1, 3)[layout.perm]
    box = coords // torch.tensor([tt, th, tw])
    tile_of = (box[:, 0] * nth + box[:, 1]) * ntw + box[:, 2]
    assert torch.equal(tile_of, layout.tile_ids)


def test_ragged_sizes_example():
    layout = TileLayout((5, 6, 7))
    assert layout.n_tiles == 8
    assert layout.sizes.tolist() == [64, 48, 32, 24, 16, 12, 8, 6]
    assert layout.is_ragged and not TileLayout((8, 8, 8)).is_ragged


def test_to_tiles_other_dim_and_cache():
    layout = TileLayout((3, 9, 4))
    x = torch.randn(4, 2, layout.seq_len)
    assert torch.equal(layout.from_tiles(layout.to_tiles(x, dim=-1), dim=-1), x)
    again = TileLayout((3, 9, 4))
    assert again.perm is layout.perm  # index tensors are built once per (grid, tile, device)


@pytest.mark.parametrize("grid", [(0, 4, 4), (4, 4), (4, -1, 4), "abc"])
def test_bad_grid(grid):
    with pytest.raises((ValueError, TypeError), match="grid"):
        TileLayout(grid)


def test_wrong_length_tensor():
    layout = TileLayout((4, 4, 4))
    with pytest.raises(ValueError, match="65 tokens"):
        layout.to_tiles(torch.randn(1, 65, 2))


@pytest.mark.parametrize("grid", [(21, 30, 52), (5, 6, 7), (3, 9, 4), (1, 1, 1), (2, 3, 100)])
def test_curve_order_groups_are_full_but_the_last(grid):
    layout = TileLayout(grid, order="curve")
    S = layout.seq_len
    assert sorted(layout.perm.tolist()) == list(range(S))
    assert layout.n_tiles == -(-S // 64) and layout.tile_grid is None
    sizes = layout.sizes.tolist()
    assert all(s == 64 for s in sizes[:-1]) and sizes[-1] == S - 64 * (len(sizes) - 1)
    assert layout.is_ragged == (S % 64 != 0) and layout.max_tile_size == min(64, S)
    x = torch.randn(2, S, 3)
    torch.testing.assert_close(layout.from_tiles(layout.to_tiles(x)), x)
    assert layout.tile_ids.tolist() == [i for i, s in enumerate(sizes) for _ in range(s)]


def test_curve_order_on_an_aligned_grid_gives_the_cubes():
    """Z-order groups of 64 on a grid that 4x4x4 divides are exactly the 4x4x4 cubes."""
    def groups(layout):
        return {frozenset(layout.perm[a:b].tolist())
                for a, b in zip(layout.offsets[:-1].tolist(), layout.offsets[1:].tolist())}
    for grid in [(8, 8, 8), (4, 12, 8), (16, 4, 20)]:
        assert groups(TileLayout(grid, order="curve")) == groups(TileLayout(grid))
    ragged = TileLayout((21, 30, 52), order="curve")
    assert ragged.n_tiles == 512 and TileLayout((21, 30, 52)).n_tiles == 624
    assert TileLayout((8, 8, 8), order="curve") != TileLayout((8, 8, 8))
    with pytest.raises(ValueError, match="tile order"):
        TileLayout((8, 8, 8), order="hilbert")


def test_layout_moves_to_a_device_once_and_keeps_the_copy(monkeypatch):
    """`to(device)` builds the copy on a device once: later calls (every op call with tensors on
    that device) return the same object, and the copy leads back to the original."""
    layout = TileLayout((5, 6, 7))
    built = []
    init = TileLayout.__init__
    monkeypatch.setattr(TileLayout, "__init__", lambda self, *a, **k: built.append(a) or init(self, *a, **k))
    moved = layout.to("meta")  # a device without data stands in for a GPU on CPU-only machines
    assert moved.device == torch.device("meta") and moved.offsets.device.type == "meta"
    assert layout.to("meta") is moved and layout.to(torch.device("meta")) is moved
    assert moved.to("cpu") is layout and layout.to("cpu") is layout and moved.to("meta") is moved
    assert len(built) == 1 and moved == layout and moved.fill == layout.fill


def test_ops_move_a_layout_of_another_device_once(monkeypatch):
    """A layout built on another device than the tensors (the usual slip: built on the CPU, used
    with CUDA tensors) is moved to the tensors' device on the first call and reused after: same
    result as a layout built there, and no new layout per call."""
    from vsa import block_sparse_attention, video_sparse_attention

    elsewhere, here = TileLayout((5, 6, 7), device="meta"), TileLayout((5, 6, 7))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, here.seq_len, 2, 64, generator=gen) for _ in range(3))
    idx = torch.arange(here.n_tiles, dtype=torch.int32).expand(1, 2, here.n_tiles, -1).contiguous()
    cnt = torch.full((1, 2, here.n_tiles), 3, dtype=torch.int32)
    want_fine = block_sparse_attention(q, k, v, here, idx, cnt)
    want_vsa = video_sparse_attention(q, k, v, here, topk=3)
    elsewhere.to("cpu")  # the one copy
    built = []
    init = TileLayout.__init__
    monkeypatch.setattr(TileLayout, "__init__", lambda self, *a, **kw: built.append(a) or init(self, *a, **kw))
    for _ in range(2):
        torch.testing.assert_close(block_sparse_attention(q, k, v, elsewhere, idx, cnt), want_fine)
        torch.testing.assert_close(video_sparse_attention(q, k, v, elsewhere, topk=3), want_vsa)
    assert built == []


def test_tile_fill_kinds():
    assert TileLayout((8, 8, 8)).fill is TileFill.FULL
    assert TileLayout((5, 6, 7), order="curve").fill is TileFill.FULL_BUT_LAST
    assert TileLayout((5, 6, 7)).fill is TileFill.RAGGED
    assert TileLayout((8, 8, 8)).fill == 2  # an IntEnum: code comparing with ints still works


@pytest.mark.parametrize("value, kwargs, expected", [
    ((4, 8, 8), {}, (4, 8, 8)), ([1, 2.0, 3], {}, (1, 2, 3)), (2, {"scalar": True}, (2, 2, 2)),
    ((0, 1, 0), {"minimum": 0}, (0, 1, 0)),
])
def test_int_triple_accepts(value, kwargs, expected):
    assert int_triple("tile", value, **kwargs) == expected


@pytest.mark.parametrize("value, kwargs, error, message", [
    (4, {}, TypeError, r"tile must be 3 positive ints \(t, h, w\), got 4"),
    ("448", {}, TypeError, "tile must be 3 positive ints"),
    ((4, 8), {}, ValueError, "tile must be 3 positive ints"),
    ((4, 0, 8), {}, ValueError, "tile must be 3 positive ints"),
    ((4, 8.5, 8), {}, ValueError, "tile must be 3 positive ints"),
    ((4, True, 8), {}, ValueError, "tile must be 3 positive ints"),
    (True, {"scalar": True}, TypeError, r"tile must be an int or 3 positive ints"),
    (-1, {"scalar": True, "minimum": 0}, ValueError, "tile must be >= 0 on every axis, got -1"),
    (0, {"scalar": True}, ValueError, "tile must be >= 1 on every axis"),
])
def test_int_triple_rejects_with_what_it_takes(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        int_triple("tile", value, **kwargs)
