"""Sampling: sample.py on a tiny checkpoint writes mp4s and a grid; the attention backend can be
swapped at sampling time (dense -> VSA at sparsity 0 gives the same videos), and so can the tile
(full attention: the same videos); EMA or raw weights; bad input fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa.checkpoint import CHECKPOINT_KEY
from vsa.sampling import sample
from vsa.training import ConfigError, train

av = pytest.importorskip("av")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
torch.set_num_threads(1)  # two pytest workers share two cores


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    """A 3-step tiny dense (full attention) run with EMA, its weights then perturbed so that
    attention visibly matters (a model this young is close to its zero-output init)."""
    tmp = tmp_path_factory.mktemp("dense")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.log_dir={tmp}", f"paths.output_dir={tmp / 'run'}", "experiment=tiny",
            "attention=full", "trainer.max_steps=3", "data.datamodule.val_size=0",
            "callbacks.sample_videos=null", "trainer.enable_progress_bar=false"])
    train(cfg)
    checkpoint = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights, perturbed differently
        for value in checkpoint[key].values():
            value.add_(0.1 * torch.randn(value.shape, generator=gen))
    path = tmp / "perturbed.ckpt"
    torch.save(checkpoint, path)
    return path


def sample_cfg(ckpt: Path, out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("sample", overrides=[f"ckpt_path={ckpt}", f"output_dir={out}",
                                            "paths.log_dir=/unused", "paths.output_dir=/unused",
                                            "num_videos=2", "steps=3", *overrides])


def test_sample_py_writes_mp4_and_grid(dense_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, "sample.py", f"ckpt_path={dense_checkpoint}", "num_videos=2", "steps=2",
         "method=heun", f"paths.log_dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "s per video" in result.stdout and "heun x2" in result.stderr  # timing + progress bar
    (out,) = (tmp_path / "sample").iterdir()
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix != ".log") == \
        ["grid.png", "latents.pt", "video_00.mp4", "video_01.mp4"]
    with av.open(str(out / "video_00.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)  # tiny: 3x4x16x16 videos
    from matplotlib.image import imread
    grid = imread(out / "grid.png")
    assert grid.shape[:2] == (2 * 16 + 2, 4 * 16 + 3 * 2)  # 2 videos x 4 frames, 2-pixel gaps


def test_dense_model_sampled_with_vsa_at_sparsity_0_gives_the_same_videos(dense_checkpoint, tmp_path):
    dense = sample(sample_cfg(dense_checkpoint, tmp_path / "dense", []))
    vsa0 = sample(sample_cfg(dense_checkpoint, tmp_path / "vsa0", ["attention=vsa", "sparsity=0"]))
    vsa5 = sample(sample_cfg(dense_checkpoint, tmp_path / "vsa5", ["attention=vsa", "sparsity=0.5"]))
    a, b, c = (torch.load(r["latents"], weights_only=True) for r in (dense, vsa0, vsa5))
    assert a.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (c - a).abs().max() > 1e-3  # sparsity matters for this model: the match is not vacuous
    assert all(Path(p).stat().st_size > 0 for r in (dense, vsa0) for p in r["videos"])


def test_ema_or_raw_weights_and_seeds(dense_checkpoint, tmp_path):
    ema = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "e", []))["latents"])
    raw = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "r", ["ema=false"]))["latents"])
    again = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "a", []))["latents"])
    other = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "o", ["seed=1"]))["latents"])
    assert torch.equal(ema, again)
    assert (ema - raw).abs().max() > 1e-3 and (ema - other).abs().max() > 1e-3


def test_guidance_interval_through_sample_py(dense_checkpoint, tmp_path):
    every = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "a", []))["latents"])
    whole = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "b", ["cfg_interval=[0,1]"]))["latents"])
    early = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "c", ["cfg_interval=[0.5,1]"]))["latents"])
    torch.testing.assert_close(whole, every)  # [0, 1] guides every step
    assert (early - every).abs().max() > 1e-3  # unguided low-noise steps change the videos
    with pytest.raises(ConfigError, match=r"sampling: cfg_interval must satisfy 0 <= t_lo <= t_hi <= 1"):
        sample(sample_cfg(dense_checkpoint, tmp_path, ["cfg_interval=[0.8,0.2]"]))


def test_bad_sampling_input_fails_clearly(dense_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"sparsity: sparsity must lie in \[0, 1\)"):
        sample(sample_cfg(dense_checkpoint, tmp_path, ["attention=vsa", "sparsity=1.0"]))
    with pytest.raises(ConfigError, match=r"ckpt_path: checkpoint .*missing.ckpt does not exist"):
        sample(sample_cfg(tmp_path / "missing.ckpt", tmp_path, []))
    with pytest.raises(ConfigError, match=r"labels must be 2 class ids in \[0, 10\)"):
        sample(sample_cfg(dense_checkpoint, tmp_path, ["labels=[3,12]"]))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("sample", overrides=["paths.output_dir=/unused"])
    with pytest.raises(ConfigError, match="missing mandatory value"):
        sample(cfg)


def test_tile_override_regroups_tokens_without_changing_full_attention(dense_checkpoint, tmp_path, capsys):
    base = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "a", []))["latents"])
    regrouped = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "b", ["tile=[4,8,8]"]))["latents"])
    assert "full, tile 4x8x8" in capsys.readouterr().out
    torch.testing.assert_close(regrouped, base, atol=1e-5, rtol=1e-5)  # order-invariant
    grat = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "c",
                                        ["attention=grat_b", "tile=[1,2,2]"]))["latents"])
    assert "grat_b, tile 1x2x2" in capsys.readouterr().out
    assert (grat - base).abs().max() > 1e-3  # 27 of 64 groups of 1x2x2 tokens: the videos move
    with pytest.raises(ConfigError, match=r"tile: tile must be 3 positive ints \(t, h, w\)"):
        sample(sample_cfg(dense_checkpoint, tmp_path, ["tile=[4,0,4]"]))
    with pytest.raises(ConfigError, match=r"tile: tile must be 3 positive ints"):
        sample(sample_cfg(dense_checkpoint, tmp_path, ["tile=[4,8]"]))


def test_checkpoint_arguments_give_one_line_each(dense_checkpoint, tmp_path):
    """A run folder means its checkpoints/last.ckpt; a file that is no checkpoint (random bytes, a
    PNG) or a missing one gives one line naming the file, and never advises weights_only=False;
    a bad cfg_scale is refused before the checkpoint is read; failures create no output folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(dense_checkpoint.read_bytes())
    assert sample(sample_cfg(run, tmp_path / "from_folder", []))["latents"].is_file()

    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(512))
    for bad in ("noise.ckpt", "image.png"):
        with pytest.raises(ConfigError, match=rf"ckpt_path: .*{bad} is not a readable checkpoint") as err:
            sample(sample_cfg(tmp_path / bad, tmp_path / "out", []))
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match=r"empty_run holds no checkpoints/last.ckpt"):
        sample(sample_cfg(tmp_path / "empty_run", tmp_path / "out", []))
    with pytest.raises(ConfigError, match=r"sampling: cfg_scale must be a number >= 0 .*got -5"):
        sample(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "out", ["cfg_scale=-5"]))
    with pytest.raises(ConfigError, match=r"sampling: seed must be an integer, got 'abc'"):
        sample(sample_cfg(dense_checkpoint, tmp_path / "out", ["seed=abc"]))
    assert not (tmp_path / "out").exists()

    result = subprocess.run(
        [sys.executable, "sample.py", f"ckpt_path={tmp_path / 'image.png'}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "image.png is not a readable checkpoint" in result.stderr
    assert not (tmp_path / "logs").exists()  # no empty logs/sample/<time>/ after a failure


def test_text_to_video_demo_trains_on_captions_and_samples_from_prompts(tmp_path):
    """experiment=t2v_shapes (captions, a model with its own caption vocabulary), a few steps; then
    sample.py with prompt= and prompts_file=: the prompts condition the videos (other prompts,
    other videos; the same prompt, the same videos), and an unknown word is one clear line."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", "experiment=t2v_shapes",
            "trainer.max_steps=3", "data.datamodule.val_size=4", "trainer.val_check_interval=3",
            "logger=csv", "trainer.enable_progress_bar=false", "callbacks.sample_videos.every_n_steps=3",
            "callbacks.sample_videos.steps=2", "callbacks.prompt_following.every_n_steps=3",
            "callbacks.prompt_following.videos=2", "callbacks.prompt_following.steps=2"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert all(0 <= metrics[f"val/prompt_{k}"] <= 1 for k in ("colour", "motion", "both"))
    assert len(list((tmp_path / "run" / "samples" / "step_0000003").glob("video_*.mp4"))) == 4
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"]["model.word_embed.weight"].shape == (24, 64)  # 23 words + padding
    # Make the young model's text path matter: perturb its cross-attention output projections.
    gen = torch.Generator().manual_seed(0)
    for key in ("state_dict", "current_model_state"):
        for name, value in state.get(key, {}).items():
            if "cross.proj" in name or "final_linear" in name:
                value.add_(0.1 * torch.randn(value.shape, generator=gen))
    torch.save(state, tmp_path / "perturbed.ckpt")
    ckpt = tmp_path / "perturbed.ckpt"

    def latents(name: str, *overrides: str) -> torch.Tensor:
        result = sample(sample_cfg(ckpt, tmp_path / name, list(overrides)))
        return torch.load(result["latents"], weights_only=True)

    red = latents("red", "prompt=a red circle moves left")
    assert torch.isfinite(red).all()
    (tmp_path / "prompts.txt").write_text("a red circle moves left\n\na blue ring circles clockwise\n")
    both = latents("both", f"prompts_file={tmp_path / 'prompts.txt'}")
    # Video i has the same noise in both runs: the same prompt gives the same video, another prompt another.
    torch.testing.assert_close(both[0], red[0])
    assert (both[1] - red[1]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=r"caption words \['purple'\] are not in the model's vocabulary"):
        latents("bad", "prompt=a purple circle moves left")
    with pytest.raises(ConfigError, match=r"give prompts, one per video"):
        latents("none")

    from vsa.eval.prompts import main as score_prompts

    score_prompts([str(ckpt), "--videos", "3", "--steps", "2", "--out", str(tmp_path / "scores")])
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert scores["n"] == 3 and 0 <= scores["both"] <= 1 and len(scores["prompts"]) == 3
    assert (tmp_path / "scores" / "grid.png").is_file()


def test_unipc_sampling_through_sample_py_configs(dense_checkpoint, tmp_path):
    """method=unipc (diffusers' UniPC, Wan's scheduler) samples a checkpoint; with many steps it
    reaches the videos that Heun reaches (the same ODE), and differs from a 3-step Euler run."""
    pytest.importorskip("diffusers")
    runs = {name: torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / name, extra))["latents"],
                             weights_only=True)
            for name, extra in [("unipc", ["method=unipc", "steps=64"]), ("heun", ["method=heun", "steps=64"]),
                                ("euler3", ["method=euler"])]}
    assert runs["unipc"].shape == (2, 3, 4, 16, 16) and torch.isfinite(runs["unipc"]).all()
    close = (runs["unipc"] - runs["heun"]).abs().max()
    assert close < 0.1 * (runs["euler3"] - runs["heun"]).abs().max(), close


def test_autoguidance_through_sample_py(dense_checkpoint, tmp_path):
    """guide_ckpt_path: a checkpoint guiding itself gives the unguided videos (cfg_scale 1); its raw
    weights guiding its EMA ones give others; a guide of another latent shape is refused."""
    plain = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "a", ["cfg_scale=1.0"]))["latents"])
    itself = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "b", [f"guide_ckpt_path={dense_checkpoint}"]))
                        ["latents"])
    torch.testing.assert_close(itself, plain, rtol=1e-5, atol=1e-5)
    checkpoint = torch.load(dense_checkpoint, weights_only=True)
    checkpoint["state_dict"] = checkpoint["current_model_state"]  # the raw weights as the "EMA" ones
    raw = tmp_path / "raw.ckpt"
    torch.save(checkpoint, raw)
    guided = torch.load(sample(sample_cfg(dense_checkpoint, tmp_path / "c", [f"guide_ckpt_path={raw}"]))["latents"])
    assert (guided - plain).abs().max() > 1e-3
    checkpoint[CHECKPOINT_KEY]["latent_shape"] = [3, 8, 16, 16]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match=r"guide_ckpt_path: the guide's latent shape \[3, 8, 16, 16\]"):
        sample(sample_cfg(dense_checkpoint, tmp_path / "d", [f"guide_ckpt_path={tmp_path / 'other.ckpt'}"]))
