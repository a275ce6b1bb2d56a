"""Scaling-law harness: budgets -> steps with the analytic FLOP counter, the sweep configs, a
tiny sweep end to end through Hydra multirun (result rows, skip on relaunch, report), the
power-law fit on synthetic data and the report with few points. CPU, tiny models."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

import vsa.scaling  # noqa: F401  (registers the resolvers)
from vsa.models.presets import nominal_params, preset_config
from vsa.scaling.budget import budget_for_multiple, compact_number, run_spec, warmup_steps_for
from vsa.scaling.report import (
    envelope_flops_at,
    fit_power_law,
    lower_envelope,
    step_time_table,
    summarize,
    timing_source,
    write_report,
)
from vsa.scaling.rows import collect_rows, find_rows, restore_rows
from vsa.training.flops import training_flops

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SWEEPS = sorted(p.stem for p in (CONFIGS / "sweep").glob("*.yaml") if not p.stem.startswith("_"))
# Sweeps with one budget list for every size (_budget_grid.yaml) and per-size grids (_iso16k.yaml).
BUDGET_GRID_SWEEPS = [s for s in SWEEPS if "_budget_grid" in (CONFIGS / "sweep" / f"{s}.yaml").read_text()]
ISO_SWEEPS = [s for s in SWEEPS if "_iso16k" in (CONFIGS / "sweep" / f"{s}.yaml").read_text()]
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}


def compose_train(overrides: list[str], tmp: str = "/tmp/vsa-scaling-test", hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"paths.log_dir={tmp}", f"paths.output_dir={tmp}/run", *overrides],
                       return_hydra_config=hydra)


# ----------------------------------------------------------------------------- budgets -> steps

def test_steps_for_budget_match_the_analytic_flop_counter():
    for attention in ("full", "vsa"):
        cfg = compose_train(["sweep=scaling_micro", "model=10m", f"attention={attention}", "scaling.budget=1e15"])
        dit = preset_config("10M", in_channels=12, num_classes=10, patch=(1, 2, 2), cond_dropout=0.1,
                            attention=attention, sparsity=cfg.attention.sparsity,
                            attention_options=dict(cfg.attention.options))
        per_sample = training_flops(dit, (16, 64, 64))  # 12x16x64x64 latents -> 16,384 tokens
        steps = cfg.trainer.max_steps
        assert steps == math.floor(1e15 / (per_sample * 2)) and steps > 0
        resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert resolved["module"]["lr_schedule"]["total_steps"] == steps == resolved["trainer"]["val_check_interval"]
        assert run_spec(cfg).flops_for_steps(steps) <= 1e15 < run_spec(cfg).flops_for_steps(steps + 1)
    # the global batch counts devices, nodes and gradient accumulation
    cfg = compose_train(["sweep=scaling_micro", "model=5m", "attention=full", "scaling.budget=1e16",
                         "trainer.devices=2", "trainer.num_nodes=3", "trainer.accumulate_grad_batches=4"])
    assert run_spec(cfg).global_batch == 2 * 2 * 3 * 4
    assert cfg.trainer.max_steps == math.floor(1e16 / (run_spec(cfg).sample_flops().training * 48))


def test_steps_follow_a_vsa_sparsity_schedule():
    """With a dense -> sparse staircase the early steps cost more; the steps spend the budget."""
    cfg = compose_train(["sweep=scaling_micro", "model=5m", "attention=vsa", "scaling.budget=2e15",
                         "+callbacks.sparsity_schedule._target_=vsa.training.SparsitySchedule",
                         "+callbacks.sparsity_schedule.target=0.875", "+callbacks.sparsity_schedule.increment=0.25",
                         "+callbacks.sparsity_schedule.interval=20"])
    spec = run_spec(cfg)
    steps = cfg.trainer.max_steps
    assert spec.sparsity_at(0) == 0.0 and spec.sparsity_at(60) == 0.75 and spec.sparsity_at(80) == 0.875
    assert spec.step_flops(0) > spec.step_flops(20) > spec.step_flops(80)
    brute = np.cumsum([spec.step_flops(s) for s in range(steps + 1)])
    assert brute[steps - 1] <= 2e15 < brute[steps]
    assert math.isclose(spec.flops_for_steps(steps), brute[steps - 1], rel_tol=1e-12)


def test_bad_budgets_and_presets_fail_clearly(tmp_path):
    with pytest.raises(MissingConfigException, match="model/nope"):
        compose_train(["sweep=scaling_tiny", "model=nope"])
    with pytest.raises(MissingConfigException, match="sweep/nope"):
        compose_train(["sweep=nope"])
    for budget, message in (("abc", "must be a number of training FLOPs"), ("null", "must be a number"),
                            ("-1e12", "positive, finite"),
                            ("1e3", "too small for one training step.*raise scaling.budget to at least")):
        cfg = compose_train(["sweep=scaling_tiny", f"scaling.budget={budget}"])
        with pytest.raises(InterpolationResolutionError, match=message):
            _ = cfg.trainer.max_steps
    cfg = compose_train(["sweep=scaling_tiny", "scaling.budget=1e12", "trainer.devices=auto"])
    with pytest.raises(InterpolationResolutionError, match="trainer.devices='auto'.*positive int"):
        _ = cfg.trainer.max_steps
    # through train(): one ConfigError line, before any training
    from vsa.training import ConfigError, train

    cfg = compose_train(["sweep=scaling_tiny", "scaling.budget=1e3"], tmp=str(tmp_path))
    with pytest.raises(ConfigError, match="too small for one training step"):
        train(cfg)


def test_every_sweep_has_a_budget_axis():
    assert set(BUDGET_GRID_SWEEPS) | set(ISO_SWEEPS) == set(SWEEPS) and ISO_SWEEPS


@pytest.mark.parametrize("sweep", BUDGET_GRID_SWEEPS)
def test_sweeps_compose_with_their_grid_and_fixed_run_folders(sweep, tmp_path):
    cfg = compose_train([f"sweep={sweep}"], tmp=str(tmp_path), hydra=True)
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"model", "attention", "scaling.budget"}
    assert params["attention"] == "full,vsa" and len(params["model"].split(",")) >= 2
    assert len(params["scaling.budget"].split(",")) >= 2
    assert cfg.logger.wandb.group == sweep and cfg.callbacks.recorder is not None
    assert "scaling.budgets" in cfg.hydra.job.config.override_dirname.exclude_keys
    assert cfg.hydra.sweep.dir == f"{tmp_path}/train/multiruns/{sweep}"
    for model in params["model"].split(","):  # every point resolves to a buildable run
        for attention in ("full", "vsa"):
            point = compose_train([f"sweep={sweep}", f"model={model}", f"attention={attention}",
                                   f"scaling.budget={params['scaling.budget'].split(',')[-1]}"], tmp=str(tmp_path))
            resolved = OmegaConf.to_container(point, resolve=True, throw_on_missing=True)
            assert resolved["trainer"]["max_steps"] >= 1
            assert resolved["logger"]["wandb"]["name"].startswith(point.model.name)
    if sweep == "scaling_micro":
        assert params["model"] == "5m,10m,20m" and params["scaling.budget"] == "5e14,1e15,2e15"
        assert cfg.callbacks.sample_videos is None and run_spec(point).sample_flops().tokens == 16_384
    if sweep == "scaling_paper":
        slurm = compose_train([f"sweep={sweep}", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                              tmp=str(tmp_path), hydra=True)
        launcher = OmegaConf.to_container(slurm.hydra.launcher, resolve=True)
        assert launcher["_target_"].endswith("SlurmLauncher") and launcher["max_num_timeout"] > 0
        assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 8)
        assert "1.4b" in params["model"] and float(params["scaling.budget"].split(",")[-1]) == 4e21
        assert run_spec(point).global_batch == 256 and point.ckpt_path == "last"


@pytest.mark.parametrize("sweep", ISO_SWEEPS)
def test_iso_sweeps_give_each_size_4_budgets_over_8x_and_shared_budgets(sweep, tmp_path):
    cfg = compose_train([f"sweep={sweep}"], tmp=str(tmp_path), hydra=True)
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"model", "attention", "scaling.multiple"}
    assert {"full", "vsa"} <= set(params["attention"].split(","))
    models = params["model"].split(",")
    multiples = [float(m) for m in params["scaling.multiple"].split(",")]
    assert len(multiples) >= 4 and max(multiples) / min(multiples) >= 8
    budgets, names = {}, []
    for model in models:
        for attention in params["attention"].split(","):
            for multiple in (multiples[0], multiples[-1]):
                point = compose_train([f"sweep={sweep}", f"model={model}", f"attention={attention}",
                                       f"scaling.multiple={multiple}"], tmp=str(tmp_path))
                resolved = OmegaConf.to_container(point, resolve=True, throw_on_missing=True)
                steps = resolved["trainer"]["max_steps"]
                assert 100 <= steps <= 20_000, (model, attention, multiple, steps)  # no run of a handful of steps
                assert 10 <= resolved["module"]["lr_schedule"]["warmup_steps"] <= max(10, steps // 10)
                spec = run_spec(point)
                assert spec.sample_flops().tokens >= 16_384  # attention dominates
                budgets.setdefault(model, set()).add(resolved["scaling"]["budget"])
        names.append(point.model.name)
    assert all(max(b) / min(b) >= 8 for b in budgets.values())
    # the budgets of neighbouring sizes coincide (IsoFLOP curves with several sizes)
    grid = {model: {float(cfg.scaling.base_budgets[compose_train([f"sweep={sweep}", f"model={model}"]).model.name])
                    * m for m in multiples} for model in models}
    assert all(grid[a] & grid[b] for a, b in zip(models, models[1:]))
    sizes = sorted(nominal_params(name) for name in names)  # 4+ sizes over 8x+, up to 60M at least
    assert len(sizes) >= 4 and sizes[-1] / sizes[0] >= 8 and sizes[-1] >= 6e7
    assert "scaling.multiples" in cfg.hydra.job.config.override_dirname.exclude_keys
    # its data set builds (a knob that does not fit the clip, e.g. a long-range distance too large
    # for the frames, fails here rather than on the GPU) and yields a clip of the configured shape
    dataset = hydra.utils.instantiate(point.data.datamodule.dataset, num_samples=2)
    ds = point.data.datamodule.dataset
    assert dataset[1][point.data.key].shape == (ds.channels, ds.frames, ds.height, ds.width)


def test_budget_multiples_and_scaled_warmup():
    bases = {"5M": 2e15, "60M": 1.6e16}
    assert budget_for_multiple(4, bases, "5M") == 8e15 and budget_for_multiple("2", bases, "60M") == 3.2e16
    with pytest.raises(ValueError, match="no entry for model '10M'.*add '10M: <FLOPs>'"):
        budget_for_multiple(1, bases, "10M")
    with pytest.raises(ValueError, match="must be positive"):
        budget_for_multiple(-1, bases, "5M")
    assert warmup_steps_for(1000, 0.05, 10) == 50 and warmup_steps_for(100, 0.05, 10) == 10
    assert warmup_steps_for(12, 0.05, 10) == 6  # never more than half a run


def test_rows_collect_and_restore_skip_finished_runs(tmp_path):
    run = tmp_path / "sweep" / "attention=vsa,model=5m,scaling.multiple=1"
    run.mkdir(parents=True)
    row = {"schema": 1, "preset": "5M", "attention": "vsa", "budget": 2e15, "val_loss": 0.1}
    (run / "result.json").write_text(json.dumps(row))
    written = collect_rows(tmp_path / "sweep", tmp_path / "rows")
    assert [p.name for p in written] == ["attention=vsa,model=5m,scaling.multiple=1.json"]
    (tmp_path / "rows" / "summary.json").write_text("{}")  # other JSON files beside the rows are not rows
    assert [r["val_loss"] for r in find_rows(tmp_path / "rows")] == [0.1]
    restored = restore_rows(tmp_path / "rows", tmp_path / "fresh")
    assert [p.parent.name for p in restored] == [run.name]
    assert json.loads(restored[0].read_text())["budget"] == 2e15
    assert restore_rows(tmp_path / "rows", tmp_path / "fresh") == []  # existing rows are kept
    cli = subprocess.run([sys.executable, "-m", "vsa.scaling.rows", "restore", str(tmp_path / "nope"), "x"],
                         cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert cli.returncode == 2 and "is not a folder of result rows" in cli.stderr


def test_compact_numbers_name_run_folders():
    assert compact_number("1000000000000000.0") == "1e15" and compact_number("450000000000000000000.0") == "4.5e20"
    assert compact_number("0.875") == "0.875" and compact_number("10m") == "10m" and compact_number("3") == "3"
    subdir = OmegaConf.create({"d": "${sweep_subdir:'attention=vsa,model=10m,scaling.budget=1000000000000000.0'}"})
    assert subdir.d == "attention=vsa,model=10m,scaling.budget=1e15"


def test_the_run_recorder_times_gpu_steps_without_waiting_for_each(monkeypatch):
    """On a GPU the recorder marks each step's end with a CUDA event and waits for the GPU only
    when the durations are read (or every SETTLE_EVERY steps), never per step: a wait per step
    kept the host from queueing the next step while the GPU ran. A fake event on a fake stream
    clock stands in for CUDA here. Validation time is not step time."""
    from types import SimpleNamespace

    from vsa.scaling.result import RunRecorder

    class FakeEvent:
        stream_clock, waits = 0.0, 0

        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = FakeEvent.stream_clock

        def synchronize(self) -> None:
            FakeEvent.waits += 1

        def elapsed_time(self, end: FakeEvent) -> float:
            return (end.at - self.at) * 1e3  # milliseconds, as CUDA's

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")), global_step=0,
                              max_steps=100, callbacks=[], is_global_zero=True, sanity_checking=False)
    recorder = RunRecorder()
    recorder.on_train_start(trainer, None)

    def steps(durations):
        for d in durations:
            FakeEvent.stream_clock += d
            trainer.global_step += 1
            recorder.on_train_batch_end(trainer, None, None, None, trainer.global_step)

    steps([2.0, 0.02, 0.03, 0.02])  # the first step compiles
    FakeEvent.stream_clock += 5.0  # validation
    recorder.on_validation_end(trainer, None)
    steps([0.02, 0.04, 0.02])
    assert FakeEvent.waits == 0 and recorder.clock == "cuda_events"
    assert recorder.median_step_s == pytest.approx(0.02) and FakeEvent.waits == 1
    assert recorder.launch_train_time == pytest.approx(2.15) and recorder.launch_steps == 7
    recorder.SETTLE_EVERY = 3
    steps([0.01, 0.01])
    assert FakeEvent.waits == 1
    steps([0.01])
    assert FakeEvent.waits == 2 and len(recorder.step_times) == 10


# ----------------------------------------------------------------------------- end to end

def test_tiny_sweep_end_to_end_rows_skip_and_report(tmp_path):
    command = [sys.executable, "train.py", "-m", "sweep=scaling_tiny", f"paths.log_dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "multiruns" / "scaling_tiny"
    rows = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}
    assert sorted(rows) == sorted(f"attention={a},model={m},scaling.budget={b}"
                                  for a in ("full", "vsa") for m in ("0.6m", "2.3m") for b in ("2e10", "4e10"))
    for name, row in rows.items():
        dit = preset_config(row["preset"], in_channels=3, num_classes=10, attention=row["attention"],
                            sparsity=row["sparsity"])
        per_sample = training_flops(dit, (4, 8 * 2, 8 * 2))
        assert row["flops_per_sample"] == per_sample and row["global_batch"] == 4 and row["seq_len"] == 256
        assert row["steps"] == math.floor(row["budget"] / (4 * per_sample))
        assert row["flops"] == row["steps"] * 4 * per_sample <= row["budget"]
        assert row["tokens"] == row["steps"] * 4 * 256 and row["sweep"] == "scaling_tiny"
        assert row["val_loss"] == row["val_loss_raw"]  # scaling_tiny reports the raw weights' loss
        # the EMA's first update copies the weights: after 1 step both are the same
        assert (row["val_loss_raw"] != row["val_loss_ema"]) == (row["steps"] > 1)
        assert row["wall_clock_s"] > 0 and row["tokens_per_s"] > 0 and row["device"].startswith("cpu")
        assert row["step_clock"] == "wall" and row["step_time_s"] > 0
        assert (row["sparsity"] == 0.875) == (row["attention"] == "vsa") and 0 < row["attention_fraction"] < 1
        # the EMA loss is the logged val/loss of the final validation (EMA weights swapped in)
        with open(sweep_dir / name / "csv" / "version_0" / "metrics.csv", newline="") as f:
            logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
        assert len(logged) == 1 and math.isclose(logged[0], row["val_loss_ema"], rel_tol=1e-5)

    # relaunch: every point is finished, so nothing trains and no row changes
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/result.json")}
    again = subprocess.run(command, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipped") == 8 and "Trainer.fit" not in again.stdout + again.stderr
    assert before == {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/result.json")}

    summary = write_report(sweep_dir, tmp_path / "report", n_bootstrap=200)
    for name in ("report.md", "summary.json", "loss_vs_flops.png", "loss_vs_steps.png", "isoflop.png",
                 "multiplier.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    multiplier = summary["multipliers"]["vsa"]
    assert math.isfinite(multiplier["multiplier"]) and multiplier["multiplier"] > 0
    assert summary["n_rows"] == 8 and set(summary["groups"]) == {"full", "vsa"}
    assert "Compute multiplier" in (tmp_path / "report" / "report.md").read_text()
    cli = subprocess.run([sys.executable, "-m", "vsa.scaling.report", str(tmp_path / "missing")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "is not a folder" in cli.stderr and "Traceback" not in cli.stderr


# ----------------------------------------------------------------------------- fits and report

def test_power_law_fit_recovers_a_known_law():
    E, A, alpha = 0.12, 3.0e4, 0.3
    rng = np.random.default_rng(0)
    flops = np.geomspace(1e15, 1e21, 14)
    losses = (E + A * flops ** -alpha) * np.exp(rng.normal(0, 0.005, flops.size))
    fit = fit_power_law(flops, losses)
    assert fit.status == "ok" and fit.n_points == 14
    assert abs(fit.E - E) < 0.01 and abs(fit.alpha - alpha) / alpha < 0.1 and abs(math.log(fit.A / A)) < 1.0
    # the inverse gives the compute of a loss on the curve
    assert math.isclose(fit.flops_at(float(fit.loss(1e18))), 1e18, rel_tol=1e-6)
    flat = fit_power_law(flops[:5], [0.5, 0.5, 0.5, 0.5, 0.49])  # no law with an E > 0 in these points
    assert flat.status == "at_bound" and not flat.usable and "sits at its bound" in flat.message
    exact = fit_power_law(flops[::6], (E + A * flops[::6] ** -alpha))
    assert exact.status == "exact" and abs(exact.E - E) < 0.01 and "passes through" in exact.message
    two = fit_power_law([1e15, 1e16], [1.0, 0.8])
    assert two.status == "underdetermined" and two.E == 0 and math.isclose(two.alpha, -math.log10(0.8))


def test_envelope_and_interpolation():
    points = [(1e15, 1.0), (2e15, 1.1), (4e15, 0.8), (4e15, 0.7), (8e15, 0.75), (1.6e16, 0.5)]
    assert lower_envelope(points) == [(1e15, 1.0), (4e15, 0.7), (1.6e16, 0.5)]
    frontier = lower_envelope(points)
    c, extrapolated = envelope_flops_at(frontier, 0.7)
    assert math.isclose(c, 4e15) and not extrapolated
    c, extrapolated = envelope_flops_at(frontier, 0.4)
    assert c > 1.6e16 and extrapolated


def rows_folder(folder: Path, rows: list[dict]) -> Path:
    """`rows` written as result rows (one JSON file each) into `folder`, which is returned."""
    folder.mkdir(parents=True)
    for i, r in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(dict(r, schema=1)))
    return folder


def _rows(attention, law, budgets, presets=(("5M", 5e6), ("10M", 1e7))):
    rows = []
    for name, params in presets:
        for budget in budgets:
            rows.append({"attention": attention, "sparsity": 0.875 if attention == "vsa" else None,
                         "preset": name, "params": params, "budget": budget, "flops": budget * 0.98,
                         "steps": 10, "val_loss": law(budget) * (1 + 0.01 * (params > 6e6)),
                         "val_loss_raw": None, "val_loss_ema": None, "attention_fraction": 0.5,
                         "seq_len": 16384, "global_batch": 2, "sweep": "synthetic"})
    return rows


def test_loss_at_equal_steps_splits_a_multiplier_into_cost_and_learning(tmp_path):
    """Runs whose loss is a function of their steps: full attention's L(s) = 0.02 + 2 s^-0.5 at
    both sizes (the 10M 10% lower), VSA's 5% above it at the same steps, and a VSA step 4x cheaper
    in FLOPs. The report recovers the loss ratio 1.05 and the FLOPs-per-step ratio 4 per size,
    and the 10M/5M ratio 0.9 at equal steps; outside full's step range nothing is compared."""
    law = lambda steps: 0.02 + 2.0 * steps ** -0.5
    rows = []
    for attention, flops_per_step, worse in (("full", 4e12, 1.0), ("vsa", 1e12, 1.05)):
        for preset, params, better in (("5M", 5e6, 1.0), ("10M", 1e7, 0.9)):
            for budget in (1e15 * 2 ** i for i in range(5)):
                steps = int(budget / flops_per_step / (params / 5e6))
                rows.append({"attention": attention, "sparsity": 0.875 if attention == "vsa" else None,
                             "preset": preset, "params": params, "budget": budget,
                             "flops": steps * flops_per_step * params / 5e6, "steps": steps,
                             "val_loss": law(steps) * better * worse, "seq_len": 16384, "global_batch": 4})
    summary = summarize(rows, n_bootstrap=20)
    equal = summary["equal_steps"]
    for preset in ("5M", "10M"):
        r = equal["attention"]["vsa"][preset]
        assert r["n"] == 3 and r["median"] == pytest.approx(1.05, rel=0.01)  # VSA's 2 top budgets lie past full's
        assert r["flops_per_step_ratio"] == pytest.approx(4.0, rel=0.01)
    for label in ("full", "vsa"):
        r = equal["sizes"][label]["10M"]
        assert r["of"] == "5M" and r["n"] == 4 and r["median"] == pytest.approx(0.9, rel=0.02)
    write_report(rows_folder(tmp_path / "rows", rows), tmp_path / "out", n_bootstrap=20)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Loss at equal steps (where the multipliers come from)" in text and "| vsa | 10M | 3 | 1.05 (" in text


def test_report_multiplier_from_known_laws_and_with_few_points(tmp_path):
    full = lambda c: 0.1 + 40.0 * c ** -0.1
    vsa = lambda c: full(2.5 * c)  # (VSA needs 2.5x less compute for the same loss)
    budgets = [1e15 * 2 ** i for i in range(6)]
    summary = summarize(_rows("full", full, budgets) + _rows("vsa", vsa, budgets), n_bootstrap=200)
    m = summary["multipliers"]["vsa"]
    assert not m["extrapolated"] and abs(m["multiplier"] / 2.5 - 1) < 0.05
    assert abs(m["from_fits"] / 2.5 - 1) < 0.05 and m["bootstrap"]["low"] <= m["multiplier"] <= m["bootstrap"]["high"]
    assert summary["groups"]["full"]["fit"]["status"] == "ok"

    # 2 budgets: fits underdetermined, still a finite multiplier from the envelopes, and the report says so
    few = _rows("full", full, budgets[:2]) + _rows("vsa", vsa, budgets[:2])
    summary = summarize(few, n_bootstrap=100)
    m = summary["multipliers"]["vsa"]
    assert math.isfinite(m["multiplier"]) and m["multiplier"] > 1 and m["from_fits"] is None
    assert any("underdetermined" in n for n in summary["notes"])
    # frontiers whose loss ranges do not overlap: extrapolated, still finite, flagged
    apart = _rows("full", full, budgets[:2]) + _rows("vsa", vsa, budgets[4:])
    summary = summarize(apart, n_bootstrap=50)
    m = summary["multipliers"]["vsa"]
    assert math.isfinite(m["multiplier"]) and m["extrapolated"] and not m["loss_ranges_overlap"]
    assert any("do not overlap" in n for n in summary["notes"])

    folder = tmp_path / "sweep" / "run"
    folder.mkdir(parents=True)
    for i, row in enumerate(few):
        (folder / f"{i}").mkdir()
        (folder / f"{i}" / "result.json").write_text(json.dumps(row))
    write_report(tmp_path / "sweep", tmp_path / "out", n_bootstrap=50)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "underdetermined" in text and (tmp_path / "out" / "multiplier.png").is_file()


def test_report_averages_seeds_and_compares_gpu_time(tmp_path):
    """Rows with a second seed at some points, validation errors and step times: the points are
    seed means, the noise section reports the seed spread, the bootstrap interval holds the
    multiplier and the GPU-time comparison uses steps x the configuration's median step time."""
    full = lambda c: 0.05 + 40.0 * c ** -0.1
    vsa = lambda c: full(2.5 * c)
    budgets = [1e15 * 2 ** i for i in range(6)]
    rows = _rows("full", full, budgets) + _rows("vsa", vsa, budgets) + _rows("vsa75", vsa, budgets[:1])
    rows[-2]["attention"], rows[-1]["attention"] = "sta", "sta"  # a static pattern: its own label
    for r in rows:
        r.update(val_loss_se=0.002, seed=0, compile="reduce-overhead",
                 step_time_s={"full": 0.2, "vsa": 0.08, "sta": 0.07}[r["attention"]])
        r["steps"] = int(r["budget"] / 1e13) if r["attention"] == "full" else int(r["budget"] / 2.5e12)
    seconds = []
    for r in list(rows):
        if r["budget"] >= 8e15 and r["attention"] in ("full", "vsa"):  # second seeds at the frontier
            twin = dict(r, seed=1, val_loss=r["val_loss"] * 1.01, step_time_s=r["step_time_s"] * 1.1)
            r["val_loss"] *= 0.99
            rows.append(twin)
            seconds.append(twin)
    rows[0].update(class_acc=0.8, fd=2.5)  # sample quality, where a run measured it
    for r in rows:
        r["device"] = "NVIDIA H200"
    eager = dict(rows[0], compile="eager", step_time_s=5.0, seed=2)  # other mode: not in the timing table
    other_gpu = dict(rows[0], step_time_s=9.0, seed=3, device="NVIDIA H100")  # other device: loss only
    rows += [eager, other_gpu]
    summary = summarize(rows, n_bootstrap=300)
    assert set(summary["groups"]) == {"full", "vsa", "sta"}
    assert summary["groups"]["full"]["n_points"] == 12 and summary["groups"]["full"]["n_rows"] == 12 + 6 + 2
    seed = summary["noise"]["seed"]
    assert seed["n_points"] == 6 + 6 + 1 and 0.005 < seed["relative_std"] < 0.02
    assert summary["noise"]["val_se_median"] == 0.002
    m = summary["multipliers"]["vsa"]
    boot = m["bootstrap"]
    assert abs(m["multiplier"] / 2.5 - 1) < 0.1 and boot["low"] <= m["multiplier"] <= boot["high"]
    assert boot["ratio"] == pytest.approx(boot["high"] / boot["low"]) and "seed spread" in boot["note"]
    timing = summary["timing"]
    assert timing["mode"] == "reduce-overhead" and timing["device"] == "NVIDIA H200"
    assert timing["clock"] == "synced" and any("a wait for the GPU after every step" in n for n in summary["notes"])
    assert timing["step_time_s"]["5M/full"] == pytest.approx(0.2) and timing["step_time_s"]["10M/vsa"] == 0.08
    g = summary["gpu_time"]["vsa"]
    # full: steps = C / 1e13 at 0.2 s; vsa: steps = C / 2.5e12 at ~0.08 s -> per FLOP VSA is 1.6x slower,
    # so 2.5x fewer FLOPs at equal loss is ~2.5 / 1.6 = 1.56x less GPU time
    assert abs(g["multiplier"] / (2.5 / 1.6) - 1) < 0.15 and g["bootstrap"]["low"] is not None
    write_report(rows_folder(tmp_path / "rows", rows), tmp_path / "out", n_bootstrap=50)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "GPU-time multiplier" in text and "on NVIDIA H200" in text and "seed spread" in text and "| sta |" in text
    assert "class acc | FD |" in text and "| 0.8 | 2.5 |" in text
    assert (tmp_path / "out" / "loss_vs_gpu_time.png").stat().st_size > 0


def test_step_times_of_two_clocks_are_never_mixed():
    """Rows timed with CUDA events and rows from before (a wait for the GPU after every step, no
    `step_clock`) on the same GPU: the table takes one clock, the one that times more
    configurations; on a tie, CUDA events."""
    def row(preset, attention, seconds, clock=None):
        r = {"preset": preset, "attention": attention, "sparsity": 0.875 if attention == "vsa" else None,
             "compile": "reduce-overhead", "device": "NVIDIA H100", "step_time_s": seconds}
        return r if clock is None else dict(r, step_clock=clock)

    old = [row("5M", "full", 0.060), row("5M", "vsa", 0.036), row("10M", "full", 0.10)]
    new = [row("5M", "full", 0.055, "cuda_events"), row("5M", "vsa", 0.021, "cuda_events")]
    assert timing_source(old + new, "reduce-overhead") == ("NVIDIA H100", "synced")
    assert step_time_table(old + new, "reduce-overhead") == pytest.approx(
        {("5M", "full"): 0.060, ("5M", "vsa"): 0.036, ("10M", "full"): 0.10})
    new.append(row("10M", "full", 0.095, "cuda_events"))
    assert timing_source(old + new, "reduce-overhead") == ("NVIDIA H100", "cuda_events")
    assert step_time_table(old + new, "reduce-overhead") == pytest.approx(
        {("5M", "full"): 0.055, ("5M", "vsa"): 0.021, ("10M", "full"): 0.095})
    summary_timing = summarize([dict(r, val_loss=0.1, flops=1e15, budget=1e15, steps=10, params=1, seed=0)
                                for r in old + new], n_bootstrap=1)["timing"]
    assert summary_timing["clock"] == "cuda_events" and summary_timing["device"] == "NVIDIA H100"


def test_timing_runs_time_every_configuration_on_one_gpu(tmp_path):
    """Result rows whose step times come from two GPUs (the 5M rows from one, the 10M rows from
    another) leave half the points out of the GPU-time comparison; timing rows (short runs of each
    configuration on one GPU) time all of them, and a `timings` folder beside `rows` is used by
    default. Timing rows that match no result row (another shape) are left out, and say so."""
    full = lambda c: 0.05 + 40.0 * c ** -0.1
    vsa = lambda c: full(2.5 * c)
    budgets = [1e15 * 2 ** i for i in range(5)]
    rows = _rows("full", full, budgets) + _rows("vsa", vsa, budgets)
    for r in rows:
        r.update(compile="reduce-overhead", steps=int(r["budget"] / (1e13 if r["attention"] == "full" else 2.5e12)),
                 device="NVIDIA H200" if r["preset"] == "5M" else "NVIDIA H100",
                 step_time_s=0.2 if r["attention"] == "full" else 0.08)
    own = summarize(rows, n_bootstrap=50)
    assert len(own["timing"]["step_time_s"]) == 2 and any("left out" in n for n in own["notes"])
    timing_rows = [dict(r, device="NVIDIA H100", step_time_s=(0.2 if r["attention"] == "full" else 0.08)
                        * (2 if r["preset"] == "10M" else 1), steps=150)
                   for r in rows if r["budget"] == budgets[0]]
    odd = dict(timing_rows[0], seq_len=4096, step_time_s=0.01)  # another shape: not a timing of these runs
    summary = summarize(rows, n_bootstrap=50, timings=timing_rows + [odd])
    timing = summary["timing"]
    assert timing["device"] == "NVIDIA H100" and timing["source"] == "timing runs (4)"
    assert timing["step_time_s"] == {"10M/full": 0.4, "10M/vsa": 0.16, "5M/full": 0.2, "5M/vsa": 0.08}
    assert not any("no step time measured" in n for n in summary["notes"])
    assert any("1 timing row(s) of a sequence length, batch or attention" in n for n in summary["notes"])
    assert summary["gpu_time"]["vsa"]["multiplier"] > 1

    folder = tmp_path / "sweep"
    rows_folder(folder / "rows", rows)
    rows_folder(folder / "timings", timing_rows)
    written = write_report(folder / "rows", tmp_path / "out", n_bootstrap=20)
    assert written["timing"]["source"] == "timing runs (4)"
    assert "over timing runs (4) in compile mode" in (tmp_path / "out" / "report.md").read_text()
    assert write_report(folder / "rows", tmp_path / "out2", n_bootstrap=20, timings="none")["timing"]["source"] \
        == "the result rows"
    with pytest.raises(FileNotFoundError, match="no timing rows under"):
        write_report(folder / "rows", tmp_path / "out3", n_bootstrap=20, timings=tmp_path / "nowhere")


def test_a_piece_launches_only_the_points_that_fit_its_time(tmp_path, monkeypatch):
    """vsa.scaling.piece on scaling_tiny (full attention: 2 sizes x 2 budgets): with step times
    that make the 0.6M points cost well under a second and the 2.3M ones 1,000 s a step, a
    200-second piece trains the two 0.6M points, each in its own launch, collects their rows and
    leaves the 2.3M points for a later piece; a second piece finds nothing new that fits."""
    from vsa.scaling.piece import choose, launch_overrides, main, run_piece, run_point, steps_done, with_progress
    from vsa.scaling.plan import point_key

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = tmp_path / "results"
    timed = results / "timing" / "rows"  # rows of another sweep at the same shape time the points
    timed.mkdir(parents=True)
    for preset, params, step_s in (("0.6M", 0.6e6, 0.001), ("2.3M", 2.3e6, 1000.0)):
        row = {"schema": 1, "preset": preset, "attention": "full", "budget": 1e10, "params": params,
               "steps": 10, "flops": 1e10, "step_time_s": step_s, "seq_len": 256, "global_batch": 4}
        (timed / f"{preset}.json").write_text(json.dumps(row))
    rows = results / "scaling_tiny" / "rows"
    dry = run_piece("scaling_tiny", 200, ["scaling.attentions=[full]"], rows_dir=rows,
                    log_dir=str(tmp_path / "logs"), overhead_s=0.0, results_dir=results, dry_run=True)
    assert [(p["preset"], status) for p, status, _ in dry["ran"]] == [("0.6M", None), ("0.6M", None)]
    assert find_rows(rows) == [] and not (tmp_path / "logs").exists()  # nothing launched
    piece = run_piece("scaling_tiny", 200, ["scaling.attentions=[full]"], rows_dir=rows,
                      log_dir=str(tmp_path / "logs"), overhead_s=0.0, results_dir=results)
    launched = [" ".join(p["overrides"][:3]) for p, status, _ in piece["ran"]]
    assert launched == ["model=0.6m attention=full scaling.budget=20000000000.0",
                        "model=0.6m attention=full scaling.budget=40000000000.0"]
    assert [status for _, status, _ in piece["ran"]] == [0, 0]
    assert sorted(r["preset"] for r in find_rows(rows)) == ["0.6M", "0.6M"]
    assert [p["preset"] for p in piece["left"]] == ["2.3M", "2.3M"]
    again = run_piece("scaling_tiny", 200, ["scaling.attentions=[full]"], rows_dir=rows,
                      log_dir=str(tmp_path / "fresh_logs"), overhead_s=0.0, results_dir=results)
    assert again["ran"] == [] and len(again["left"]) == 2  # the committed rows are restored and skipped
    # A run finished here by an earlier piece whose row is not in the rows folder (a fresh copy of
    # the code replaced it) is collected, not launched again.
    lost = sorted(rows.glob("*.json"))[0]
    lost.unlink()
    after = run_piece("scaling_tiny", 200, ["scaling.attentions=[full]"], rows_dir=rows,
                      log_dir=str(tmp_path / "logs"), overhead_s=0.0, results_dir=results)
    assert after["ran"] == [] and lost.is_file() and [p["preset"] for p in after["left"]] == ["2.3M", "2.3M"]
    # --partial: when nothing fits, the cheapest point is launched anyway (saved at the deadline).
    partial = run_piece("scaling_tiny", 200, ["scaling.attentions=[full]"], rows_dir=rows,
                        log_dir=str(tmp_path / "logs"), overhead_s=0.0, results_dir=results, dry_run=True,
                        partial=True)
    assert [(p["preset"], status) for p, status, _ in partial["ran"]] == [("2.3M", "partial")]
    # It gets what is left of the piece but the 30 s a stopped run has to save its checkpoint.
    assert 160 < partial["ran"][0][2] <= 170
    with pytest.raises(ValueError, match="stop time"):
        run_piece("scaling_tiny", 20, stop_s=20, rows_dir=rows, results_dir=results, dry_run=True)
    # A run stopped at an earlier deadline, its last.ckpt at step 1, is estimated for what is left.
    big, other = sorted(piece["left"], key=lambda p: -p["steps"])
    run = tmp_path / "logs" / "train" / "multiruns" / "scaling_tiny" / "stopped_run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save({"model": {"name": big["preset"]}, "attention": {"name": "full"},
                    "scaling": {"budget": big["budget"]}, "seed": 0}, run / ".hydra" / "config.yaml")
    OmegaConf.save(["model=2.3m", "attention=full"], run / ".hydra" / "overrides.yaml")
    torch.save({"global_step": 1}, run / "checkpoints" / "last.ckpt")
    done = steps_done(run.parent)
    assert done == {point_key(big["preset"], "full", big["budget"], 0): 1}  # finished runs are not listed
    resumed, untouched = with_progress([big, other], done, overhead_s=0.0)
    assert resumed["done_steps"] == 1 and untouched.get("done_steps") is None and big["steps"] > 1
    assert resumed["est_s"] == pytest.approx(big["est_s"] * (big["steps"] - 1) / big["steps"])
    assert untouched["est_s"] == other["est_s"]

    # One launch runs one point: each grid axis narrowed to the point's value, the grid replaced.
    point = {"overrides": ["model=20m", "attention=vsa", "scaling.multiple=8", "scaling.presets=[10m,20m]",
                           "seed=1"], "est_s": 100.0}
    assert launch_overrides(point) == ["scaling.presets=[20m]", "scaling.attentions=[vsa]",
                                       "scaling.multiples=[8]", "seed=1"]
    # Grid order skips what does not fit and takes a later, shorter point; unestimated points last.
    left = [{"name": "long", "est_s": 500.0}, {"name": "short", "est_s": 100.0},
            {"name": "new", "est_s": None}, {"name": "shorter", "est_s": 50.0}]
    assert choose(left, 200, 1.1)["name"] == "short"
    assert choose(left, 200, 1.1, order="cheapest")["name"] == "shorter"
    assert choose(left, 40, 1.1)["name"] == "new" and choose(left[:2], 40, 1.1) is None
    assert choose(left[:2], 40, 1.1, partial=True)["name"] == "short"  # nothing fits: the cheapest
    with pytest.raises(ValueError, match="order must be"):
        choose(left, 200, 1.1, order="random")
    # A launch still going at its deadline is stopped with SIGTERM.
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")
    sleeper.chmod(0o755)
    assert run_point("scaling_tiny", point, str(tmp_path), 1.0, str(sleeper), grace_s=5.0) == -15
    assert main(["iso_footge", "--seconds", "10"]) == 2  # names the sweeps there are


def test_the_plan_lists_what_is_left_of_a_sweep_and_what_it_costs(tmp_path):
    """vsa.scaling.plan on the committed iso_footage 5M rows (full at x1-x32, VSA at x1-x8): the
    grid's 32 points, the 8 5M points done, the rest estimated (the steps the sweep itself derives,
    times the step time measured for that model in any committed sweep of the same shape, else the
    nearest model's time per FLOP), and a session's worth of the cheapest ones."""
    from vsa.scaling.plan import plan

    # A frozen copy of the committed rows it reads (the sweeps grow, the test does not): the
    # footage 5M rows, and the shapes sweep's 5M-20M rows that time the other sizes.
    results = tmp_path / "results"
    for sweep, presets in (("iso_footage", ["5m"]), ("iso_shapes", ["5m", "10m", "20m"])):
        (results / sweep / "rows").mkdir(parents=True)
        for preset in presets:
            for path in (REPO / "docs" / "results" / sweep / "rows").glob(f"*model={preset},*.json"):
                if "seed=" not in path.name:  # first seeds only
                    shutil.copy(path, results / sweep / "rows")
    rows = results / "iso_footage" / "rows"
    result = plan("iso_footage", rows, minutes=20, overhead_s=45, results_dir=results)
    assert len(result["points"]) == 32 and result["rows"] == 10
    left = result["left"]
    assert len(left) == 24 and not [p for p in left if p["preset"] == "5M"]
    assert all(p["est_s"] > 45 for p in left)
    assert all(p["basis"].startswith("step time of") for p in left if p["preset"] in ("10M", "20M"))  # iso_shapes
    assert all(p["basis"].startswith("s/FLOP of the") for p in left if p["preset"] == "60M")
    for preset in ("10M", "20M", "60M"):  # more budget, more steps, more time
        for attention in ("full", "vsa"):
            mine = sorted((p for p in left if (p["preset"], p["attention"]) == (preset, attention)),
                          key=lambda p: p["budget"])
            assert len(mine) == 4 and [p["steps"] for p in mine] == sorted(p["steps"] for p in mine)
            assert [p["est_s"] for p in mine] == sorted(p["est_s"] for p in mine)
    point = next(p for p in result["points"] if p["overrides"][:3] == ["model=10m", "attention=vsa",
                                                                        "scaling.multiple=2"])
    cfg = compose_train(["sweep=iso_footage", "model=10m", "attention=vsa", "scaling.multiple=2"], tmp=str(tmp_path))
    assert point["steps"] == cfg.trainer.max_steps
    assert result["fits"] and result["fits_s"] <= 20 * 60
    assert max(p["est_s"] for p in result["fits"]) <= min(p["est_s"] for p in left if p not in result["fits"])
    # A second seed: every point is left; the 5M ones are timed from their own rows.
    again = plan("iso_footage", rows, overhead_s=45, extra=["seed=1"], results_dir=results)
    assert len(again["left"]) == 32
    assert all(p["basis"].startswith("step time of") for p in again["left"] if p["preset"] == "5M")
    only_h200 = plan("iso_footage", rows, overhead_s=45, device="H200", results_dir=results)  # H200 rows
    assert all(p["est_s"] is not None for p in only_h200["left"])
