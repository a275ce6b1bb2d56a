"""The Hydra config tree: every experiment composes into something buildable, the vsa/full pairs
differ only in attention, the launchers and trainers compose, and bad overrides fail clearly."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vsa.data.codecs import build_codec
from vsa.models import PRESETS, DiTBlock, build_model, count_params, preset_params
from vsa.models.presets import nominal_params, preset_files

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# Experiments of other models than VideoDiT (a pretrained diffusers Wan: tests/test_wan.py).
VIDEODIT_EXPERIMENTS = [e for e in EXPERIMENTS if not e.startswith("wan_")]
PAIRS = ["60m", "150m", "300m", "600m", "1b"]
# The default run's recipe and data, with another conditioning or a wider model trained longer,
# and where their data differs from it (the 8 frames they were measured with; the default has 4).
DEFAULT_RUN_VARIANTS = {"t2v_shapes": {"captions": True, "frames": 8}, "shapes_wide": {"frames": 8}}


def compose_train(overrides: list[str], tmp: str = "/tmp/vsa-config-test", hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"paths.log_dir={tmp}", f"paths.output_dir={tmp}/run",
                                           *overrides], return_hydra_config=hydra)


def input_shape(cfg) -> tuple[int, ...]:
    """(C, T, H, W) of the model input, the way vsa.training.train derives it."""
    dataset = cfg.data.datamodule.dataset
    shape = (dataset.channels, dataset.frames, dataset.height, dataset.width)
    codec = {k: v for k, v in OmegaConf.to_container(cfg.data.codec).items() if v is not None}
    return build_codec(**codec).latent_shape(shape)


def test_the_required_experiments_exist():
    required = {"tiny", "vsa_finetune"} | {f"{a}_{s}" for a in ("vsa", "full") for s in PAIRS}
    assert required <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", VIDEODIT_EXPERIMENTS)
def test_every_experiment_composes_into_a_buildable_model(experiment):
    overrides = [f"experiment={experiment}"]
    if experiment == "vsa_finetune":
        overrides.append("init_from=/some/dense/last.ckpt")
    cfg = compose_train(overrides)
    assert cfg.experiment_name == experiment and cfg.logger and cfg.callbacks.checkpoint.save_last
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["module"]["lr_schedule"]["total_steps"] == cfg.trainer.max_steps
    shape = input_shape(cfg)
    with torch.device("meta"):  # the real builder, no memory
        model = instantiate(cfg.model, in_channels=shape[0], _convert_="all")
    assert model.cfg.attention == cfg.attention.name
    tokens = math.prod(model.cfg.token_grid(shape[1:]))
    if experiment.endswith("_1b"):
        assert cfg.model.name == "1.4B" and tokens == 16_384 and cfg.trainer.precision == "bf16-mixed"
        assert model.cfg.n_heads * model.cfg.head_dim == 1792
    if experiment.startswith("vsa_"):
        assert model.cfg.attention == "vsa" and 0 < model.sparsity < 1


SWEEPS = sorted(p.stem for p in (CONFIGS / "sweep").glob("*.yaml") if not p.stem.startswith("_"))


def test_the_default_runs_recipe_lives_in_its_experiment_and_reaches_no_other_run():
    """`python train.py` selects experiment=default: the 256-token CPU recipe (x0 prediction, lr
    5e-3, timestep shift 3; docs/sample_quality.md). train.yaml itself holds the general defaults
    (velocity, lr 3e-3, the resolution shift), which every other experiment and every sweep
    starts from: an experiment replaces the default one, a sweep deselects it."""
    default, general = compose_train([]), compose_train(["~experiment"])  # deselected
    assert default == compose_train(["experiment=default"]) and default.experiment_name == "default"
    recipe = {"model.prediction": "x0", "module.optimizer.lr": 5e-3, "module.timesteps.shift": 3.0}
    for key, value in recipe.items():
        assert OmegaConf.select(default, key) == value and OmegaConf.select(general, key) != value, key
    # Command-line overrides apply on top of it, as before (the run keeps the recipe).
    assert compose_train(["attention=full", "model=2.3m"]).model.prediction == "x0"
    for sweep in SWEEPS:
        cfg = compose_train([f"sweep={sweep}"])
        assert cfg.model.prediction == "velocity" and cfg.module.timesteps.shift is None, sweep
        assert cfg.module.optimizer.lr != 5e-3, sweep


def test_only_the_default_run_and_its_variants_set_shift_3():
    """t2v_shapes and shapes_wide are the default run's data with other conditioning or a wider
    model: they set the default run's shift 3 themselves; every other experiment keeps the
    resolution shift (null). (A pretrained Wan keeps its own flow shift: tests/test_wan.py.)"""
    for experiment in VIDEODIT_EXPERIMENTS:
        extra = ["init_from=/x.ckpt"] if experiment == "vsa_finetune" else []
        cfg = compose_train([f"experiment={experiment}", *extra])
        expected = 3.0 if experiment in DEFAULT_RUN_VARIANTS or experiment == "default" else None
        assert cfg.module.timesteps.shift == expected, experiment


def test_only_the_default_run_and_shapes_wide_predict_x0():
    """The default CPU run predicts x0 (cleaner samples, docs/sample_quality.md, 2026-12-07), and so
    does experiment=shapes_wide; every other experiment predicts the velocity, as their measured
    results (and Wan's pretrained transformer) do."""
    for experiment in VIDEODIT_EXPERIMENTS:
        extra = ["init_from=/x.ckpt"] if experiment == "vsa_finetune" else []
        cfg = compose_train([f"experiment={experiment}", *extra])
        assert cfg.model.prediction == ("x0" if experiment in ("default", "shapes_wide") else "velocity"), experiment
    assert compose_train(["experiment=wan_vsa_finetune", "pretrained=/x"]).model.prediction == "velocity"


def test_only_the_default_run_trains_at_lr_5e_3():
    """The default CPU run's AdamW learning rate is 5e-3 (docs/sample_quality.md, 2026-12-07, third
    session); the recipes measured before it (shapes_wide, t2v_shapes, tiny, scaling_tiny) keep
    train.yaml's 3e-3."""
    for experiment in ("shapes_wide", "t2v_shapes", "tiny"):
        assert compose_train([f"experiment={experiment}"]).module.optimizer.lr == 3e-3, experiment
    assert compose_train(["sweep=scaling_tiny"]).module.optimizer.lr == 3e-3
    for experiment in VIDEODIT_EXPERIMENTS:
        extra = ["init_from=/x.ckpt"] if experiment == "vsa_finetune" else []
        lr = compose_train([f"experiment={experiment}", *extra]).module.optimizer.lr
        assert (lr == 5e-3) == (experiment == "default"), experiment


def test_only_the_default_run_uses_its_own_data_and_mlp():
    """The default CPU run draws one large object per clip (max_objects 1, radius 0.2-0.3), trains
    1,200 steps of batch 4 on 4 frames with a token convolution in the MLPs (mlp_conv 3, ratio 2;
    see docs/sample_quality.md, 2026-12-05 and 2026-12-07). Every experiment and sweep on the
    synthetic videos keeps the data set's defaults, and every sweep the presets' plain MLP."""
    from vsa.data import SyntheticVideoDataset

    default = compose_train([])
    dataset = default.data.datamodule.dataset
    assert (dataset.max_objects, list(dataset.radius)) == (1, [0.2, 0.3])
    assert (default.model.mlp_conv, default.model.mlp_ratio) == (3, 2.0)
    assert (default.data.datamodule.batch_size, default.trainer.max_steps, dataset.frames) == (4, 1200, 4)
    for variant, extra in DEFAULT_RUN_VARIANTS.items():  # the default run's data and MLP
        cfg = compose_train([f"experiment={variant}"])
        assert cfg.data.datamodule.dataset == {**default.data.datamodule.dataset, **extra}
        assert (cfg.model.mlp_conv, cfg.model.mlp_ratio) == (3, 2.0)
    runs = [[f"experiment={e}", *(["init_from=/x.ckpt"] if e == "vsa_finetune" else [])]
            for e in VIDEODIT_EXPERIMENTS if e not in DEFAULT_RUN_VARIANTS and e != "default"]
    runs += [[f"sweep={s}"] for s in SWEEPS]
    plain = SyntheticVideoDataset(1, 1, 1, 1)
    for overrides in runs:
        cfg = compose_train(overrides)
        dataset = cfg.data.datamodule.dataset
        if dataset._target_ == "vsa.data.SyntheticVideoDataset":
            built = instantiate(dataset, num_samples=1)
            assert (built.max_objects, built.radius) == (plain.max_objects, plain.radius), overrides
        assert cfg.model.get("mlp_conv", 0) == 0 and cfg.model.get("mlp_ratio", 4.0) == 4.0, overrides


@pytest.mark.parametrize("size", PAIRS)
def test_vsa_and_full_experiments_differ_only_in_attention(size):
    vsa = OmegaConf.to_container(compose_train([f"experiment=vsa_{size}"]), resolve=True)
    full = OmegaConf.to_container(compose_train([f"experiment=full_{size}"]), resolve=True)
    for cfg in (vsa, full):
        for key in ("attention", "experiment_name", "run_name", "tags"):
            cfg.pop(key)
        for key in ("attention", "attention_options", "sparsity", "topk"):
            cfg["model"].pop(key)
        cfg["logger"]["wandb"].pop("group")
        cfg["logger"]["wandb"].pop("name")
        cfg["logger"]["wandb"].pop("tags")
    assert vsa == full


def test_scaling_presets_match_their_names():
    for experiment in ("vsa_60m", "vsa_150m", "vsa_300m", "vsa_600m", "vsa_1b"):
        cfg = compose_train([f"experiment={experiment}"])
        count = preset_params(cfg.model.name, attention="vsa", attention_options={"gates": "pretrain"})
        assert abs(count / nominal_params(cfg.model.name) - 1) < 0.1


def test_the_vsa_1b_benchmark_case_is_the_experiment():
    """scripts/bench_train.py --cases vsa_1b times what `python train.py experiment=vsa_1b` trains
    (its logged tokens/s and MFU are compared with it): the same preset, latent shape, batch and
    every block recomputed."""
    spec = importlib.util.spec_from_file_location("bench_train", CONFIGS.parent / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    arch, shape, batch, attentions = bench.CASES["vsa_1b"]
    cfg = compose_train(["experiment=vsa_1b"])
    ds = cfg.data.datamodule.dataset
    codec = build_codec(**OmegaConf.to_container(cfg.data.codec))
    latent = codec.encode(torch.zeros(1, ds.channels, ds.frames, ds.height, ds.width)).shape[1:]
    assert arch == PRESETS[cfg.model.name] and tuple(shape) == tuple(latent)
    assert batch == cfg.data.datamodule.batch_size and cfg.model.activation_checkpointing is True
    assert "vsa_1b" in bench.ALL_BLOCKS and set(attentions) == {"full", "vsa"}


@pytest.mark.parametrize("model", [p.stem for p in preset_files(CONFIGS / "model")])
def test_every_model_config_composes_into_its_preset(model):
    """configs/model/NAME.yaml holds the preset's numbers: composed into the default run, the
    model built from it has the preset's depth, width, heads and parameter count."""
    cfg = compose_train([f"model={model}", "attention=full"])
    name = cfg.model.name
    with torch.device("meta"):
        built = instantiate(cfg.model, in_channels=16, num_classes=0, _convert_="all")
        extras = {k: v for k, v in OmegaConf.to_container(cfg.model).items()
                  if k in ("mlp_conv", "mlp_ratio")}  # overrides of the runs that use the file
        reference = build_model(name, in_channels=16, patch=tuple(cfg.model.patch), attention="full",
                                tile_order=cfg.model.tile_order, **extras)
    assert (built.cfg.depth, built.cfg.width, built.cfg.head_dim) == tuple(PRESETS[name][k] for k in
                                                                           ("depth", "width", "head_dim"))
    assert count_params(built) == count_params(reference)
    if not extras:
        assert count_params(built) == preset_params(name, attention="full")


def test_vsa_finetune_adapts_with_a_staircase():
    cfg = compose_train(["experiment=vsa_finetune", "init_from=/dense.ckpt"])
    assert cfg.attention.options.gates == "adapt"
    schedule = instantiate(cfg.callbacks.sparsity_schedule)
    assert schedule.value(0) == 0.0 and schedule.value(10**9) == cfg.attention.sparsity
    assert schedule.value(schedule.interval) == schedule.increment


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "fsdp"])
def test_trainer_configs_compose(trainer):
    cfg = compose_train([f"trainer={trainer}", "experiment=tiny"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and cfg.trainer.max_steps == 4
    assert cfg.trainer.use_distributed_sampler is False  # the training sampler shards itself
    if trainer == "fsdp":
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy.__class__.__name__ == "FSDPStrategy"
        assert strategy.kwargs["auto_wrap_policy"].__class__.__name__ == "ModuleWrapPolicy"
        assert DiTBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
        if importlib.util.find_spec("diffusers"):  # a finetuned Wan: one unit per Wan block too
            from diffusers.models.transformers.transformer_wan import WanTransformerBlock

            assert WanTransformerBlock in strategy.kwargs["auto_wrap_policy"]._module_classes


@pytest.mark.parametrize("data", ["synthetic", "footage", "photo_pans", "long_range"])
def test_builtin_data_configs_compose_and_build(data):
    """Data sets that need no folder: the config composes, its dataset builds (footage: without
    decoding) and the shape the training code derives from the config is the items' shape."""
    overrides = [f"data={data}"] + (["data.distance=0.5", "data.kind=repeat"] if data == "long_range" else [])
    cfg = compose_train(overrides)
    container = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    assert container["key"] == "video" and container["num_classes"] > 0
    dataset = instantiate(cfg.data.datamodule.dataset)
    assert dataset.num_classes == container["num_classes"]
    assert input_shape(cfg)[1:] == ((4 if data == "synthetic" else 8), 16, 16)  # the default run: 4 frames
    if data == "long_range":
        assert (dataset.distance, dataset.kind) == (0.5, "repeat")
    if data == "footage":
        val = instantiate(cfg.data.datamodule.val_dataset)
        assert (val.split, val.frames, val.val_fraction) == ("val", dataset.frames, dataset.val_fraction)
    else:
        assert tuple(dataset[0]["video"].shape) == (3, input_shape(cfg)[1], 32, 32)


def test_slurm_launcher_composes_with_requeue(tmp_path):
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                         "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "experiment=vsa_1b"],
                        tmp=str(tmp_path), hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0 and launcher.timeout_min > 0
    assert cfg.hydra.run.dir == f"{tmp_path}/train/runs/vsa_1b"  # fixed: a requeued job finds it
    local = compose_train(["hydra/launcher=local"], hydra=True)
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


def test_sample_config_composes_with_a_backend_swap():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        plain = compose("sample", overrides=["ckpt_path=x.ckpt", "paths.output_dir=/tmp/x"])
        swapped = compose("sample", overrides=["ckpt_path=x.ckpt", "attention=vsa", "sparsity=0"])
    assert plain.get("attention") is None and plain.ema is True
    assert swapped.attention.name == "vsa" and swapped.sparsity == 0


def test_unknown_experiment_or_key_fails_clearly():
    with pytest.raises(MissingConfigException, match="Could not find 'experiment/nope'"):
        compose_train(["experiment=nope"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'module.learning_rate'"):
        compose_train(["module.learning_rate=1"])
    result = subprocess.run([sys.executable, "train.py", "experiment=nope"], cwd=REPO,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Could not find 'experiment/nope'" in result.stderr and "vsa_1b" in result.stderr


def test_a_sweep_point_resumes_whatever_grid_lists_launched_it():
    """A sweep piece relaunched with other grid lists (scaling.multiples=[1,2] after [4,8,1,2])
    resumes its interrupted point; a change to what the point trains still refuses."""
    from vsa.training.run_folder import config_differences

    point = ["sweep=iso_shapes", "model=5m", "attention=vsa75", "scaling.multiple=1"]
    first = compose_train(point + ["scaling.multiples=[4,8,1,2]", "scaling.attentions=[sta32,vsa75]"])
    again = compose_train(point + ["scaling.multiples=[1,2]", "scaling.presets=[5m]"])
    ignores = list(first.run_name_ignores)
    as_dict = lambda cfg: OmegaConf.to_container(cfg, resolve=False)  # noqa: E731
    assert config_differences(as_dict(first), as_dict(again), ignores) == []
    other = compose_train(point[:-1] + ["scaling.multiple=2", "scaling.multiples=[1,2]"])
    assert config_differences(as_dict(first), as_dict(other), ignores) == ["scaling.multiple: 1 -> 2"]
