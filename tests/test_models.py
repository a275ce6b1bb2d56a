"""VideoDiT: presets, tile-major token order and RoPE, the attention backends, training, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from compiled_check import assert_compiled_matches_eager

from vsa.attention import AttentionContext, FullAttention, build_backend
from vsa.diffusion import flow_matching_loss
from vsa.layout import TileLayout
from vsa.models import PRESETS, VideoDiT, build_model, preset_params, preset_table, rope_angles
from vsa.models.presets import BACKEND_VARIANTS, load_presets, nominal_params

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def randomized(model: VideoDiT, seed: int = 0, scale: float = 0.1) -> VideoDiT:
    """Perturb every parameter: a fresh model is the identity map to zero (zero-init gates and
    final layer), which would make most comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def tiny(**overrides) -> VideoDiT:
    torch.manual_seed(0)
    return build_model("0.6M", in_channels=4, **overrides)


# ---- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_matches_name(name):
    nominal = nominal_params(name)
    for variant, options in BACKEND_VARIANTS.items():
        n = preset_params(name, **options)
        assert abs(n / nominal - 1) < 0.10, f"{name} with {variant}: {n:,} params"


# The presets as they were defined in Python before they moved into configs/model/*.yaml.
PRESETS_BEFORE_YAML = {
    "0.6M": (2, 128, 64), "1M": (4, 128, 64), "2.3M": (2, 256, 128), "5M": (5, 256, 64),
    "10M": (7, 320, 64), "20M": (10, 384, 64), "60M": (17, 512, 64), "150M": (19, 768, 64),
    "300M": (28, 896, 64), "600M": (34, 1152, 64), "1.4B": (33, 1792, 128),
}


def test_presets_are_read_from_the_model_config_group_with_the_same_numbers():
    assert {name: (a["depth"], a["width"], a["head_dim"]) for name, a in PRESETS.items()} == PRESETS_BEFORE_YAML
    assert list(PRESETS) == list(PRESETS_BEFORE_YAML)  # smallest first
    # the parameter counts of docs/models.md (the table is regenerated from these files)
    assert preset_params("60M", attention="full") == 55_647_424


@pytest.mark.parametrize("text, message", [
    ("name: 7M\ndepth: 2\nwidth: 100\nhead_dim: 64\n", "not a multiple of head_dim"),
    ("name: 7M\ndepth: two\nwidth: 128\nhead_dim: 64\n", "`depth` must be a positive int"),
    ("name: big\ndepth: 2\nwidth: 128\nhead_dim: 64\n", "`name` must be a parameter count"),
    ("name: 7M\nwidth: 128\nhead_dim: 64\n", "`depth` must be a positive int, got None"),
])
def test_a_broken_preset_file_is_named_with_the_problem(tmp_path, text, message):
    (tmp_path / "7m.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_presets(tmp_path)
    assert "7m.yaml" in str(info.value)
    (tmp_path / "7m.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="configs/model"):
        load_presets(tmp_path)


def test_preset_table_is_in_docs():
    assert preset_table() in DOCS.read_text(), "regenerate docs/models.md from preset_table()"


def test_fresh_model_is_identity_blocks_and_zero_output():
    model = tiny(num_classes=3)
    x = torch.randn(2, 4, 4, 8, 8)
    assert torch.equal(model(x, torch.rand(2), labels=torch.tensor([0, 1])), torch.zeros_like(x))
    for block in model.blocks:
        assert not block.modulation.any()


# ---- token order and RoPE ----------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 8, 8), (8, 8, 8), (5, 6, 7), (1, 3, 9), (2, 2, 2)])
def test_tile_order_roundtrip_is_identity(grid):
    layout = TileLayout(grid)
    x = torch.randn(2, layout.seq_len, 3)
    tiles = layout.to_tiles(x, dim=1)
    assert torch.equal(layout.from_tiles(tiles, dim=1), x)
    assert sorted(layout.perm.tolist()) == list(range(layout.seq_len))


def test_patchify_roundtrip_is_identity():
    model = tiny(patch=(1, 2, 2))
    x = torch.randn(2, 4, 5, 6, 14)
    assert torch.equal(model.unpatchify(model.patchify(x), (5, 3, 7)), x)


def test_rope_angles_follow_tokens():
    model = tiny()
    grid = (5, 6, 7)
    layout, cos, _ = model.geometry(grid, torch.device("cpu"))
    raster = rope_angles(grid, 64)
    assert torch.equal(cos, layout.to_tiles(raster, dim=0).cos())
    # token i of tile order sits at raster position perm[i]: t = perm // (H*W), etc.
    pos = layout.perm[10].item()
    t, h, w = pos // 42, (pos // 7) % 6, pos % 7
    assert torch.allclose(raster[pos, 0], torch.tensor(float(t)))  # first t pair: freq 1
    assert torch.allclose(raster[pos, 12], torch.tensor(float(h)))  # first h pair
    assert torch.allclose(raster[pos, 22], torch.tensor(float(w)))  # first w pair


@pytest.mark.parametrize("shape", [(4, 16, 16), (5, 12, 14)])  # token grids 4x8x8, ragged 5x6x7
def test_tile_major_model_equals_raster_model(shape):
    """With full attention the network is order-agnostic once RoPE follows the tokens: a model
    processing tile-major tokens equals one with 1x1x1 tiles (raster order), same weights."""
    tiled = randomized(tiny(num_classes=3))
    raster = copy.deepcopy(tiled)
    raster.cfg.tile = (1, 1, 1)  # one token per tile: tile-major order is raster order
    x, t, labels = torch.randn(2, 4, *shape), torch.rand(2), torch.tensor([1, 2])
    tiled.eval(), raster.eval()
    grid = tiled.cfg.token_grid(shape)
    identity = torch.arange(grid[0] * grid[1] * grid[2])
    assert not torch.equal(tiled.geometry(grid, x.device)[0].perm, identity)
    assert torch.equal(raster.geometry(grid, x.device)[0].perm, identity)
    out = tiled(x, t, labels=labels)
    torch.testing.assert_close(out, raster(x, t, labels=labels), rtol=1e-5, atol=1e-5)
    # Negative control: tile-major tokens with raster-order RoPE give a different function.
    layout, cos, sin = tiled.geometry(grid, x.device)
    raw = rope_angles(grid, 64)
    tiled._geometry[(grid, "cpu")] = (layout, raw.cos(), raw.sin())
    assert (tiled(x, t, labels=labels) - out).abs().max() > 1e-3


# ---- attention backends ------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["0.6M", "2.3M"])  # head dim 64 and 128
@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 12, 14)])  # 1 tile; 8 ragged tiles
def test_vsa_adapt_at_sparsity_zero_equals_full(preset, shape):
    torch.manual_seed(0)
    full = randomized(build_model(preset, in_channels=4, num_classes=3))
    vsa = build_model(preset, in_channels=4, num_classes=3, attention="vsa",
                      attention_options={"gates": "adapt"}, sparsity=0.0)
    missing, unexpected = vsa.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("gate_proj.weight", "gate_proj.bias")) for k in missing)
    x, t, labels = torch.randn(2, 4, *shape), torch.rand(2), torch.tensor([0, 2])
    full.eval(), vsa.eval()
    out_full, out_vsa = full(x, t, labels=labels), vsa(x, t, labels=labels)
    torch.testing.assert_close(out_vsa, out_full, rtol=1e-5, atol=1e-5)
    # ... and so are the gradients of the shared weights (the CPU path is differentiable).
    out_full.square().mean().backward()
    out_vsa.square().mean().backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "patch_embed.weight"):
        g_full = full.get_parameter(name).grad
        torch.testing.assert_close(vsa.get_parameter(name).grad, g_full, rtol=1e-4, atol=1e-6)


def test_sparsity_is_read_from_the_model_each_call():
    full = randomized(tiny(num_classes=3))
    vsa = copy.deepcopy(full)
    vsa.set_attention("vsa", gates="adapt")
    x, t, labels = torch.randn(1, 4, 8, 16, 16), torch.rand(1), torch.tensor([1])  # 8 tiles
    full.eval(), vsa.eval()
    ref = full(x, t, labels=labels)
    vsa.sparsity = 0.0
    torch.testing.assert_close(vsa(x, t, labels=labels), ref, rtol=1e-5, atol=1e-5)
    vsa.sparsity = 0.75  # a schedule stepping the sparsity up
    assert (vsa(x, t, labels=labels) - ref).abs().max() > 1e-4
    vsa.topk = 8  # all 8 tiles: dense again, top-k overrides the sparsity
    torch.testing.assert_close(vsa(x, t, labels=labels), ref, rtol=1e-5, atol=1e-5)


def test_vsa_pretrain_gates_train():
    model = tiny(attention="vsa", sparsity=0.5)
    gate = model.blocks[0].attn.backend.gate_proj
    assert torch.equal(gate.bias, torch.cat([torch.zeros(128), torch.ones(128)]))  # G_c 0, G_f 1
    randomized(model)
    x = torch.randn(2, 4, 8, 16, 16)
    loss = flow_matching_loss(model, x, torch.rand(2))
    loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gates", ["pretrain", "adapt"])
def test_vsa_gate_projection_in_the_qkv_matmul_equals_its_own(gates, monkeypatch):
    """The block computes VSA's gate projection in its qkv matmul (stacked weights, ctx.x_proj);
    outputs and every gradient equal the backend projecting ctx.x_norm itself (the VSA op runs in
    float32: the two differ only in the matmul's rounding)."""
    def run(fused: bool):
        model = randomized(tiny(attention="vsa", sparsity=0.5, num_classes=4,
                                    attention_options={"gates": gates}))
        if not fused:
            for block in model.blocks:
                monkeypatch.setattr(block.attn.backend, "input_projection", lambda: None)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 8, 16, 16, generator=gen)
        out = model(x, torch.tensor([0.3, 0.8]), labels=torch.tensor([1, 2]))
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    out_sep, grads_sep = run(fused=False)
    out, grads = run(fused=True)
    torch.testing.assert_close(out, out_sep, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_sep.keys()
    for name, grad in grads.items():  # float32 rounding of accumulated gradients, relative to each
        error = (grad - grads_sep[name]).norm() / grads_sep[name].norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
    assert grads["blocks.0.attn.backend.gate_proj.weight"].abs().sum() > 0


def test_full_backend_matches_explicit_softmax():
    backend = build_backend("full", width=128, n_heads=2, head_dim=64)
    layout = TileLayout((2, 4, 4))
    q, k, v = (torch.randn(2, 32, 2, 64) for _ in range(3))
    scores = torch.einsum("bshd,bthd->bhst", q, k) / 8.0
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    torch.testing.assert_close(backend(q, k, v, AttentionContext(layout)), expected)
    assert isinstance(backend, FullAttention)


# ---- training ----------------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("0.6M", in_channels=4, num_classes=4, cond_dropout=0.0)
    x0 = torch.randn(4, 4, 4, 8, 8)
    noise, t, labels = torch.randn_like(x0), torch.rand(4), torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = flow_matching_loss(model, x0, t, noise, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f}")


def test_label_dropout_only_in_training():
    model = randomized(tiny(num_classes=3, cond_dropout=0.999))
    x, t, labels = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    model.eval()
    null = model(x, t, **model.null_condition({"labels": labels}))
    assert torch.equal(null, model(x, t))  # no labels = the null class
    assert (model(x, t, labels=labels) - null).abs().max() > 1e-4
    model.train()
    torch.manual_seed(0)
    torch.testing.assert_close(model(x, t, labels=labels), null)  # (almost) always dropped


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match=r"not divisible by the patch \(1, 2, 2\)"):
        model(torch.randn(1, 4, 4, 9, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"head_dim 96 is not supported; use one of \(64, 128\)"):
        build_model("0.6M", head_dim=96, width=192)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        build_model("0.6M", width=100)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; known backends: "
                                         r"\['full', 'grat_b', 'grat_x', 'sta', 'vsa'\]"):
        build_model("0.6M", attention="flash")
    with pytest.raises(ValueError, match="unknown VSA gate variant"):
        build_model("0.6M", attention="vsa", attention_options={"gates": "sigmoid"})
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model("huge")
    with pytest.raises(ValueError, match=r"x must be \[B, C=4"):
        model(torch.randn(1, 3, 4, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="sparsity must lie in"):
        model.sparsity = 1.0
    text_model = tiny(text_dim=32)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.rand(1)
    with pytest.raises(ValueError, match=r"text must be \[B=1, L, text_dim=32\]"):
        text_model(x, t, text=torch.randn(1, 5, 48))
    with pytest.raises(ValueError, match="needs|cross-attends"):
        text_model(x, t)
    with pytest.raises(ValueError, match="not both"):
        tiny(text_dim=32, num_classes=3)
    with pytest.raises(ValueError, match="no class embedding"):
        tiny()(x, t, labels=torch.tensor([0]))


def test_text_conditioning_runs_and_masks():
    model = randomized(tiny(text_dim=32))
    model.eval()
    x, t = torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    text = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = model(x, t, text=text, text_mask=mask)
    # masked-out text tokens do not matter
    text2 = text.clone()
    text2[0, 4:] = 100.0
    torch.testing.assert_close(model(x, t, text=text2, text_mask=mask), out)
    null = model.null_condition({"text": text, "text_mask": mask})
    assert not null["text"].any() and null["text_mask"].all()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model("0.6M", in_channels=4, num_classes=3, attention="vsa", sparsity=0.5)
    ckpt = build_model("0.6M", in_channels=4, num_classes=3, attention="vsa", sparsity=0.5,
                       activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, labels = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)  # same label dropout draws
        model(x, t, labels=labels).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpointing_a_number_of_blocks_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = dict(in_channels=4, attention="full", depth=3)
    plain = build_model("0.6M", **cfg)
    some = build_model("0.6M", **cfg, activation_checkpointing=2)
    assert some.cfg.checkpointed_blocks == 2 and plain.cfg.checkpointed_blocks == 0
    assert build_model("0.6M", **cfg, activation_checkpointing=True).cfg.checkpointed_blocks == 3
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1)
    some.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    for model in (plain, some):
        model.train()
        model(x, t).square().mean().backward()
    for a, b in zip(plain.parameters(), some.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        build_model("0.6M", activation_checkpointing=-1)


@pytest.mark.slow
@pytest.mark.parametrize("attention,options,mlp_conv", [("vsa", {}, 3), ("sta", {"window": (2, 2, 2)}, 0)])
def test_compiled_blocks_compute_the_same_function(attention, options, mlp_conv):
    """compile_blocks (fullgraph: no graph break in a block, through the VSA custom op, the MLP's
    token convolution with its own CPU backward, and a static pattern's map built outside the
    blocks) keeps the outputs, the gradients and the state dict's names."""
    torch.manual_seed(0)
    kw = dict(in_channels=4, num_classes=3, attention=attention, attention_options=options, sparsity=0.5,
              mlp_conv=mlp_conv)
    eager = build_model("0.6M", **kw)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.1)
    compiled = build_model("0.6M", **kw)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    x, t, labels = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    assert_compiled_matches_eager(eager, compiled, lambda model: model(x, t, labels=labels))


def test_x0_prediction_returns_the_velocity_of_the_predicted_x0():
    """prediction="x0": the same weights as a velocity model, whose output is now read as x0;
    forward returns v = (x_t - x0) / max(t, 0.05), for every sample's own t."""
    from vsa.models.config import X0_MIN_T

    velocity = randomized(tiny(num_classes=3))
    x0_model = tiny(num_classes=3, prediction="x0")
    x0_model.load_state_dict(velocity.state_dict())
    x, labels = torch.randn(4, 4, 4, 8, 8), torch.tensor([0, 1, 2, 0])
    t = torch.tensor([1.0, 0.5, 0.05, 0.01])
    velocity.eval(), x0_model.eval()
    x0 = velocity(x, t, labels=labels)
    expected = (x - x0) / torch.tensor([1.0, 0.5, X0_MIN_T, X0_MIN_T]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x0_model(x, t, labels=labels), expected)


@pytest.mark.parametrize("kw,message", [({"prediction": "eps"}, "prediction must be one of"),
                                        ({"prediction": "x0", "out_channels": 8}, "out_channels")])
def test_bad_prediction_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_full_attention_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="kernel"):
        build_model("0.6M", attention="full", attention_options={"kernel": "fa9"})


def test_curve_tile_order_keeps_full_attention_and_trains_vsa():
    """Token order does not change dense attention; VSA runs on Z-order groups (ragged grid)."""
    torch.manual_seed(0)
    cubes = build_model("0.6M", in_channels=4, attention="full")
    with torch.no_grad():
        for p in cubes.parameters():
            p.normal_(0, 0.1)
    curve = build_model("0.6M", in_channels=4, attention="full", tile_order="curve")
    curve.load_state_dict(cubes.state_dict())
    x, t = torch.randn(2, 4, 5, 14, 18), torch.rand(2)
    torch.testing.assert_close(curve(x, t), cubes(x, t), rtol=1e-4, atol=1e-5)
    vsa = build_model("0.6M", in_channels=4, attention="vsa", sparsity=0.5, tile_order="curve")
    layout = vsa.geometry(vsa.cfg.token_grid(x.shape[2:]), x.device)[0]
    assert layout.order == "curve" and layout.n_tiles == 5  # 5x7x9 = 315 tokens
    vsa(x, t).square().mean().backward()
    with pytest.raises(ValueError, match="tile_order"):
        build_model("0.6M", tile_order="zigzag")


# ---- token convolution in the MLP (mlp_conv) ---------------------------------------------------

def test_mlp_conv_starts_at_zero_and_then_computes_the_plain_model():
    """A new model with mlp_conv computes what the same weights compute without it (the conv starts
    at zero), yet its conv weights get gradients."""
    plain, conv = randomized(tiny(num_classes=3)), tiny(num_classes=3, mlp_conv=3)
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".mlp.conv." in k for k in missing)
    x, t, labels = torch.randn(2, 4, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])
    plain.eval(), conv.eval()
    torch.testing.assert_close(conv(x, t, labels=labels), plain(x, t, labels=labels))
    conv(x, t, labels=labels).square().mean().backward()
    assert all(block.mlp.conv.weight.grad.abs().sum() > 0 for block in conv.blocks)


@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 6, 7)])
def test_mlp_conv_mixes_exactly_the_neighbours_on_the_token_grid(grid):
    """Through the tile-major order, the convolution of token (t, h, w) reads the 3x3x3 tokens
    around it on the grid and nothing else (one MLP, random weights)."""
    from vsa.models.dit import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 32, conv=(3, 3, 3))
    torch.nn.init.normal_(mlp.conv.weight)
    layout = TileLayout(grid, (4, 4, 4))
    T, H, W = grid
    x = torch.randn(1, T * H * W, 16, requires_grad=True)
    centre = (T // 2, H // 2, W // 2)
    raster_index = (centre[0] * H + centre[1]) * W + centre[2]
    tile_index = int((layout.perm == raster_index).nonzero())  # its position in tile order
    mlp(x, layout)[0, tile_index].sum().backward()
    touched = layout.from_tiles(x.grad.abs().sum(-1) > 0, dim=1).reshape(T, H, W)
    expected = torch.zeros(T, H, W, dtype=torch.bool)
    expected[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2, centre[2] - 1:centre[2] + 2] = True
    assert torch.equal(touched, expected)


def test_mlp_conv_model_is_order_agnostic():
    """With full attention and the token convolution, tile-major and raster order give one function."""
    tiled = randomized(tiny(num_classes=3, attention="full", mlp_conv=3))
    raster = copy.deepcopy(tiled)
    raster.cfg.tile = (1, 1, 1)
    x, t, labels = torch.randn(2, 4, 5, 12, 14), torch.rand(2), torch.tensor([1, 2])
    tiled.eval(), raster.eval()
    torch.testing.assert_close(tiled(x, t, labels=labels), raster(x, t, labels=labels),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,bias,channels_last", [
    ((2, 6, 3, 5, 7), 3, True, True),     # batch 2, a ragged grid, the MLP's strides
    ((1, 4, 2, 3, 4), 5, False, False),   # fewer frames than the kernel, no bias
    ((3, 5, 4, 4, 4), 1, True, False),    # a 1x1x1 kernel
    ((2, 6, 3, 5, 7), (3, 5, 1), True, True),  # a (t, h, w) kernel
])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_depthwise_conv3d_matches_torch_conv3d_forward_and_gradients(shape, kernel, bias,
                                                                     channels_last, scale):
    """The CPU backward of DepthwiseConv3d (its own, not torch's) gives torch's conv3d gradients
    in float64, for the input, the weight and the bias; its state dict is nn.Conv3d's."""
    from vsa.models.conv import DepthwiseConv3d

    torch.manual_seed(sum(shape))
    conv = DepthwiseConv3d(shape[1], kernel, bias=bias).double()
    torch.nn.init.normal_(conv.weight)
    assert list(conv.state_dict()) == list(torch.nn.Conv3d(shape[1], shape[1], kernel, bias=bias).state_dict())
    x = torch.randn(shape, dtype=torch.float64) * scale
    if channels_last:
        x = x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = conv(x)
    pad = tuple(k // 2 for k in conv.kernel_size)
    y_ref = torch.nn.functional.conv3d(x_ref, conv.weight, conv.bias, padding=pad, groups=shape[1])
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, conv.weight] + ([conv.bias] if bias else []), g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, conv.weight] + ([conv.bias] if bias else []), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_depthwise_conv3d_under_cpu_autocast_is_torchs_conv3d():
    """bf16 autocast on the CPU (trainer.precision=bf16-mixed) takes torch's own backward."""
    from vsa.models.conv import DepthwiseConv3d

    conv = DepthwiseConv3d(8, 3)
    x = torch.randn(2, 8, 3, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        y_ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1, groups=8)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    grads = torch.autograd.grad(y.float().sum(), [x, conv.weight])
    grads_ref = torch.autograd.grad(y_ref.float().sum(), [x, conv.weight])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_depthwise_conv3d_refuses_even_kernels():
    from vsa.models.conv import DepthwiseConv3d

    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(4, 2)


@pytest.mark.parametrize("bad", [2, -1, True, 3.0, "3", [3, 4, 5], [3, 5]])
def test_mlp_conv_rejects_bad_kernels(bad):
    with pytest.raises(ValueError, match="mlp_conv must be"):
        tiny(mlp_conv=bad)


def test_mlp_conv_takes_a_t_h_w_kernel():
    from vsa.models.conv import DepthwiseConv3d

    model = tiny(mlp_conv=[3, 5, 1])
    assert model.cfg.mlp_conv == (3, 5, 1)
    assert all(block.mlp.conv.kernel_size == (3, 5, 1) for block in model.blocks)
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(4, (3, 2, 3))


def test_a_model_with_a_caption_vocabulary_embeds_its_captions():
    words = ["a", "red", "blue", "circle", "moves", "left"]
    model = build_model("0.6M", in_channels=3, num_classes=0, text_dim=32, caption_words=words)
    text, mask = model.embed_captions(["a red circle moves left", "A BLUE circle"])
    assert text.shape == (2, 5, 32) and mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(text[0, 0], text[1, 0]) and not torch.equal(text[0, 1], text[1, 1])
    assert torch.equal(text[1, 3:], torch.zeros(2, 32))  # padding
    out = model(torch.randn(2, 3, 4, 8, 8), torch.rand(2), text=text, text_mask=mask)
    assert out.shape == (2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"caption words \['green'\] are not in the model's vocabulary"):
        model.embed_captions(["a green circle"])
    with pytest.raises(ValueError, match="captions must be a non-empty list of strings"):
        model.embed_captions("a red circle")
    with pytest.raises(ValueError, match="caption_words needs text_dim > 0"):
        build_model("0.6M", num_classes=0, caption_words=words)
    with pytest.raises(ValueError, match="lower-case words without spaces"):
        build_model("0.6M", num_classes=0, text_dim=32, caption_words=["Red"])
    with pytest.raises(ValueError, match="no caption vocabulary"):
        build_model("0.6M", num_classes=0, text_dim=32).embed_captions(["a"])


def test_qk_norm_takes_bf16_without_the_unfused_fallback():
    """Under bf16 autocast q/k arrive in bf16: the norm casts its weight to them, so torch's fused
    RMSNorm runs (nn.RMSNorm with an fp32 weight warns and falls back at every call)."""
    import warnings

    from vsa.models.dit import QKNorm

    norm = QKNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    assert list(norm.state_dict()) == list(torch.nn.RMSNorm(64).state_dict())
    x = torch.randn(2, 8, 4, 64) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.rms_norm(x.double(), (64,), norm.weight.double(), 1e-6)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-2
    plain = torch.nn.RMSNorm(64, eps=1e-6)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)  # fp32: exactly nn.RMSNorm
