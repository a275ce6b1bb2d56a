"""Sample-time tile override and scripts/compare_patterns.py: a model trained with 4x4x4 tiles
computes the same function with any tile under full attention (the tile only orders tokens), while
a pattern's groups follow the new tile; the comparison runs end to end on a tiny checkpoint (same
noise for every pattern, finite timings, zero drift of full against itself, the training
validation protocol per pattern) and rejects bad input before it runs anything."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vsa.sampling import model_from_checkpoint, read_checkpoint
from vsa.sampling.compare import compare_patterns, parse_pattern, parse_tile
from vsa.training import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
torch.set_num_threads(1)  # pytest workers share two cores


def train_config(tmp: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[
            f"paths.log_dir={tmp}", f"paths.output_dir={tmp / 'run'}", "experiment=tiny",
            "attention=full", "callbacks.sample_videos=null", "trainer.enable_progress_bar=false",
            *overrides])


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """A 3-step tiny full-attention run with a validation split (4 samples), its weights then
    perturbed so that attention visibly matters; train() saves the training config where Hydra
    would (<run>/.hydra/config.yaml), so compare_patterns finds the validation data."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = train_config(tmp, ["trainer.max_steps=3"])
    train(cfg)
    run = tmp / "run"
    assert (run / ".hydra" / "config.yaml").is_file()  # train() records the config it trained with
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key in ("state_dict", "current_model_state"):
        for value in checkpoint[key].values():
            value.add_(0.1 * torch.randn(value.shape, generator=gen))
    path = run / "checkpoints" / "perturbed.ckpt"
    torch.save(checkpoint, path)
    return path


def model_and_inputs(ckpt: Path):
    model = model_from_checkpoint(read_checkpoint(ckpt))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, 16, generator=gen)  # token grid 4x8x8 (patch 1x2x2)
    return model, (x, torch.tensor([0.3, 0.8]), torch.tensor([1, 7]))


# ---- tile override -------------------------------------------------------------------------------


def test_tile_override_keeps_full_attention_and_regroups_the_patterns(run_checkpoint):
    model, inputs = model_and_inputs(run_checkpoint)
    grid = (4, 8, 8)
    with torch.no_grad():
        ref = model(*inputs)
        for tile in ((4, 8, 8), (3, 5, 3), (1, 1, 1)):  # one tile, ragged tiles, one token per tile
            model.set_tile(tile)
            assert model.cfg.tile == tile and model.geometry(grid, torch.device("cpu"))[0].tile == tile
            torch.testing.assert_close(model(*inputs), ref, atol=1e-5, rtol=1e-5)
        # A pattern's groups follow the tile: GRAT-B (radius 1) on a 1x1x1 tile grid is full
        # attention, on 1x2x2 tiles (4x4x4 of them) it keeps 27 of 64 and changes the output.
        model.set_attention("grat_b")
        model.set_tile((4, 8, 8))
        torch.testing.assert_close(model(*inputs), ref, atol=1e-5, rtol=1e-5)
        model.set_tile([1, 2, 2])
        assert model.geometry(grid, torch.device("cpu"))[0].tile_grid == (4, 4, 4)
        assert (model(*inputs) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("tile", [(4, 8), (4, 8, 8, 1), (0, 4, 4), (4, -1, 4), (4.5, 4, 4),
                                  (True, 4, 4), "448", None, 4, ("a", 4, 4)])
def test_bad_tiles_are_rejected(run_checkpoint, tile):
    model, _ = model_and_inputs(run_checkpoint)
    with pytest.raises(ValueError, match=r"tile must be 3 positive ints \(t, h, w\)"):
        model.set_tile(tile)
    assert model.cfg.tile == (4, 4, 4)  # unchanged


# ---- the comparison ------------------------------------------------------------------------------

PATTERNS = ["full", "full:tile=4x8x8", "grat_b:tile=1x2x2", "grat_x:lines=true:tile=2x4x4",
            "sta:window=2:tile=2x2x2", "vsa@0.5"]


def strict_json(path: Path) -> dict:
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def test_compare_patterns_end_to_end(run_checkpoint, tmp_path):
    report = compare_patterns(run_checkpoint, PATTERNS, num_videos=2, steps=2, warmup=1,
                              forwards=1, out=tmp_path, log=None)
    assert strict_json(tmp_path / "compare_patterns.json") == json.loads(json.dumps(report))
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == PATTERNS and report["reference"] == "full"
    assert report["validation"]["samples"] == 4 and report["validation"]["n_t"] == 2
    for row in rows.values():
        for key in ("attention_ms", "forward_ms", "sampling_s", "val_loss", "attention_speedup",
                    "sampling_speedup", "kept"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["label"], key, row[key])
        assert Path(row["grid"]).is_file()
    full = rows["full"]
    assert full["rel_l2"] == 0 and full["psnr_db"] is None and full["val_loss_delta"] == 0
    assert full["attention_speedup"] == 1 and full["tile"] == [4, 4, 4] and full["kept"] == 1
    # Full attention with other groups: the same videos and loss up to rounding.
    regrouped = rows["full:tile=4x8x8"]
    assert regrouped["tile"] == [4, 8, 8] and regrouped["rel_l2"] < 1e-5
    assert regrouped["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    # GRAT-B on 1x2x2 groups keeps 27 of 64 tiles inside: the videos and the loss move.
    grat_b = rows["grat_b:tile=1x2x2"]
    assert grat_b["tile_grid"] == [4, 4, 4] and grat_b["kept"] < 0.5
    assert 1e-3 < grat_b["rel_l2"] < 10 and 0 < grat_b["psnr_db"] < 100
    assert abs(grat_b["val_loss_delta"]) > 1e-4
    assert rows["vsa@0.5"]["sparsity"] == 0.5 and rows["vsa@0.5"]["kept"] == 0.5
    assert rows["sta:window=2:tile=2x2x2"]["options"] == {"window": [2, 2, 2]}
    table = (tmp_path / "compare_patterns.md").read_text()
    assert "| full | 4x4x4 | 100.0% |" in table and "| 0 | inf |" in table
    assert all(f"| {label} |" in table for label in PATTERNS)


def load_script():
    spec = importlib.util.spec_from_file_location("compare_patterns_script",
                                                  REPO / "scripts" / "compare_patterns.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_runs_and_reports_errors(run_checkpoint, tmp_path, capsys):
    script = load_script()
    code = script.main([str(run_checkpoint), "--patterns", "grat_b", "--tile", "2x4x4", "--no-val",
                        "--num-videos", "1", "--steps", "1", "--warmup", "0", "--forwards", "1",
                        "--cfg-scale", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| full | 2x4x4 | 100.0% |" in out and "| grat_b | 2x4x4 |" in out
    assert "validation loss: not measured" in out
    assert script.main([str(run_checkpoint), "--patterns", "grat_c", "--out", str(tmp_path)]) == 2
    assert "unknown attention 'grat_c'" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("grat_c", "unknown attention 'grat_c'"),
    ("grat_b@0.5", "applies to vsa only"),
    ("grat_b:radius", "options are written key=value"),
    ("grat_b:tile=4x8", "tile must be 3 positive ints"),
    ("grat_b:tile=0x8x8", "tile must be 3 positive ints"),
    ("grat_b:radius=abc", "option radius='abc'"),
    ("vsa@high", "could not convert"),
])
def test_bad_pattern_specs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(text)


def test_pattern_specs_are_read():
    spec = parse_pattern("vsa@0.875:tile=4x8x8", tile="4,4,4")
    assert (spec.name, spec.sparsity, spec.topk, spec.tile) == ("vsa", 0.875, None, (4, 8, 8))
    spec = parse_pattern("grat_x:lines=true", tile=[4, 8, 8])
    assert spec.options == {"lines": True} and spec.tile == (4, 8, 8)
    assert parse_pattern("sta:window=3x5x5").options == {"window": (3, 5, 5)}
    assert parse_pattern("vsa:topk=8").topk == 8 and parse_tile(" 4X8X8 ") == (4, 8, 8)


def test_bad_comparisons_fail_before_running(run_checkpoint, tmp_path):
    def run(patterns, **kwargs):
        kwargs = {"out": tmp_path / "out", "log": None, **kwargs}
        return compare_patterns(kwargs.pop("ckpt", run_checkpoint), patterns, **kwargs)

    with pytest.raises(ValueError, match=r"pattern 'grat_b:radius=-1'.*radius must be >= 0"):
        run(["grat_b:radius=-1"])
    with pytest.raises(ValueError, match=r"pattern 'full:radius=1': bad options"):
        run(["full:radius=1"])
    with pytest.raises(ValueError, match=r"vsa needs a sparsity, e.g. vsa@0.875"):
        run(["vsa"])
    with pytest.raises(ValueError, match="listed twice"):
        run(["full", "grat_b", "grat_b"])
    with pytest.raises(ValueError, match="tile must be 3 positive ints"):
        run(["grat_b"], tile="4x8x0")
    with pytest.raises(ValueError, match=r"labels must be 2 class ids in \[0, 10\)"):
        run(["grat_b"], num_videos=2, labels=[3, 10])
    with pytest.raises(ValueError, match="precision must be"):
        run(["grat_b"], precision="16")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(["grat_b"], ckpt=tmp_path / "missing.ckpt")
    lone = tmp_path / "lone.ckpt"  # no run folder around it: no training config to find
    shutil.copy(run_checkpoint, lone)
    with pytest.raises(FileNotFoundError, match="pass --data-config FILE .* or --no-val"):
        run(["grat_b"], ckpt=lone)
    config = run_checkpoint.parents[1] / ".hydra" / "config.yaml"
    no_val = OmegaConf.load(config)
    no_val.data.datamodule.val_size = 0
    OmegaConf.save(no_val, tmp_path / "no_val.yaml")
    with pytest.raises(ValueError, match="has no validation split"):
        run(["grat_b"], ckpt=lone, data_config=tmp_path / "no_val.yaml")
    other = OmegaConf.load(config)
    other.data.datamodule.dataset.frames = 8
    # a data section alone (resolved: it refers to the root's seed) works too
    OmegaConf.save(OmegaConf.to_container(other.data, resolve=True), tmp_path / "other_data.yaml")
    with pytest.raises(ValueError, match=r"gives inputs \[3, 8, 16, 16\].*trained on \[3, 4, 16, 16\]"):
        run(["grat_b"], ckpt=lone, data_config=tmp_path / "other_data.yaml")
    assert not (tmp_path / "out" / "compare_patterns.json").exists()
