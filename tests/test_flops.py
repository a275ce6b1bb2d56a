"""The analytic FLOP counter against torch's FlopCounterMode, and the VSA formula by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vsa.models import build_model, preset_config
from vsa.training.flops import forward_flops, training_flops


def measure(model, x, t, backward: bool = False, **cond) -> int:
    """FLOPs that FlopCounterMode sees. On CPU, SDPA's fused kernel is not in its table, so we
    force the math path, which runs attention as two bmm's (QK^T and PV) that it does count."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(x, t, **cond)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 12, 14)])  # 64 tokens; a ragged 5x6x7 grid
def test_forward_matches_flop_counter_class_model(shape):
    model = build_model("0.6M", in_channels=4, num_classes=3)
    x, t = torch.randn(2, 4, *shape), torch.rand(2)
    measured = measure(model, x, t, labels=torch.tensor([0, 2]))
    analytic = forward_flops(model.cfg, shape)
    assert measured == 2 * analytic.forward  # batch of 2
    assert analytic.linear == 2 * analytic.params_per_token * analytic.tokens
    assert analytic.self_attention == 2 * 4 * analytic.tokens ** 2 * 128  # depth 2, width 128


@pytest.mark.parametrize("mlp_conv,taps", [(3, 27), ((3, 5, 5), 75)])
def test_forward_matches_flop_counter_with_mlp_conv(mlp_conv, taps):
    """The MLPs' depthwise token convolution (the default run's mlp_conv=3, or a (t, h, w) kernel)
    is counted."""
    model = build_model("1M", in_channels=12, num_classes=10, mlp_conv=mlp_conv, mlp_ratio=2.0)
    shape = (8, 16, 16)
    x, t = torch.randn(2, 12, *shape), torch.rand(2)
    measured = measure(model, x, t, labels=torch.tensor([0, 2]))
    analytic = forward_flops(model.cfg, shape)
    assert measured == 2 * analytic.forward
    plain = forward_flops(build_model("1M", in_channels=12, num_classes=10, mlp_ratio=2.0).cfg, shape)
    assert analytic.linear - plain.linear == 2 * 512 * 4 * 256 * taps  # tokens, depth, hidden, kernel


def test_forward_matches_flop_counter_text_model():
    model = build_model("2.3M", in_channels=4, patch=(1, 1, 1), text_dim=40)
    shape, text_len = (4, 4, 4), 7
    x, t = torch.randn(3, 4, *shape), torch.rand(3)
    text, mask = torch.randn(3, text_len, 40), torch.rand(3, text_len) > 0.3
    measured = measure(model, x, t, text=text, text_mask=mask)
    analytic = forward_flops(model.cfg, shape, text_len=text_len)
    assert measured == 3 * analytic.forward
    assert analytic.cross_attention == 2 * 4 * 64 * text_len * 256


def test_training_flops_against_flop_counter():
    """Backward = 2 x forward for every matmul, except the input gradient of layers whose input
    needs none (patch embedding, first timestep-MLP layer): autograd skips those, the 3 x
    convention does not. Measured = 3 x forward - those skipped terms, exactly."""
    model = build_model("0.6M", in_channels=4, num_classes=3)
    shape, batch = (4, 8, 8), 2
    x, t = torch.randn(batch, 4, *shape), torch.rand(batch)
    measured = measure(model, x, t, backward=True, labels=torch.tensor([0, 1]))
    cfg = model.cfg
    tokens = math.prod(cfg.token_grid(shape))
    skipped = 2 * tokens * cfg.in_channels * cfg.patch_volume * cfg.width + 2 * 256 * cfg.width
    assert measured == batch * (training_flops(cfg, shape) - skipped)


def test_vsa_formula_by_hand():
    """The paper's setting: 16x32x32 tokens = 256 tiles, 87.5% sparse -> K = 32 key tiles."""
    cfg = preset_config("150M", attention="vsa", sparsity=0.875)
    full = forward_flops(preset_config("150M"), (16, 64, 64))
    vsa = forward_flops(cfg, (16, 64, 64))
    L, d, depth = 16384, 768, 19
    assert vsa.kv_tokens == 32 * 64
    assert vsa.self_attention == depth * (4 * L * 2048 * d + 4 * (L / 64) ** 2 * d)
    assert full.self_attention == depth * 4 * L * L * d
    # the pretrain gates add 2 d^2 weights per token per block
    assert vsa.params_per_token - full.params_per_token == depth * 2 * d * d
    assert vsa.training == 3 * vsa.forward
    assert vsa.forward < full.forward
    # the same numbers when the backend is chosen at call time
    assert forward_flops(preset_config("150M"), (16, 64, 64), attention="vsa") == vsa
    assert training_flops(cfg, (16, 64, 64), attention="full") == full.training


def test_vsa_top_k_resolution():
    cfg = preset_config("0.6M", attention="vsa", attention_options={"gates": "adapt"})
    shape = (8, 16, 16)  # 8x8x8 tokens: 8 tiles
    assert forward_flops(cfg, shape, sparsity=0.0).kv_tokens == 8 * 64
    assert forward_flops(cfg, shape, sparsity=0.5).kv_tokens == 4 * 64
    assert forward_flops(cfg, shape, sparsity=0.99).kv_tokens == 1 * 64  # clamped to >= 1
    assert forward_flops(cfg, shape, sparsity=0.3).kv_tokens == 6 * 64  # ceil(0.7 * 8)
    assert forward_flops(cfg, shape, topk=3, sparsity=0.0).kv_tokens == 3 * 64  # topk wins
    assert forward_flops(cfg, shape, topk=100).kv_tokens == 8 * 64  # capped at n_tiles
    adapt, dense = forward_flops(cfg, shape, sparsity=0.0), forward_flops(preset_config("0.6M"), shape)
    assert adapt.params_per_token - dense.params_per_token == 2 * 128 * 128  # depth 2, G_c only


def test_bad_input():
    with pytest.raises(ValueError, match="not divisible by the patch"):
        forward_flops(preset_config("0.6M"), (4, 9, 8))
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        forward_flops(preset_config("0.6M"), (4, 8, 8), attention="flash")
    with pytest.raises(ValueError, match="sparsity must lie in"):
        forward_flops(preset_config("0.6M", attention="vsa"), (4, 8, 8), sparsity=1.0)
    with pytest.raises(ValueError, match="text_len"):
        forward_flops(preset_config("0.6M", text_dim=8), (4, 8, 8))


def test_static_pattern_flops_use_the_maps_kept_fraction():
    from vsa.layout import TileLayout
    from vsa.ops import patterns

    cfg = preset_config("60M")
    full = forward_flops(cfg, (16, 64, 64), attention="full")
    grat = forward_flops(cfg, (16, 64, 64), attention="grat_b")
    layout = TileLayout(cfg.token_grid((16, 64, 64)), cfg.tile)
    kept = patterns.kept_token_fraction(layout, *patterns.build_map("grat_b", layout))
    assert 0 < kept < 1
    assert grat.self_attention == pytest.approx(full.self_attention * kept)
    assert grat.linear == full.linear  # static patterns add no weights


def test_vsa_flops_count_the_groups_of_the_tile_order():
    """The ragged Wan-480p grid: 624 ragged 4x4x4 cubes, 512 Z-order groups; K follows the count."""
    from vsa.models import DiTConfig

    for order, n_tiles in (("cubes", 624), ("curve", 512)):
        cfg = DiTConfig(depth=1, width=128, head_dim=64, in_channels=4, patch=(1, 1, 1),
                        attention="vsa", sparsity=0.875, tile_order=order)
        count = forward_flops(cfg, (21, 30, 52))
        assert count.kv_tokens == math.ceil(0.125 * n_tiles) * 64
