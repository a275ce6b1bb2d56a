"""Attention recall (vsa.scaling.recall): the chunked tile-mass computation against a brute-force
float64 softmax, on random q/k and through a tiny model; full selection recalls everything, random
K tiles recall ~K/n; the VSA tiles are the ones `video_sparse_attention` attends; the command line
on a tiny trained run writes recall.json and recall.png, and rejects bad input in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa.attention import AttentionContext
from vsa.diffusion import interpolate, validation_noise
from vsa.layout import TileLayout
from vsa.models import DiTConfig, VideoDiT
from vsa.ops import block_sparse_attention, video_sparse_attention
from vsa.ops.patterns import build_map, tile_mask
from vsa.scaling.recall import (
    attention_inputs,
    attention_recall,
    main,
    parse_pattern,
    recall_from_mass,
    selection_mask,
    tile_attention_mass,
    vsa_selection,
)
from vsa.training import train

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # pytest workers share two cores


def random_qkv(shape, scale=2.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3)]


def brute_force_recall(q, k, layout, tile_keep):
    """Float64 recall [B, H] from the materialised S x S softmax and a tile mask [.., n, n]."""
    q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)  # [B, H, S, D]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    ids = layout.tile_ids
    token_keep = tile_keep[..., ids, :][..., ids]  # [.., S, S]: key j kept for query i
    return (probs * token_keep).sum(-1).mean(-1)


def vsa_mask_by_hand(q, k, layout, topk):
    """The top-K key tiles by coarse score, from tile means computed here (full tiles only)."""
    B, S, H, D = q.shape
    qc = q.double().reshape(B, layout.n_tiles, -1, H, D).mean(2)
    kc = k.double().reshape(B, layout.n_tiles, -1, H, D).mean(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc)
    top = scores.topk(topk, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, top, True)


# ---- the computation on random q, k ------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8, 8), (5, 6, 7)])  # full tiles; ragged edge tiles
def test_recall_matches_brute_force_float64_and_chunks_do_not_matter(grid):
    layout = TileLayout(grid)
    q, k, v = random_qkv((2, layout.seq_len, 2, 64), dtype=torch.float64)
    mass = tile_attention_mass(q, k, layout, chunk=layout.seq_len)
    for chunk in (1, 37, 100):
        torch.testing.assert_close(tile_attention_mass(q, k, layout, chunk), mass, rtol=0, atol=1e-10)
    ctx = AttentionContext(layout=layout)
    for spec in ("sta:window=1x2x2", "grat_b", "grat_x:lines=true", "vsa:topk=3", "random:topk=2"):
        mask = selection_mask(parse_pattern(spec), q, k, v, ctx, torch.Generator().manual_seed(0))
        expected = brute_force_recall(q, k, layout, mask)
        torch.testing.assert_close(recall_from_mass(mass, mask), expected, rtol=0, atol=1e-6)
        # fp32 inputs: the same to fp32 accuracy
        mass32 = tile_attention_mass(q.float(), k.float(), layout, chunk=50)
        torch.testing.assert_close(recall_from_mass(mass32, mask), expected, rtol=0, atol=1e-4)


def test_full_selection_recalls_everything_and_random_k_recalls_k_over_n():
    layout = TileLayout((8, 16, 16))  # 2 x 4 x 4 = 32 tiles
    q, k, v = random_qkv((4, layout.seq_len, 4, 64), scale=3.0)  # peaked attention
    mass = tile_attention_mass(q, k, layout, chunk=512)
    ctx = AttentionContext(layout=layout)
    full = selection_mask(parse_pattern("vsa:topk=32"), q, k, v, ctx)
    assert bool(full.all())
    torch.testing.assert_close(recall_from_mass(mass, full), torch.ones(4, 4, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    mask = selection_mask(parse_pattern("random:topk=8"), q, k, v, ctx, gen)
    assert bool((mask.sum(-1) == 8).all())
    recall = recall_from_mass(mass, mask)
    assert abs(float(recall.mean()) - 8 / 32) < 0.03, recall
    # VSA picks by coarse score: on these inputs the tiles it picks are the brute-force top-K
    # of the tile means, and they hold more mass than random ones.
    vsa = selection_mask(parse_pattern("vsa:topk=8"), q, k, v, ctx)
    assert torch.equal(vsa, vsa_mask_by_hand(q, k, layout, 8))
    assert float(recall_from_mass(mass, vsa).mean()) > float(recall.mean())


def test_vsa_tiles_are_the_ones_the_op_attends():
    """Fine output over our selection == the op's output with the coarse gate at 0 (fine only)."""
    layout = TileLayout((8, 8, 12))  # 2 x 2 x 3 tiles
    q, k, v = random_qkv((2, layout.seq_len, 2, 64))
    idx = vsa_selection(q, k, v, layout, topk=5)
    assert idx.shape == (2, 2, layout.n_tiles, 5)
    fine = block_sparse_attention(q, k, v, layout, idx, torch.full(idx.shape[:3], 5))
    op = video_sparse_attention(q, k, v, layout, topk=5, gate_c=torch.zeros_like(q))
    torch.testing.assert_close(fine, op, rtol=0, atol=1e-6)
    other = block_sparse_attention(q, k, v, layout, idx.flip(-2), torch.full(idx.shape[:3], 5))
    assert not torch.allclose(other, op, atol=1e-3)  # the check can fail


# ---- through a model ---------------------------------------------------------------------------


def tiny_model(attention="vsa") -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(depth=2, width=128, head_dim=64, in_channels=3, out_channels=3,
                               num_classes=4, attention=attention, sparsity=0.75))
    with torch.no_grad():  # leave the zero-initialised identity blocks: attention must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_attention_recall_through_a_model_matches_brute_force():
    model = tiny_model()
    x0 = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1))  # 8x8x8 tokens
    cond = {"labels": torch.tensor([1, 3])}
    result = attention_recall(model, x0, cond, timesteps=[0.25, 0.75],
                              patterns=["vsa", "sta:window=1x2x2", "random"], chunk=100)
    assert result["layers"] == 2 and result["n_tiles"] == 8 and result["topk"]["vsa"] == 2
    # Brute force: capture q, k of every layer on the same inputs, float64 softmax.
    captured = {}
    for index, t in enumerate(result["timesteps"]):
        noise = validation_noise(x0.shape, 0, index)
        tt = torch.full((2,), t)
        with torch.no_grad(), attention_inputs(
                model, lambda layer, q, k, v, ctx: captured.__setitem__((index, layer), (q, k, ctx))):
            model(interpolate(x0, noise, tt), tt, **cond)
    for (index, layer), (q, k, ctx) in captured.items():
        assert ctx.sparsity == 0.75
        vsa = vsa_mask_by_hand(q, k, ctx.layout, 2)
        sta = tile_mask(*build_map("sta", ctx.layout, window=(1, 2, 2)), 8)
        for label, mask in (("vsa", vsa), ("sta:window=1x2x2", sta)):
            expected = brute_force_recall(q, k, ctx.layout, mask).mean(0)  # over clips
            got = torch.tensor(result["recall_per_head"][label][index][layer], dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert result["kept"]["sta:window=1x2x2"][0] == pytest.approx([0.5, 0.5])
    assert result["kept"]["random"][0] == pytest.approx([0.25, 0.25])


# ---- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step tiny VSA run (sparsity 0.5) on 8x32x32 videos (8x16x16 tokens = 32 tiles) with a
    4-clip validation split; train() records its config in <run>/.hydra/config.yaml."""
    tmp = tmp_path_factory.mktemp("recall")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.log_dir={tmp}", f"paths.output_dir={tmp / 'run'}", "experiment=tiny",
            "trainer.max_steps=2", "callbacks.sample_videos=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "data.datamodule.dataset.frames=8",
            "data.datamodule.dataset.height=32", "data.datamodule.dataset.width=32"])
    train(cfg)
    return tmp / "run"


def test_command_line_writes_json_and_plot(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(tiny_run), "--timesteps", "0.2", "0.8", "--patterns", "vsa,sta32,grat_b,random",
                 "--clips", "2", "--chunk", "300", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads((out / "recall.json").read_text())
    assert (out / "recall.png").stat().st_size > 1000
    assert result["n_tiles"] == 32 and result["clips"] == 2 and result["topk"]["vsa"] == 16
    for label in ("vsa", "sta32", "grat_b", "random"):
        values = result["recall"][label]
        assert len(values) == 2 and all(len(row) == 2 and all(0 < v <= 1 + 1e-9 for v in row)
                                        for row in values)
        assert len(result["recall_per_head"][label][0][0]) == 2  # 0.6M: 2 heads of 64
    assert result["kept"]["sta32"][0][0] == pytest.approx(1.0)  # 2x4x4 window = the whole grid
    assert "vsa" in printed.out and "mean" in printed.out and "recall.json" in printed.out
    # The default output folder is the run's recall/.
    assert main([str(tiny_run), "--timesteps", "0.5", "--patterns", "vsa", "--clips", "1"]) == 0
    assert (tiny_run / "recall" / "recall.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "does not exist"),
    (["{notckpt}"], "not a readable checkpoint"),
    (["{run}", "--patterns", "vsa,bogus"], "unknown pattern 'bogus'"),
    (["{run}", "--data-config", "{missing}"], "does not exist"),
])
def test_bad_input_is_one_line_naming_the_fix(tiny_run, tmp_path, capsys, args, words):
    notckpt = tmp_path / "x.ckpt"
    notckpt.write_text("not a checkpoint")
    paths = {"missing": tmp_path / "nope", "notckpt": notckpt, "run": tiny_run}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and words in err
