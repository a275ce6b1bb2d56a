"""Training-free structured patterns (GRAT-B, GRAT-X, STA): map geometry against the definitions,
pattern attention against the float64 reference (Triton interpreter and torch path), the attention
backends in VideoDiT and the Hydra configs, the diffusers processors (Wan, Flux; skipped without
diffusers), and the CPU-side helpers of scripts/bench_patterns.py."""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vsa import TileLayout, block_sparse_attention
from vsa.attention import BACKENDS, AttentionContext, build_backend
from vsa.models import build_model
from vsa.ops import patterns
from vsa.ops.reference import (
    block_sparse_attention_reference,
    masked_attention_reference,
    video_sparse_attention_reference,
)

REPO = Path(__file__).resolve().parents[1]

try:
    import diffusers  # noqa: F401

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False
needs_diffusers = pytest.mark.skipif(
    not HAVE_DIFFUSERS, reason="diffusers is not installed (optional extra: pip install 'diffusers>=0.35')")

BENCH_LAYOUT = TileLayout((32, 48, 80), (4, 8, 8))  # the benchmark's 8 x 6 x 10 tile grid


# ---- helpers -----------------------------------------------------------------------------------


def tile_coords(tile_grid) -> torch.Tensor:
    """(t, h, w) of every tile, raster order: [n, 3]."""
    nt, nh, nw = tile_grid
    t, h, w = torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def definition_mask(name: str, tile_grid, **opts) -> torch.Tensor:
    """The pattern written out from its definition on tile coordinates: [n, n] bool."""
    c = tile_coords(tile_grid)
    d = (c[:, None, :] - c[None, :, :]).abs()  # per-axis distance, [n, n, 3]
    if name == "grat_b":
        r = torch.tensor(opts.get("radius", (1, 1, 1))).expand(3)
        return (d <= r).all(-1)
    if name == "grat_x":
        active = torch.tensor([n > 1 for n in tile_grid])
        same = (d == 0) | ~active
        if opts.get("lines", False):  # on the three axis-aligned lines through the query tile
            return same.sum(-1) >= 2
        n_active = int(active.sum())
        if n_active >= 3:  # shares the time index, the tile-row or the tile-column
            return (same & active).any(-1) | (d == 0).all(-1)
        return same.sum(-1) >= 2  # 2D: same row or same column (criss-cross)
    raise ValueError(name)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(x).any(), "NaN in result"
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def batched(idx, cnt, B, H):
    return idx.expand(B, H, -1, -1).contiguous(), cnt.expand(B, H, -1).contiguous()


def randomized(model, seed=0, scale=0.1):
    """A fresh VideoDiT is the zero map (zero-init gates): perturb every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


# ---- map geometry ------------------------------------------------------------------------------


def test_grat_b_keeps_27_inside_and_fewer_at_borders():
    idx, cnt = patterns.grat_b(BENCH_LAYOUT)
    assert BENCH_LAYOUT.tile_grid == (8, 6, 10) and idx.dtype == cnt.dtype == torch.int32
    counts = cnt.view(8, 6, 10)
    assert int(counts[3, 3, 4]) == 27 and idx.shape == (480, 27)  # an interior query tile
    assert int(counts[0, 0, 0]) == 8 and int(counts[7, 5, 9]) == 8  # corners: 2x2x2
    assert int(counts[0, 3, 4]) == 18 and int(counts[0, 0, 4]) == 12  # a face, an edge
    # Per axis a tile sees 2 (border) or 3 neighbours: the total is a product of per-axis sums.
    assert int(cnt.sum()) == (3 * 8 - 2) * (3 * 6 - 2) * (3 * 10 - 2)
    torch.testing.assert_close(patterns.tile_mask(idx, cnt, 480), definition_mask("grat_b", (8, 6, 10)))


@pytest.mark.parametrize("radius", [(1, 1, 1), (0, 1, 2), 2, (3, 0, 0)])
def test_grat_b_matches_its_definition_on_a_ragged_layout(radius):
    layout = TileLayout((9, 10, 23), (2, 4, 4))  # 5 x 3 x 6 tiles, ragged on every axis
    idx, cnt = patterns.grat_b(layout, radius=radius)
    mask = patterns.tile_mask(idx, cnt, layout.n_tiles)
    r = (radius,) * 3 if isinstance(radius, int) else radius
    torch.testing.assert_close(mask, definition_mask("grat_b", layout.tile_grid, radius=r))


@pytest.mark.parametrize("lines,count", [(False, 165), (True, 22)])
def test_grat_x_counts_and_definition(lines, count):
    idx, cnt = patterns.grat_x(BENCH_LAYOUT, lines=lines)
    # Planes: all tiles but those differing on all 3 axes, 480 - 7*5*9; lines: 1 + 7 + 5 + 9.
    assert cnt.min() == cnt.max() == count and idx.shape == (480, count)
    mask = patterns.tile_mask(idx, cnt, 480)
    torch.testing.assert_close(mask, definition_mask("grat_x", (8, 6, 10), lines=lines))
    expected = {False: 0.34375, True: 22 / 480}[lines]  # docs/benchmarks.md: GRAT-X planes keep 34.4%
    assert patterns.kept_fraction(idx, cnt, 480) == pytest.approx(expected)


@pytest.mark.parametrize("lines", [False, True])
def test_grat_x_on_an_image_tile_grid_is_the_2d_criss_cross(lines):
    layout = TileLayout((1, 64, 96), (1, 16, 16))  # Flux-like: 4 x 6 tiles of 16x16 tokens
    idx, cnt = patterns.grat_x(layout, lines=lines)
    c = tile_coords(layout.tile_grid)
    criss_cross = (c[:, None, 1] == c[None, :, 1]) | (c[:, None, 2] == c[None, :, 2])
    torch.testing.assert_close(patterns.tile_mask(idx, cnt, layout.n_tiles), criss_cross)
    assert cnt.min() == cnt.max() == 4 + 6 - 1


@pytest.mark.parametrize("tile_grid,window", [((8, 6, 10), (3, 3, 3)), ((8, 6, 10), (2, 5, 4)),
                                              ((2, 6, 10), (3, 3, 12)), ((5, 3, 7), 1)])
def test_sta_keeps_the_full_window_everywhere(tile_grid, window):
    layout = TileLayout(tile_grid, (1, 1, 1))  # maps depend on the tile grid only
    idx, cnt = patterns.sta(layout, window=window)
    w = (window,) * 3 if isinstance(window, int) else window
    full = math.prod(min(a, n) for a, n in zip(w, tile_grid))
    assert cnt.min() == cnt.max() == full, "every query tile keeps the full (grid-capped) window"
    mask = patterns.tile_mask(idx, cnt, layout.n_tiles)
    c = tile_coords(tile_grid)
    for axis, (n, width) in enumerate(zip(tile_grid, w)):
        width = min(width, n)
        others = tuple(a for a in range(3) if a != axis)
        for i in range(n):  # the window on this axis, seen from the query tile (i on this axis, 0 elsewhere)
            q = int(((c[:, axis] == i) & (c[:, list(others)] == 0).all(1)).nonzero()[0])
            kept = mask[q].view(*tile_grid).any(dim=others).nonzero().squeeze(1)
            assert kept.numel() == width and int(kept[-1] - kept[0]) == width - 1  # contiguous
            assert int(kept[0]) <= i <= int(kept[-1])
            # Centred where there is room (an even window extends one more tile forward).
            if (width - 1) // 2 <= i <= n - 1 - width // 2:
                assert int(kept[0]) == i - (width - 1) // 2
            else:  # shifted inward: the window touches the border it would cross
                assert int(kept[0]) == 0 or int(kept[-1]) == n - 1


def test_sta_differs_from_grat_b_only_at_the_borders():
    b_idx, b_cnt = patterns.grat_b(BENCH_LAYOUT)
    s_idx, s_cnt = patterns.sta(BENCH_LAYOUT)
    same = (patterns.tile_mask(b_idx, b_cnt, 480) == patterns.tile_mask(s_idx, s_cnt, 480)).all(1)
    interior = (b_cnt == 27)
    assert bool(same[interior].all()) and not bool(same[~interior].any())
    assert int(s_cnt[0]) == 27 and int(b_cnt[0]) == 8


@pytest.mark.parametrize("name,opts", [("grat_b", {}), ("grat_b", {"radius": (0, 2, 1)}), ("grat_x", {}),
                                       ("grat_x", {"lines": True}), ("sta", {}), ("sta", {"window": 2})])
@pytest.mark.parametrize("grid,tile", [((32, 48, 80), (4, 8, 8)), ((5, 6, 7), (4, 4, 4)), ((1, 1, 1), (4, 4, 4)),
                                       ((3, 40, 24), (1, 16, 16))])
def test_lists_are_ascending_distinct_in_range_and_keep_the_query_tile(name, opts, grid, tile):
    layout = TileLayout(grid, tile)
    idx, cnt = patterns.build_map(name, layout, **opts)
    n = layout.n_tiles
    assert idx.shape[0] == cnt.shape[0] == n and idx.dtype == cnt.dtype == torch.int32
    assert idx.shape[1] == int(cnt.max()) and int(cnt.min()) >= 1
    listed = torch.arange(idx.shape[1]) < cnt[:, None]
    assert bool(((idx >= 0) & (idx < n)).all()) and bool((idx[~listed] == 0).all())
    steps = idx[:, 1:] - idx[:, :-1]
    assert bool((steps[listed[:, 1:]] > 0).all()), "ascending and distinct"
    assert bool(((idx == torch.arange(n)[:, None].int()) & listed).any(1).all()), "keeps itself"


def test_maps_are_built_once_per_tile_grid_and_cached():
    patterns.clear_cache()
    first = patterns.grat_b(TileLayout((32, 48, 80), (4, 8, 8)))
    again = patterns.grat_b(TileLayout((29, 41, 77), (4, 8, 8)))  # same 8 x 6 x 10 tile grid, ragged
    assert first[0] is again[0] and first[1] is again[1]
    other = patterns.grat_b(BENCH_LAYOUT, radius=2)
    assert other[0] is not first[0] and other[0].shape == (480, 125)
    info = patterns._build.cache_info()
    assert info.misses == 2 and info.hits == 1


def test_map_building_is_vectorised_at_1920_tiles():
    layout = TileLayout((64, 96, 80), (4, 8, 8))  # 16 x 12 x 10 = 1920 tiles
    expected = {("grat_b", False): 27, ("grat_x", False): 1920 - 15 * 11 * 9, ("grat_x", True): 16 + 12 + 10 - 2,
                ("sta", False): 27}
    for (name, lines), k_max in expected.items():
        opts = {"lines": lines} if name == "grat_x" else {}
        patterns.clear_cache()
        start = time.perf_counter()
        idx, cnt = patterns.build_map(name, layout, **opts)
        ms = 1e3 * (time.perf_counter() - start)
        print(f"{name}{' lines' if lines else ''}: {layout.n_tiles} tiles, K_max {idx.shape[1]}, built in {ms:.1f} ms")
        assert idx.shape == (1920, k_max) and int(cnt.max()) == k_max
        if name != "grat_b":
            assert int(cnt.min()) == k_max
    # The builder is exact at this size too (GRAT-X planes against the definition).
    idx, cnt = patterns.grat_x(layout)
    torch.testing.assert_close(patterns.tile_mask(idx, cnt, 1920), definition_mask("grat_x", (16, 12, 10)))


def test_kept_fractions():
    idx, cnt = patterns.grat_b(BENCH_LAYOUT)
    frac = patterns.kept_fraction(idx, cnt, 480)
    assert frac == pytest.approx(22 * 16 * 28 / 480**2)  # 4.28%: docs/benchmarks.md's "4.3% kept"
    assert patterns.kept_fraction(*batched(idx, cnt, 2, 3), 480) == pytest.approx(frac)
    assert patterns.kept_token_fraction(BENCH_LAYOUT, idx, cnt) == pytest.approx(frac)  # full tiles
    ragged = TileLayout((9, 6, 7), (4, 4, 4))
    idx, cnt = patterns.grat_b(ragged)
    tiles = patterns.tile_mask(idx, cnt, ragged.n_tiles)
    tokens = tiles[ragged.tile_ids][:, ragged.tile_ids]
    assert patterns.kept_token_fraction(ragged, idx, cnt) == pytest.approx(tokens.double().mean().item())
    assert patterns.kept_fraction(idx, cnt, ragged.n_tiles) == pytest.approx(tiles.double().mean().item())


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="radius must be >= 0"):
        patterns.grat_b(BENCH_LAYOUT, radius=(1, -1, 1))
    with pytest.raises(ValueError, match="3 ints"):
        patterns.grat_b(BENCH_LAYOUT, radius=(1, 1))
    with pytest.raises(ValueError, match="window must be >= 1"):
        patterns.sta(BENCH_LAYOUT, window=0)
    with pytest.raises(TypeError, match="lines must be True or False"):
        patterns.grat_x(BENCH_LAYOUT, lines="yes")
    with pytest.raises(ValueError, match="unknown pattern"):
        patterns.build_map("grat_z", BENCH_LAYOUT)
    with pytest.raises(TypeError, match="bad options"):
        patterns.build_map("grat_b", BENCH_LAYOUT, window=3)
    with pytest.raises(TypeError, match="TileLayout"):
        patterns.grat_b((8, 6, 10))
    with pytest.raises(ValueError, match="do not match"):
        patterns.kept_fraction(torch.zeros(4, 3, dtype=torch.int32), torch.zeros(5, dtype=torch.int32), 4)


# ---- pattern attention vs the float64 reference ------------------------------------------------

RAGGED = TileLayout((9, 6, 7), (4, 4, 4))  # 3 x 2 x 2 tiles of at most 64 tokens, ragged
CASES = [("grat_b", {}), ("grat_x", {}), ("sta", {"window": (2, 2, 2)})]


def qkv(layout, B, H, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, layout.seq_len, H, D, generator=gen) for _ in range(3)]


def forward_backward(fn, inputs, grad_out, dtype=torch.float32, device="cpu"):
    leaves = [x.detach().to(device=device, dtype=dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(device=device, dtype=dtype))
    return [out.detach().cpu(), *(x.grad.cpu() for x in leaves)]


@pytest.mark.parametrize("name,opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_pattern_attention_matches_float64_reference(name, opts, impl, kernel_device):
    B, H = (1, 2) if impl == "triton" else (2, 2)
    device = kernel_device if impl == "triton" else "cpu"
    idx, cnt = patterns.build_map(name, RAGGED, **opts)
    assert 0 < patterns.kept_fraction(idx, cnt, RAGGED.n_tiles) < 1  # a real (partial) pattern
    bidx, bcnt = batched(idx, cnt, B, H)
    q, k, v = qkv(RAGGED, B, H)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    layout = RAGGED.to(device)
    got = forward_backward(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, bidx.to(device), bcnt.to(device), impl=impl),
        (q, k, v), grad_out, device=device)
    ref = forward_backward(lambda q, k, v: block_sparse_attention_reference(q, k, v, RAGGED, bidx, bcnt),
                           (q, k, v), grad_out, dtype=torch.float64)
    for label, x, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert rel_err(x, r) < 2e-5, f"{name} {impl} {label}: relative error {rel_err(x, r):.2e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_a_full_cover_pattern_equals_dense_attention(impl, kernel_device):
    layout = TileLayout((6, 5, 8), (4, 4, 4))  # 2 x 2 x 2 ragged tiles: radius 1 reaches all of them
    device = kernel_device if impl == "triton" else "cpu"
    idx, cnt = patterns.grat_b(layout)
    assert patterns.kept_fraction(idx, cnt, layout.n_tiles) == 1.0
    bidx, bcnt = batched(idx, cnt, 1, 2)
    q, k, v = qkv(layout, 1, 2, seed=3)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    dev_layout = layout.to(device)
    got = forward_backward(
        lambda q, k, v: block_sparse_attention(q, k, v, dev_layout, bidx.to(device), bcnt.to(device), impl=impl),
        (q, k, v), grad_out, device=device)
    dense = forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2),
        (q, k, v), grad_out, dtype=torch.float64)
    for label, x, r in zip(["out", "dq", "dk", "dv"], got, dense):
        assert rel_err(x, r) < 2e-5, f"{impl} {label}: relative error {rel_err(x, r):.2e}"


# ---- attention backends ------------------------------------------------------------------------


def test_backends_are_registered_and_take_config_options():
    assert {"grat_b", "grat_x", "sta"} <= set(BACKENDS)
    b = build_backend("grat_b", 128, 2, 64, radius=[1, 2, 1])  # Hydra gives lists
    assert b.options == (("radius", (1, 2, 1)),) and "radius=(1, 2, 1)" in repr(b)
    assert build_backend("grat_x", 128, 2, 64, lines=True).options == (("lines", True),)
    assert build_backend("sta", 128, 2, 64).block_map(BENCH_LAYOUT)[1].min() == 27
    assert not list(b.parameters())
    with pytest.raises(TypeError, match="bad options"):
        build_backend("grat_b", 128, 2, 64, window=[3, 3, 3])
    with pytest.raises(ValueError, match="radius must be >= 0"):
        build_backend("grat_b", 128, 2, 64, radius=-1)
    with pytest.raises(ValueError, match="impl"):
        build_backend("sta", 128, 2, 64, impl="cuda")


@pytest.mark.parametrize("name,opts", CASES, ids=[c[0] for c in CASES])
def test_backend_equals_the_reference_with_its_map(name, opts):
    backend = build_backend(name, 128, 2, 64, **opts)
    q, k, v = qkv(RAGGED, 2, 2, seed=5)
    out = backend(q, k, v, AttentionContext(RAGGED, sparsity=0.5))  # sparsity is ignored
    idx, cnt = batched(*patterns.build_map(name, RAGGED, **opts), 2, 2)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), RAGGED, idx, cnt)
    assert rel_err(out, ref) < 2e-5


def test_backend_runs_the_triton_kernel(kernel_device):
    layout = TileLayout((6, 5, 8), (4, 4, 4), device=kernel_device)
    backend = build_backend("grat_x", 128, 2, 64, lines=True, impl="triton")
    q, k, v = (x.to(kernel_device) for x in qkv(layout, 1, 2, seed=6))
    with torch.no_grad():
        out = backend(q, k, v, AttentionContext(layout))
    idx, cnt = batched(*patterns.grat_x(TileLayout((6, 5, 8)), lines=True), 1, 2)
    ref = block_sparse_attention_reference(*(x.double().cpu() for x in (q, k, v)), TileLayout((6, 5, 8)), idx, cnt)
    assert rel_err(out.cpu(), ref) < 2e-5


@pytest.mark.parametrize("name,opts", [("grat_b", {}), ("grat_x", {}), ("sta", {"window": [2, 2, 2]})])
def test_static_backends_plug_into_videodit(name, opts):
    torch.manual_seed(0)
    model = randomized(build_model("0.6M", in_channels=4, num_classes=3, tile=(2, 2, 2)))
    x, t, labels = torch.randn(2, 4, 5, 8, 12), torch.rand(2), torch.tensor([0, 2])  # grid 5x4x6: 3x2x3 tiles
    model.eval()
    dense = model(x, t, labels=labels)
    model.set_attention(name, **opts)
    assert type(model.blocks[0].attn.backend) is BACKENDS[name] and model.cfg.attention == name
    out = model(x, t, labels=labels)
    assert (out - dense).abs().max() > 1e-4, "a partial pattern changes the output"
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_full_cover_backend_reproduces_the_full_attention_model():
    torch.manual_seed(0)
    full = randomized(build_model("0.6M", in_channels=4, num_classes=3, tile=(2, 2, 2)))
    x, t, labels = torch.randn(2, 4, 5, 8, 12), torch.rand(2), torch.tensor([1, 2])
    full.eval()
    out_full = full(x, t, labels=labels)
    out_full.square().mean().backward()
    grads_full = {n: p.grad.clone() for n, p in full.named_parameters()}
    full.zero_grad()
    full.set_attention("sta", window=[9, 9, 9])  # the window covers the whole tile grid
    out = full(x, t, labels=labels)
    torch.testing.assert_close(out, out_full, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for n in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "patch_embed.weight"):
        torch.testing.assert_close(full.get_parameter(n).grad, grads_full[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,option", [("grat_b", "radius"), ("grat_x", "lines"), ("sta", "window")])
def test_hydra_attention_configs_build_models(name, option):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.log_dir=/tmp/vsa-patterns-test", f"attention={name}",
                                          "+model.tile=[4,8,8]"])
    assert cfg.attention.name == name and option in cfg.attention.options
    with torch.device("meta"):
        model = instantiate(cfg.model, in_channels=16, _convert_="all")
    assert model.cfg.attention == name and model.cfg.tile == (4, 8, 8)
    assert isinstance(model.blocks[0].attn.backend, BACKENDS[name])


# ---- diffusers processors ----------------------------------------------------------------------


def test_apply_sparse_attention_rejects_other_models():
    from vsa.integrations.diffusers import apply_sparse_attention

    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_sparse_attention(torch.nn.Linear(4, 4), "grat_b")


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=2, rope_max_seq_len=64).eval()


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(16, 24, 24)).eval()


def raster_tile_mask(name, opts, grid, tile) -> torch.Tensor:
    """Token mask [S, S] in RASTER order: token r lies in the tile of its own (t, h, w) coordinates
    (computed here from the grid, independent of TileLayout's permutation)."""
    layout = TileLayout(grid, tile)
    idx, cnt = patterns.build_map(name, layout, **opts)
    tiles = patterns.tile_mask(idx, cnt, layout.n_tiles)
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    nt, nh, nw = layout.tile_grid
    tile_of = ((t // tile[0]) * nh + h // tile[1]) * nw + w // tile[2]
    tile_of = tile_of.reshape(-1)
    return tiles[tile_of][:, tile_of]


class MaskedProcessor:
    """diffusers' own processor with a fixed boolean attention mask (True = attend): the reference."""

    def __init__(self, inner, mask):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, *args, **kwargs)


def wan_inputs(frames, height, width):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, frames, height, width, generator=gen), torch.tensor([500]),
            torch.randn(1, 7, 32, generator=gen))


@needs_diffusers
@pytest.mark.parametrize("mode,opts", [("grat_b", {"radius": 9}), ("sta", {"window": 9}), ("vsa", {"topk": 99})])
def test_wan_full_cover_equals_diffusers_attention(mode, opts):
    from vsa.integrations.diffusers import apply_sparse_attention

    wan = tiny_wan()
    x, t, text = wan_inputs(3, 10, 14)  # token grid 3 x 5 x 7: ragged 2 x 2 x 3 tiles of (2, 4, 4)
    with torch.no_grad():
        ref = wan(x, t, text).sample
        with apply_sparse_attention(wan, mode, tile=(2, 4, 4), **opts) as handle:
            out = wan(x, t, text).sample
            assert handle.grid == (3, 5, 7) and handle.n_modules == 2  # the two blocks' attn1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("name,opts", [("grat_b", {}), ("grat_x", {}), ("grat_x", {"lines": True}),
                                       ("sta", {"window": 2})])
@pytest.mark.parametrize("shape,tile", [((3, 12, 12), (1, 2, 2)), ((3, 10, 14), (2, 2, 3))])
def test_wan_pattern_equals_diffusers_attention_with_the_same_mask(name, opts, shape, tile):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from vsa.integrations.diffusers import apply_sparse_attention

    wan = tiny_wan()
    x, t, text = wan_inputs(*shape)
    grid = (shape[0], shape[1] // 2, shape[2] // 2)
    mask = raster_tile_mask(name, opts, grid, tile)
    assert not bool(mask.all()), "the pattern must be partial for this test to mean anything"
    for block in wan.blocks:
        block.attn1.set_processor(MaskedProcessor(WanAttnProcessor(), mask[None, None]))
    with torch.no_grad():
        ref = wan(x, t, text).sample
        for block in wan.blocks:
            block.attn1.set_processor(WanAttnProcessor())
        dense = wan(x, t, text).sample
        with apply_sparse_attention(wan, name, tile=tile, **opts):
            out = wan(x, t, text).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3 * dense.abs().max()


@needs_diffusers
def test_wan_processor_on_the_triton_kernel(kernel_device):
    from vsa.integrations.diffusers import apply_sparse_attention

    wan = tiny_wan().to(kernel_device)
    x, t, text = (a.to(kernel_device) for a in wan_inputs(2, 16, 16))  # grid 2 x 8 x 8: 4 tiles of (2, 4, 4)
    with torch.no_grad():
        ref = wan(x, t, text).sample
        with apply_sparse_attention(wan, "grat_b", tile=(2, 4, 4), impl="triton", radius=2):
            out = wan(x, t, text).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def flux_inputs(h, w, n_text=5):
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, 4, generator=gen),
                encoder_hidden_states=torch.randn(1, n_text, 32, generator=gen),
                pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([0.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_text, 3))


@needs_diffusers
@pytest.mark.parametrize("mode,opts", [("grat_b", {"radius": 9}), ("vsa", {"topk": 99})])
def test_flux_full_cover_equals_diffusers_joint_attention(mode, opts):
    from vsa.integrations.diffusers import apply_sparse_attention

    flux = tiny_flux()
    inputs = flux_inputs(10, 12)
    with torch.no_grad():
        ref = flux(**inputs).sample
        with apply_sparse_attention(flux, mode, tile=(1, 4, 4), **opts) as handle:  # ragged 3 x 3 tiles
            out = flux(**inputs).sample
            assert handle.grid == (1, 10, 12) and handle.n_modules == 2  # double- and single-stream
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_diffusers
def test_fused_qkv_projections_are_supported():
    from vsa.integrations.diffusers import apply_sparse_attention

    wan, flux = tiny_wan(), tiny_flux()
    x, t, text = wan_inputs(3, 10, 14)
    inputs = flux_inputs(10, 12)
    with torch.no_grad():
        wan_ref, flux_ref = wan(x, t, text).sample, flux(**inputs).sample
        wan.fuse_qkv_projections()
        flux.fuse_qkv_projections()
        assert all(b.attn1.fused_projections for b in wan.blocks)
        with apply_sparse_attention(wan, "grat_b", tile=(2, 4, 4), radius=9):
            torch.testing.assert_close(wan(x, t, text).sample, wan_ref, rtol=1e-5, atol=1e-5)
        with apply_sparse_attention(flux, "grat_b", tile=(1, 4, 4), radius=9):
            torch.testing.assert_close(flux(**inputs).sample, flux_ref, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("name,opts", [("grat_b", {}), ("grat_x", {}), ("sta", {"window": 2})])
def test_flux_pattern_equals_diffusers_joint_attention_with_the_same_mask(name, opts):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from vsa.integrations.diffusers import apply_sparse_attention

    flux = tiny_flux()
    n_text, grid, tile = 5, (1, 12, 14), (1, 4, 4)
    inputs = flux_inputs(*grid[1:], n_text=n_text)
    image = raster_tile_mask(name, opts, grid, tile)
    assert not bool(image.all())
    L, S = n_text, image.shape[0]
    joint = torch.ones(L + S, L + S, dtype=torch.bool)  # text rows: everything; image rows: all text
    joint[L:, L:] = image                                # + the pattern's image tiles
    for m in flux.modules():
        if type(m).__name__ == "FluxAttention":
            m.set_processor(MaskedProcessor(FluxAttnProcessor(), joint[None, None]))
    with torch.no_grad():
        ref = flux(**inputs).sample
        for m in flux.modules():
            if type(m).__name__ == "FluxAttention":
                m.set_processor(FluxAttnProcessor())
        dense = flux(**inputs).sample
        with apply_sparse_attention(flux, name, tile=tile, **opts):
            out = flux(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3 * dense.abs().max()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_joint_text_image_attention_is_exact_with_gradients(impl, kernel_device):
    """The Flux core: text queries dense over all keys; image queries over all text keys plus the
    pattern's image tiles, in one softmax. Forward and gradients against a float64 masked softmax."""
    from vsa.integrations.diffusers import SparseAttentionCore

    device = kernel_device if impl == "triton" else "cpu"
    grid, tile, n_text = (1, 12, 8), (1, 4, 4), 21  # 3 x 2 tiles of 16 tokens; text: 2 chunks, one ragged
    core = SparseAttentionCore("grat_b", tile, grid=grid, impl=impl, radius=(0, 1, 0))
    layout = core.layout(math.prod(grid), torch.device(device))
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n_text + layout.seq_len, 2, 64, generator=gen) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=gen)
    idx, cnt = patterns.grat_b(TileLayout(grid, tile), radius=(0, 1, 0))
    tiles = patterns.tile_mask(idx, cnt, layout.n_tiles)
    tile_ids = layout.tile_ids.cpu()
    mask = torch.ones(n_text + layout.seq_len, n_text + layout.seq_len, dtype=torch.bool)
    mask[n_text:, n_text:] = tiles[tile_ids][:, tile_ids]
    assert not bool(mask.all())
    got = forward_backward(lambda q, k, v: core.attend(q, k, v, layout, n_text), (q, k, v), grad_out,
                           device=device)
    ref = forward_backward(lambda q, k, v: masked_attention_reference(q, k, v, mask[None, None]), (q, k, v),
                           grad_out, dtype=torch.float64)
    for label, x, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert rel_err(x, r) < 2e-5, f"{impl} {label}: relative error {rel_err(x, r):.2e}"


def test_vsa_mode_selects_top_k_tiles_by_coarse_score():
    from vsa.integrations.diffusers import SparseAttentionCore

    layout = TileLayout((9, 6, 7), (4, 4, 4))
    core = SparseAttentionCore("vsa", (4, 4, 4), grid=(9, 6, 7), topk=3)
    q, k, v = qkv(layout, 2, 2, seed=8)
    out = core.attend(q, k, v, layout)
    _, sel = video_sparse_attention_reference(q.double(), k.double(), v.double(), layout, topk=3,
                                              return_selection=True)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, sel,
                                           torch.full(sel.shape[:3], 3))
    assert rel_err(out, ref) < 2e-5


@needs_diffusers
def test_handle_restores_diffusers_and_reports_bad_grids():
    from vsa.integrations.diffusers import apply_sparse_attention, flux_grid

    wan = tiny_wan()
    x, t, text = wan_inputs(2, 8, 8)
    originals = [b.attn1.processor for b in wan.blocks]
    cross = [b.attn2.processor for b in wan.blocks]
    with torch.no_grad():
        ref = wan(x, t, text).sample
        handle = apply_sparse_attention(wan, "grat_b", tile=(1, 2, 2))
        assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in wan.blocks)
        sparse = wan(x, t, text).sample
        handle.remove()
        assert [b.attn1.processor for b in wan.blocks] == originals
        assert [b.attn2.processor for b in wan.blocks] == cross
        assert torch.equal(wan(x, t, text).sample, ref)
        assert not torch.equal(sparse, ref)
        with apply_sparse_attention(wan, "grat_b", tile=(1, 2, 2), grid=(2, 4, 5)):  # wrong fixed grid
            with pytest.raises(ValueError, match="grid"):
                wan(x, t, text)
    ids = flux_inputs(4, 6)["img_ids"]
    assert flux_grid(ids) == (1, 4, 6)
    with pytest.raises(ValueError, match="raster grid"):
        flux_grid(ids[torch.randperm(24, generator=torch.Generator().manual_seed(0))])


# ---- benchmark helpers (CPU parts of scripts/bench_patterns.py) --------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_patterns", REPO / "scripts" / "bench_patterns.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("block", [32, 64])
def test_bench_flex_mask_is_our_tile_map(block):
    from torch.nn.attention.flex_attention import flex_attention

    bench = load_bench()
    layout = TileLayout((8, 8, 16), (2, 4, 8))  # 4 x 2 x 2 full tiles of 64 tokens
    idx, cnt = patterns.grat_b(layout, radius=(1, 0, 1))
    keep = patterns.tile_mask(idx, cnt, layout.n_tiles)
    mask = bench.flex_block_mask(keep, 64, block, layout.seq_len)
    per = 64 // block
    expected = keep.repeat_interleave(per, 0).repeat_interleave(per, 1)
    assert torch.equal(mask.to_dense()[0, 0].bool(), expected)  # the block structure
    q, k, v = qkv(layout, 1, 2, seed=9)
    with warnings.catch_warnings():  # eager FlexAttention on CPU warns that it is unfused
        warnings.simplefilter("ignore")
        flex = flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=mask).transpose(1, 2)
    ours = block_sparse_attention(q, k, v, layout, *batched(idx, cnt, 1, 2))
    assert rel_err(flex, ours) < 1e-5  # the token mask (mask_mod) too
    with pytest.raises(ValueError, match="divide"):
        bench.flex_kv_blocks(keep, 64, 48)


def test_bench_markdown_table_lists_every_row():
    bench = load_bench()
    meta = dict(device="GPU", torch="2.x", triton="3.x", date="today", dtype="bfloat16", shape="1x24x122880x128")
    rows = [dict(pattern="dense", method="SDPA cuDNN (dense)", kept_fraction=1.0, fwd_ms=300.0, fwd_bwd_ms=1100.0,
                 fwd_tflops=600, fwd_bwd_tflops=560, speedup_fwd=1.0, speedup_fwd_bwd=1.0),
            dict(pattern="GRAT-B 3x3x3", method="map build", kept_fraction=0.0428, map_build_ms=1.5,
                 map_lookup_us=3.0, flex_block_mask_ms=4.0, K_max=27),
            dict(pattern="GRAT-B 3x3x3", method="ours (map lookup + kernel)", kept_fraction=0.0428, fwd_ms=15.0,
                 fwd_bwd_ms=60.0, fwd_tflops=500, fwd_bwd_tflops=450, speedup_fwd=20.0, speedup_fwd_bwd=18.3,
                 vs_flex_fwd=1.2, vs_flex_fwd_bwd=1.1),
            dict(pattern="GRAT-B 3x3x3", method="check: ours vs FlexAttention output (bf16)", rel_diff=1e-3),
            dict(pattern="GRAT-B 3x3x3", method="ours / FlexAttention, 3 alternating rounds",
                 ratio_fwd_median=1.3, ratio_fwd_min=1.25, ratio_fwd_max=1.31, ratio_fwd_bwd_median=1.1,
                 ratio_fwd_bwd_min=1.05, ratio_fwd_bwd_max=1.12),
            dict(pattern="GRAT-X planes", method="FlexAttention", kept_fraction=0.34, error="Boom: no kernel")]
    table = bench.markdown_table(rows, meta).splitlines()
    assert len(table) == 4 + len(rows) and table[-1].startswith("| GRAT-X planes")
    assert "20.00x / 18.30x" in table[6] and "1.20x / 1.10x" in table[6] and "error: Boom" in table[-1]
    assert "1.30x (range 1.25-1.31) / 1.10x (range 1.05-1.12)" in table[-2]


def test_bench_alternate_reports_median_round_ratio(monkeypatch):
    """Alternating rounds: ours and FlexAttention timed in turn, forward then forward+backward; the
    ratio is the median of the per-round ratios FlexAttention / ours."""
    bench = load_bench()
    calls, times = [], iter([10.0, 13.0, 40.0, 44.0,  # round 1: fwd ours, flex; fwd+bwd ours, flex
                             10.0, 12.0, 40.0, 48.0,
                             10.0, 14.0, 40.0, 42.0])

    def fake_bench(fn, grad_inputs=None):
        calls.append((fn(), grad_inputs is not None))
        return next(times)

    monkeypatch.setattr(bench, "bench", fake_bench)
    row = bench.alternate(lambda *x: "ours", lambda *x: "flex", (1, 2, 3), rounds=3)
    assert calls[:4] == [("ours", False), ("flex", False), ("ours", True), ("flex", True)]
    assert row["ratio_fwd_median"] == pytest.approx(1.3) and row["ratio_fwd_min"] == pytest.approx(1.2)
    assert row["ratio_fwd_bwd_median"] == pytest.approx(1.1) and row["ratio_fwd_bwd_max"] == pytest.approx(1.2)
    assert row["rounds_fwd_ms"] == [[10.0, 13.0], [10.0, 12.0], [10.0, 14.0]]


def test_batched_map_is_shared_and_lists_prefix_segments_first():
    """`patterns.batched_map`: the [B, H, n, K] copy the kernel reads, cached for the backends and
    the diffusers integration alike; n_prefix lists extra key segments first and shifts the tiles."""
    patterns.clear_cache()
    idx, cnt = patterns.build_map("grat_b", BENCH_LAYOUT)
    b_idx, b_cnt = patterns.batched_map("grat_b", BENCH_LAYOUT, 2, 3)
    assert b_idx.shape == (2, 3, *idx.shape) and b_idx.is_contiguous() and b_idx.dtype == torch.int32
    assert torch.equal(b_idx[1, 2], idx) and torch.equal(b_cnt[0, 1], cnt)
    same = patterns.batched_map("grat_b", TileLayout((29, 41, 77), (4, 8, 8)), 2, 3, radius=[1, 1, 1])
    assert same[0] is b_idx  # same tile grid and options, however spelt: one cached copy
    backend = build_backend("grat_b", 192, 3, 64)
    assert patterns.batched_map(backend.pattern, BENCH_LAYOUT, 2, 3, **dict(backend.options))[0] is b_idx
    p_idx, p_cnt = patterns.batched_map("grat_b", BENCH_LAYOUT, 2, 3, n_prefix=2)
    assert torch.equal(p_cnt, b_cnt + 2)
    assert torch.equal(p_idx[..., :2], torch.tensor([0, 1], dtype=torch.int32).expand(2, 3, idx.shape[0], 2))
    assert torch.equal(p_idx[..., 2:], b_idx + 2)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        patterns.batched_map("grat_b", BENCH_LAYOUT, 1, 1, radius=-1)
    with pytest.raises(ValueError, match="order"):
        patterns.batched_map("grat_b", TileLayout((8, 8, 8), order="curve"), 1, 1)
