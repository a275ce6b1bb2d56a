"""Training: train.py end to end, exact resume, W&B offline logs, dense -> VSA finetuning, the
sparsity schedule, atomic checkpoints and bad input. CPU, tiny models, a few steps each."""

from __future__ import annotations

import csv
import errno
import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa.config import RunStopped
from vsa.training import AtomicCheckpointIO, ConfigError, SparsitySchedule, load_init_weights, train
from vsa.training.data import ResumableLoader, ResumableSampler

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Two pytest workers share two cores: one thread each (more threads only contend).
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}

# A tiny, fast run: no validation, no sample videos, no EMA (the EMA has its own test below).
QUICK = ["experiment=tiny", "data.datamodule.val_size=0", "callbacks.sample_videos=null",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_train(tmp_path: Path, run_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"paths.log_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path / run_name}",
                                           f"run_name={run_name}", *overrides])


def run_train(tmp_path: Path, run_name: str, overrides: list[str]) -> dict[str, float]:
    return train(compose_train(tmp_path, run_name, overrides))


def csv_column(run_dir: Path, column: str) -> dict[int, float]:
    """step -> value of one metric in the run's CSV logs (one csv/version_N per launch)."""
    values: dict[int, float] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    values[int(row["step"])] = float(row[column])
    return values


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a complete record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                             for item in record.history.item})
    return rows


# ----------------------------------------------------------------------------- train.py

def test_tiny_experiment_fast_dev_run_through_train_py(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=tiny", "trainer.fast_dev_run=true",
         f"paths.log_dir={tmp_path}"],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Running in `fast_dev_run` mode" in output and "`Trainer.fit` stopped" in output
    run_dir = tmp_path / "train" / "runs" / "tiny+trainer.fast_dev_run:true"  # its own run folder
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # fast_dev_run saves nothing


def test_resume_continues_exactly_and_wandb_appends_to_the_same_run(tmp_path, monkeypatch):
    """6 steps in one go == 3 steps, stop, resume for 3 more: same losses, same final weights.
    The dataset holds 2 batches per epoch, so the resume lands mid-epoch after an epoch boundary.
    The split run also logs to W&B (offline): both launches append to one W&B run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = QUICK + ["data.datamodule.dataset.num_samples=8", "callbacks.ema=null",
                      "module.lr_schedule.total_steps=6", "module.lr_schedule.warmup_steps=2"]
    run_train(tmp_path, "whole", common + ["trainer.max_steps=6"])
    first = run_train(tmp_path, "split", common + ["trainer.max_steps=3", "logger=many"])
    second = run_train(tmp_path, "split", common + ["trainer.max_steps=6", "logger=many"])

    whole = csv_column(tmp_path / "whole", "train/loss")
    split = csv_column(tmp_path / "split", "train/loss")
    assert sorted(whole) == sorted(split) == list(range(6))
    assert [split[s] for s in range(6)] == [whole[s] for s in range(6)]
    assert whole[5] < whole[0]
    assert first["train/loss"] == whole[2] and second["train/loss"] == whole[5]
    ckpt_whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt_split = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt_split["global_step"] == 6
    for name, value in ckpt_whole["state_dict"].items():
        assert torch.equal(value, ckpt_split["state_dict"][name]), name

    # W&B: one run id stored in the run folder, two offline launches of it, metrics in both.
    run_id = (tmp_path / "split" / "wandb_run_id.txt").read_text().strip()
    launches = sorted(glob.glob(str(tmp_path / "split" / "wandb" / "offline-run-*")))
    assert len(launches) == 2 and all(p.endswith(run_id) for p in launches)
    logged = {}
    for launch in launches:
        for row in wandb_history(Path(launch) / f"run-{run_id}.wandb"):
            if "train/loss" in row:
                logged[row["trainer/global_step"]] = row["train/loss"]
    assert logged == pytest.approx(split, rel=1e-6)


def test_ema_validation_and_sample_videos(tmp_path, monkeypatch):
    """The full tiny recipe: EMA weights in the checkpoint, fixed-protocol validation, throughput
    and MFU logged, sample videos written at the validation steps and logged to W&B."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = run_train(tmp_path, "full", ["experiment=tiny", "logger=many",
                                           "trainer.enable_progress_bar=false"])
    run_dir = tmp_path / "full"
    assert set(csv_column(run_dir, "val/loss")) == {1, 3}  # after steps 2 and 4 (0-based step - 1)
    assert csv_column(run_dir, "val/loss_ema") == csv_column(run_dir, "val/loss")  # EMA weights, labelled
    assert metrics["val/loss"] > 0 and csv_column(run_dir, "train/sparsity")[0] == 0.5
    tokens = csv_column(run_dir, "perf/tokens_per_sec")
    mfu = csv_column(run_dir, "perf/mfu")
    assert tokens and all(v > 0 for v in tokens.values()) and all(0 < v < 1 for v in mfu.values())
    for step in (2, 4):
        folder = run_dir / "samples" / f"step_{step:07d}"
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "video_00.mp4", "video_01.mp4"]
    (launch,) = (run_dir / "wandb").glob("offline-run-*")
    want = {(s, k) for s in (2, 4) for k in ("samples/video", "samples/grid")}
    deadline = time.monotonic() + 60  # W&B's service writes the offline run file on its own clock
    while True:
        rows = wandb_history(next(launch.glob("run-*.wandb")))
        media = {(row["trainer/global_step"], key.split("/_type")[0]) for row in rows for key in row
                 if key.endswith("/_type")}
        if media == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert media == want
    assert len(list(launch.glob("files/media/videos/samples/*.mp4"))) == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and "current_model_state" in ckpt  # EMA in state_dict
    # the EMA callback's state under the key of Lightning's EMAWeightAveraging (runs saved before resume)
    assert ckpt["callbacks"]["EMAWeightAveraging"] == {"latest_update_step": 4}
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


# ----------------------------------------------------------------------------- finetuning

def test_vsa_finetune_adapts_a_dense_checkpoint(tmp_path):
    run_train(tmp_path, "dense", QUICK + ["attention=full", "trainer.max_steps=2"])
    dense_ckpt = tmp_path / "dense" / "checkpoints" / "last.ckpt"

    # "adapt" gates at sparsity 0: the finetuning model starts as the dense model exactly.
    cfg = compose_train(tmp_path, "check", ["experiment=tiny", "attention=vsa",
                                            "attention.options.gates=adapt"])
    from hydra.utils import instantiate

    from vsa.sampling import load_model
    dense, _ = load_model(dense_ckpt)
    sparse = instantiate(cfg.model, in_channels=3)
    fresh = load_init_weights(sparse, dense_ckpt)
    assert fresh and all(".attn.backend.gate_proj." in name for name in fresh)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make attention matter: the 2-step model is close to its zero init
        for name, p in dense.named_parameters():
            delta = 0.1 * torch.randn(p.shape, generator=gen)
            p.add_(delta)
            sparse.get_parameter(name).add_(delta)
    sparse.eval().sparsity = 0.0
    x, t = torch.randn(2, 3, 4, 16, 16, generator=gen), torch.tensor([0.3, 0.8])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, t, labels), dense(x, t, labels), atol=1e-5, rtol=1e-5)
        sparse.sparsity = 0.5
        assert not torch.allclose(sparse(x, t, labels), dense(x, t, labels), atol=1e-3)

    # The experiment itself: dense weights in, sparsity staircase 0 -> 0.25 -> 0.5.
    run_train(tmp_path, "finetune", [
        "experiment=vsa_finetune", f"init_from={dense_ckpt}", "model=0.6m", "logger=csv",
        "data.datamodule.dataset.num_samples=64", "data.datamodule.dataset.frames=4",
        "data.datamodule.dataset.height=16", "data.datamodule.dataset.width=16",
        "data.datamodule.batch_size=4", "data.datamodule.num_workers=0", "data.datamodule.val_size=0",
        "data.codec.name=identity", "data.codec.factor=null", "attention.sparsity=0.5",
        "callbacks.sparsity_schedule.increment=0.25", "callbacks.sparsity_schedule.interval=2",
        "callbacks.sample_videos=null", "trainer.max_steps=5", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "module.lr_schedule.warmup_steps=1"])
    sparsity = csv_column(tmp_path / "finetune", "train/sparsity")
    assert [sparsity[s] for s in range(5)] == [0.0, 0.0, 0.25, 0.25, 0.5]


def test_sparsity_schedule_is_a_staircase():
    schedule = SparsitySchedule(target=0.875, increment=0.25, interval=100)
    assert [schedule.value(s) for s in (0, 99, 100, 250, 300, 399, 400, 10_000)] == \
        [0.0, 0.0, 0.25, 0.5, 0.75, 0.75, 0.875, 0.875]
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        SparsitySchedule(target=1.0, increment=0.1, interval=10)
    with pytest.raises(ValueError, match="interval"):
        SparsitySchedule(target=0.5, increment=0.1, interval=0)


# ----------------------------------------------------------------------------- data stream

def test_resumable_sampler_continues_the_stream_at_any_batch():
    def stream(sampler, epochs):
        return [i for _ in range(epochs) for i in sampler]

    full = stream(ResumableSampler(10, 3, seed=1), 3)  # 3 whole batches (9 samples) per epoch
    assert len(full) == 27 and full[:9] != sorted(full[:9]) and full[:9] != full[9:18]
    for start in range(9):
        resumed = ResumableSampler(10, 3, seed=1, start_batch=start)
        assert stream(resumed, 4)[: 27 - 3 * start] == full[3 * start:]
    ranks = [list(ResumableSampler(10, 2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])

    loader = ResumableLoader(list(range(10)), batch_size=3, sampler=ResumableSampler(10, 3, seed=1))
    saved = loader.state_dict()
    loader.load_state_dict(saved)  # the same stream: silent
    with pytest.warns(UserWarning, match="reads other batches"):
        loader.load_state_dict({**saved, "seed": 2})


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(RunStopped, match=r"no space left to write .*last.ckpt \(No space left on device\); "
                                         r"the previous last.ckpt is intact.*relaunch"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def nan_at_calls(monkeypatch, calls: set[int]) -> None:
    """Make the training loss NaN (keeping its graph) on the given calls, counted from 0."""
    import vsa.training.module as module

    real, count = module.flow_matching_loss, [0]

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        count[0] += 1
        return value * float("nan") if count[0] - 1 in calls else value

    monkeypatch.setattr(module, "flow_matching_loss", loss)


def test_a_nonfinite_loss_stops_the_run_without_saving_it(tmp_path, monkeypatch):
    """Default: the NaN at step 3 is found on the next logged step (no per-step host sync); the
    run stops naming that step and last.ckpt, which still holds step 2 and finite weights."""
    from vsa.config import RunStopped

    nan_at_calls(monkeypatch, {3})
    with pytest.raises(RunStopped, match=r"NaN or inf at step 3 \(found at step 4.*stopped without "
                                         r"saving.*nan/checkpoints/last.ckpt"):
        run_train(tmp_path, "nan", QUICK + ["trainer.max_steps=8", "trainer.log_every_n_steps=2",
                                            "callbacks.checkpoint.every_n_train_steps=2", "logger=csv"])
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_nonfinite_loss_is_skipped_and_counted_when_asked(tmp_path, monkeypatch):
    nan_at_calls(monkeypatch, {1, 3})
    run_train(tmp_path, "skip", QUICK + ["trainer.max_steps=6", "module.nonfinite_loss=skip",
                                         "trainer.log_every_n_steps=1", "logger=csv"])
    ckpt = torch.load(tmp_path / "skip" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert csv_column(tmp_path / "skip", "train/skipped_steps") == {0: 0.0, 1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0}
    with pytest.raises(ConfigError, match=r"nonfinite_loss must be one of \('stop', 'skip'\), got 'ignore'"):
        run_train(tmp_path, "bad", QUICK + ["module.nonfinite_loss=ignore"])


KILLED_MID_WRITE = """
import os, sys, time, torch
sys.path.insert(0, "tests")
from test_train import QUICK, compose_train
from vsa.training import train
real, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint: half its bytes, then hang until killed
        f.write(b"PK" + os.urandom(5000)); f.flush(); os.fsync(f.fileno())
        print("WRITING", flush=True); time.sleep(600)
    return real(obj, f, *args, **kwargs)
torch.save = save
train(compose_train(__import__("pathlib").Path(sys.argv[1]), "k", QUICK + sys.argv[2:]))
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing last.ckpt (step 4): the previous last.ckpt (step 2) is
    intact, the relaunch resumes from it, and the killed write's partial file is removed."""
    import signal

    overrides = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2", "logger=csv"]
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path), *overrides],
                               cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("WRITING"):
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert output[-1].startswith("WRITING"), "".join(output)[-3000:]
    folder = tmp_path / "k" / "checkpoints"
    assert [p.name for p in folder.glob(".last.ckpt.*.tmp")]  # the killed write's file
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    run_train(tmp_path, "k", QUICK + overrides)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------- bad input

def test_bad_input_gives_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data: video folder .*nowhere does not exist"):
        run_train(tmp_path, "a", ["data=videos", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"missing mandatory value\(s\): data.root"):
        run_train(tmp_path, "b", ["data=videos"])
    with pytest.raises(ConfigError, match=r"model: sparsity must lie in \[0, 1\) .* got 1.0"):
        run_train(tmp_path, "c", ["experiment=tiny", "attention.sparsity=1.0"])
    with pytest.raises(ConfigError, match=r"unknown model preset '7B'"):
        run_train(tmp_path, "d", ["experiment=tiny", "model.name=7B"])
    with pytest.raises(ConfigError, match=r"missing mandatory value\(s\): init_from"):
        run_train(tmp_path, "e", ["experiment=vsa_finetune"])
    with pytest.raises(ConfigError, match=r"compile_mode must be one of .*got 'fast'"):
        run_train(tmp_path, "f", ["experiment=tiny", "module.compile_mode=fast"])
    with pytest.raises(ConfigError, match=r"kernel_options: no field nope; the fields are tma, "):
        run_train(tmp_path, "g", ["experiment=tiny", "+kernel_options.nope=1"])
    with pytest.raises(ConfigError, match=r"kernel_options: gluon_stages must be None \(by head dim\) or 1-4"):
        run_train(tmp_path, "h", ["experiment=tiny", "+kernel_options.gluon_stages=9"])

    result = subprocess.run([sys.executable, "train.py", "experiment=tiny", "attention.sparsity=-0.1",
                             f"paths.log_dir={tmp_path}"], cwd=REPO, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "model: sparsity must lie in [0, 1) (0 = dense), got -0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_kernel_options_hold_while_the_run_trains_and_are_restored(tmp_path, monkeypatch):
    """`+kernel_options.X=...` are the options in force during fit (seen from inside a training
    step) and the previous ones after; they do not name the run (speed and rounding only)."""
    from vsa.ops import current_kernel_options
    from vsa.training.module import VideoDiffusionModule

    seen = []
    step = VideoDiffusionModule.training_step

    def spy(self, *args, **kwargs):
        seen.append(current_kernel_options())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(VideoDiffusionModule, "training_step", spy)
    before = current_kernel_options()
    run_train(tmp_path, "k", QUICK + ["+kernel_options.interpreter_units=1", "+kernel_options.gluon_fwd=true"])
    assert seen and all(o.interpreter_units == 1 and o.gluon_fwd for o in seen)
    assert current_kernel_options() == before


def test_throughput_is_read_on_logged_steps_only(tmp_path):
    """TrainingSpeed reads the clock (a CUDA sync on GPUs) only on the steps Lightning logs: with
    log_every_n_steps=3 the perf metrics appear on exactly those steps, with positive rates."""
    run_train(tmp_path, "speed", ["experiment=tiny", "trainer.max_steps=12", "trainer.log_every_n_steps=3",
                                  "trainer.val_check_interval=12", "callbacks.sample_videos=null",
                                  "trainer.enable_progress_bar=false"])
    losses = csv_column(tmp_path / "speed", "train/loss")
    tokens = csv_column(tmp_path / "speed", "perf/tokens_per_sec")
    assert sorted(losses) == [2, 5, 8, 11]
    assert tokens and set(tokens) <= set(losses) and all(v > 0 for v in tokens.values())
    # A window longer than the run (10 readings): the last interval's rates, from the second
    # logged step on (the first interval holds the start-up).
    run_train(tmp_path, "long", ["experiment=tiny", "trainer.max_steps=12", "trainer.log_every_n_steps=3",
                                 "trainer.val_check_interval=12", "callbacks.sample_videos=null",
                                 "trainer.enable_progress_bar=false", "callbacks.speed.window_size=10"])
    tokens = csv_column(tmp_path / "long", "perf/tokens_per_sec")
    assert sorted(tokens) == [5, 8, 11] and all(v > 0 for v in tokens.values())
    assert sorted(csv_column(tmp_path / "long", "perf/step_time")) == [5, 8, 11]


def test_the_ema_update_reads_its_step_counter_once_and_averages_as_torch(monkeypatch):
    """`NoWaitAveragedModel` (the EMA callback's) keeps torch's AveragedModel arithmetic and state
    dict, but reads its step counter, a tensor on the model's device, only at the first update
    after it is made or loaded: torch's reads it twice per update, each read a wait for the GPU."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from vsa.training.callbacks import NoWaitAveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ours = NoWaitAveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    reads = []
    for name in ("__bool__", "__int__", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, real=real, name=name: (
            reads.append(name) if t is ours.n_averaged else None, real(t))[1])

    def train_a_little():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # moves the batch-norm running statistics (buffers)

    for _ in range(5):
        train_a_little()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert reads == ["__int__"] and int(ours.n_averaged) == 5
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # loaded (a resumed run): the counter is read once more, and the average goes on, not restarts
    resumed = NoWaitAveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    resumed.load_state_dict(ours.state_dict())
    ours = resumed
    reads.clear()
    for _ in range(2):
        train_a_little()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert reads == ["__int__"]
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_run_begun_with_lightnings_ema_class_resumes(tmp_path):
    """Runs recorded with `callbacks.ema._target_: lightning.pytorch.callbacks.EMAWeightAveraging`
    (before `vsa.training.callbacks.EMA`) resume: the target is in run_name_ignores."""
    overrides = ["experiment=tiny", "callbacks.sample_videos=null", "trainer.enable_progress_bar=false",
                 "callbacks.sample_quality=null"]
    run_train(tmp_path, "ema_run", overrides + ["trainer.max_steps=2"])
    recorded = tmp_path / "ema_run" / ".hydra" / "config.yaml"
    text = recorded.read_text()
    assert "_target_: vsa.training.callbacks.EMA\n" in text
    old_target = "lightning.pytorch.callbacks.EMAWeightAveraging\n"
    recorded.write_text(text.replace("vsa.training.callbacks.EMA\n", old_target))
    run_train(tmp_path, "ema_run", overrides + ["trainer.max_steps=4"])
    assert torch.load(tmp_path / "ema_run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_the_training_step_logs_tensors_only(tmp_path, monkeypatch):
    """Lightning turns a logged Python number into a device tensor by a copy from the host, which
    waits for the GPU: everything the training step logs at every step is a tensor already (the
    tiny recipe is a VSA model, so its sparsity is logged too)."""
    from vsa.training.module import VideoDiffusionModule

    seen = []
    log = VideoDiffusionModule.log

    def spy(self, name, value, *args, **kwargs):
        if self._current_fx_name == "training_step":
            seen.append((name, type(value)))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(VideoDiffusionModule, "log", spy)
    run_train(tmp_path, "logged", QUICK + ["trainer.max_steps=3"])
    assert {name for name, _ in seen} == {"train/loss", "train/sparsity"} and len(seen) == 6
    assert all(issubclass(kind, torch.Tensor) for _, kind in seen)


def test_labels_are_range_checked_on_the_cpu_and_never_read_on_the_device():
    """A label past the model's classes is refused before the batch moves to the device, in one
    line naming the fix. On the device the labels are not read: a read (`int(labels.max())`) makes
    the host wait for all the GPU work queued before it, the previous step, at every step. Labels on
    the meta device, which cannot be read at all, go through `condition` untouched."""
    from vsa.models import build_model
    from vsa.training.module import VideoDiffusionModule

    module = VideoDiffusionModule(build_model("0.6M", in_channels=3, num_classes=4))
    bad = {"video": torch.zeros(2, 3, 4, 8, 8), "label": torch.tensor([1, 4])}
    with pytest.raises(ValueError, match=r"^label 4 >= num_classes 4; set data.num_classes"):
        module.on_before_batch_transfer(bad, 0)
    with pytest.raises(ValueError, match=r"^label 4 >= num_classes 4"):
        module.condition(bad)
    good = {"video": torch.zeros(2, 3, 4, 8, 8), "label": torch.tensor([3, -1])}
    assert module.on_before_batch_transfer(good, 0) is good
    assert module.condition(good)["labels"].tolist() == [3, 4]  # -1 -> the null class
    on_device = module.condition({"label": torch.tensor([1, -1, 9], device="meta")})["labels"]
    assert on_device.device.type == "meta" and on_device.shape == (3,)


# ----------------------------------------------------------------------------- run folders

def test_run_names_come_from_the_overrides_that_change_training():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from vsa.run_name import run_name_from_overrides

    ignores = OmegaConf.load(CONFIGS / "train.yaml").run_name_ignores
    name = run_name_from_overrides  # noqa: N806
    assert name("default", [], ignores) == "default"
    assert name("default", ["trainer.max_steps=20", "logger=csv", "paths.log_dir=/tmp/x",
                            "hydra/launcher=slurm", "ckpt_path=null", "trainer.enable_progress_bar=false",
                            "logger.wandb.mode=online", "callbacks.sample_videos=null"], ignores) == "default"
    full = name("default", ["attention=full", "trainer.max_steps=20"], ignores)
    assert full == "default+attention:full"
    assert name("default", ["model=2.3m", "attention=full"], ignores) == \
        name("default", ["attention=full", "model=2.3m"], ignores) == "default+attention:full+model:2.3m"
    assert name("tiny", ["module.optimizer.lr=3e-4", "seed=1"], ignores) == "tiny+module.optimizer.lr:3e-4+seed:1"
    weird = name("default", ["+init_from=logs/train/runs/x/checkpoints/last.ckpt", "data.codec.factor=[1,2,2]",
                             "model.name=" + "a" * 200], ignores)
    assert "/" not in weird and "," not in weird and "=" not in weird and len(weird) <= 120
    # A run folder is a plain value on the command line: sample.py ckpt_path=logs/train/runs/<name>.
    (override,) = OverridesParser.create().parse_overrides([f"ckpt_path=logs/train/runs/{weird}/last.ckpt"])
    assert override.value() == f"logs/train/runs/{weird}/last.ckpt"


def test_relaunch_resumes_refuses_another_config_and_leaves_a_finished_run_alone(tmp_path, caplog):
    common = QUICK + ["callbacks.ema=null", "logger=csv", "module.optimizer.lr=1e-3"]
    run_train(tmp_path, "r", common + ["trainer.max_steps=2"])
    config = tmp_path / "r" / ".hydra" / "config.yaml"
    recorded = config.read_text()

    with pytest.raises(ConfigError, match=r"run folder .*r holds a run trained with another config "
                                          r"\(model.name: 0.6M -> 2.3M.*run_name=NEW_NAME.*ckpt_path=null"):
        run_train(tmp_path, "r", common + ["trainer.max_steps=4", "model=2.3m"])
    with pytest.raises(ConfigError, match=r"module.optimizer.lr: 0.001 -> 0.0003"):
        run_train(tmp_path, "r", common + ["trainer.max_steps=4", "module.optimizer.lr=3e-4"])
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_train(tmp_path, "r", common + ["trainer.max_steps=2", "trainer.log_every_n_steps=2"]) == {}
    assert "finished (step 2 of trainer.max_steps=2); nothing to train" in caplog.text
    assert config.read_text() == recorded and len(list((tmp_path / "r" / "csv").iterdir())) == 1

    run_train(tmp_path, "r", common + ["trainer.max_steps=3"])  # a larger max_steps extends the run
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "max_steps: 3" in config.read_text()


def test_checkpoint_and_value_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path: checkpoint .*nowhere.ckpt does not exist"):
        run_train(tmp_path, "a", QUICK + [f"ckpt_path={tmp_path / 'nowhere.ckpt'}"])
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(1000))
    with pytest.raises(ConfigError, match=r"noise.ckpt is not a readable checkpoint") as err:
        run_train(tmp_path, "a", QUICK + [f"ckpt_path={tmp_path / 'noise.ckpt'}"])
    assert "weights_only" not in str(err.value)
    run_train(tmp_path, "small", QUICK + ["trainer.max_steps=1", "callbacks.ema=null", "logger=csv"])
    with pytest.raises(ConfigError, match=r"ckpt_path: .*small/checkpoints/last.ckpt holds another model "
                                          r"\(width: 128 -> 256.*ckpt_path=null"):
        run_train(tmp_path, "big", QUICK + ["model=2.3m", f"ckpt_path={tmp_path / 'small'}"])
    with pytest.raises(ConfigError, match=r"seed must be an integer, got 'abc'"):
        run_train(tmp_path, "b", QUICK + ["seed=abc"])
    with pytest.raises(ConfigError, match=r"module.optimizer.lr must be a positive number, got -0.001"):
        run_train(tmp_path, "c", QUICK + ["module.optimizer.lr=-1e-3"])
    if not torch.cuda.is_available():  # vsa_1b: refused before its 1.4B model is built
        with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu but this machine has no CUDA GPU"):
            run_train(tmp_path, "d", ["experiment=vsa_1b"])
    assert not (tmp_path / "d").exists()


def test_a_damaged_last_checkpoint_falls_back_or_stops_touching_nothing(tmp_path):
    """Resuming (ckpt_path=last) from a truncated last.ckpt: with save_top_k keeping step files,
    the run resumes from the newest intact one and says so; with nothing else, one line names the
    file and no file changes."""
    keep = ["trainer.log_every_n_steps=1", "logger=csv", "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.checkpoint.save_top_k=-1", "+callbacks.checkpoint.filename='{step}'"]
    run_train(tmp_path, "kept", QUICK + keep + ["trainer.max_steps=4"])
    folder = tmp_path / "kept" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (folder / "step=4.ckpt").write_bytes(b"not a checkpoint")
    run_train(tmp_path, "kept", QUICK + keep + ["trainer.max_steps=6"])  # resumes from step=2.ckpt
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert sorted(csv_column(tmp_path / "kept", "train/loss")) == [0, 1, 2, 3, 4, 5]  # 2, 3 twice

    run_train(tmp_path, "alone", QUICK + ["trainer.max_steps=2", "logger=csv"])
    last = tmp_path / "alone" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "alone").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"ckpt_path=last: .*alone/checkpoints/last.ckpt is damaged "
                                          r"\(.*\) and the run folder holds no other intact checkpoint; "
                                          r"no file was changed"):
        run_train(tmp_path, "alone", QUICK + ["trainer.max_steps=4", "logger=csv"])
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "alone").rglob("*") if p.is_file()}
    assert after == before


def test_a_dead_data_loader_worker_stops_the_run_in_one_line_and_it_resumes(tmp_path, monkeypatch):
    """A worker killed (SIGKILL, as the OOM killer does) mid-run: RunStopped names the step and what
    last.ckpt holds; the same command then resumes and finishes."""
    import signal

    from vsa.config import RunStopped
    from vsa.data.synthetic import SyntheticVideoDataset

    real, calls = SyntheticVideoDataset.__getitem__, [0]

    def getitem(self, index):
        if torch.utils.data.get_worker_info() is not None:  # in the worker process
            calls[0] += 1
            if calls[0] > 40:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, index)

    monkeypatch.setattr(SyntheticVideoDataset, "__getitem__", getitem)
    command = QUICK + ["trainer.max_steps=30", "data.datamodule.num_workers=1", "logger=csv",
                       "callbacks.checkpoint.every_n_train_steps=2"]
    with pytest.raises(RunStopped, match=r"a data-loader worker died at step \d+ \(DataLoader worker .*killed "
                                         r"by signal.*\); .*w/checkpoints/last.ckpt holds step \d+\. Relaunch"):
        run_train(tmp_path, "w", command)
    saved = torch.load(tmp_path / "w" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved < 30
    monkeypatch.undo()
    run_train(tmp_path, "w", command)
    assert torch.load(tmp_path / "w" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30


@pytest.mark.parametrize("name,group,workers", [("SIGINT", False, 0), ("SIGTERM", True, 1)])
def test_a_stop_signal_saves_the_step_it_reached(tmp_path, name, group, workers):
    """SIGINT (Ctrl-C) or SIGTERM mid-run: the run stops after the step in flight, writes
    last.ckpt of that step (not the periodic one, every 1000 steps here) and exits with status
    128 + the signal. SIGTERM goes to the whole process group, data-loader worker included, as
    `timeout` and SLURM send it: the worker must not die of it before the step is saved."""
    import signal
    import time

    signum = getattr(signal, name)
    command = [sys.executable, "train.py", "experiment=tiny", "trainer.max_steps=100000",
               "callbacks.checkpoint.every_n_train_steps=1000", "trainer.val_check_interval=1000",
               f"data.datamodule.num_workers={workers}",
               "logger=csv", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=group)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Run folder" in line:
                break
        time.sleep(4)  # a few steps (~0.1 s each)
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output
    ckpt = torch.load(tmp_path / "train" / "runs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    step = ckpt["global_step"]
    assert 0 < step < 1000
    assert f"Stopped by {name} at step {step}:" in output


@pytest.mark.slow
def test_readme_commands_after_the_first_run_do_what_the_readme_says(tmp_path):
    """README "Train and sample", as a new user types it after the set-up's `python train.py`:
    each command, in order, with logs in a temporary folder and 4 training steps
    (trainer.max_steps does not name a run, so the folders are the README's)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Train and sample", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.startswith("python ")]
    assert len(commands) >= 5
    logs = tmp_path / "logs"

    def run(line: str) -> tuple[subprocess.CompletedProcess, str]:
        command, _, comment = line.partition("#")
        args = command.replace("logs/", f"{logs}/").split()[1:]
        args = [a for a in args if not a.startswith("trainer.max_steps=")]
        if args[0] == "train.py":
            args += ["trainer.max_steps=4", "trainer.enable_progress_bar=false"]
        result = subprocess.run([sys.executable, *args, f"paths.log_dir={logs}"], cwd=REPO, env=SUBPROCESS_ENV,
                                capture_output=True, text=True, timeout=300)
        return result, comment.strip()

    def last_step(run_name: str) -> int:
        path = logs / "train" / "runs" / run_name / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=True, mmap=True)["global_step"]

    first, _ = run("python train.py")  # the set-up command's run
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_step("default") == 4
    config = (logs / "train" / "runs" / "default" / ".hydra" / "config.yaml").read_text()
    again, _ = run("python train.py")  # "relaunching the same command resumes": finished here
    assert again.returncode == 0 and "finished (step 4 of trainer.max_steps=4)" in again.stdout + again.stderr
    assert (logs / "train" / "runs" / "default" / ".hydra" / "config.yaml").read_text() == config

    for line in commands:
        result, comment = run(line)
        output = result.stdout + result.stderr
        if "GPU only" in comment and not torch.cuda.is_available():
            assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
            assert "has no CUDA GPU" in output
        else:
            assert result.returncode == 0, f"{line}\n{output[-3000:]}"
        if line.startswith("python train.py") and "->" in comment:
            assert last_step(comment.split("logs/train/runs/")[1].split()[0]) == 4, line
        if line.startswith("python sample.py"):
            assert "s per video" in result.stdout
    outputs = sorted((logs / "sample").iterdir())
    assert len(outputs) == sum(line.startswith("python sample.py") for line in commands)
    assert all((out / "grid.png").is_file() for out in outputs)
    trained = sorted(p.parents[1].name for p in (logs / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    assert trained == ["default", "default+attention:full", "tiny"]


def test_progress_bar_counts_steps_across_a_resume(tmp_path):
    """After a resume the bar reads global_step / max_steps (not "batch/?"), and its rate counts
    only this launch's steps (tqdm's `initial` is the restored step)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from vsa.training.callbacks import StepProgressBar

    seen = {}

    class Look(L.Callback):
        def on_train_end(self, trainer, pl_module):
            bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
            seen.update(n=bar.n, total=bar.total, initial=bar.initial)

    def fit(max_steps, ckpt_path=None):
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[StepProgressBar(refresh_rate=1), Look()], default_root_dir=tmp_path,
                            limit_val_batches=0, accelerator="cpu")
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return trainer

    trainer = fit(3)
    assert seen == {"n": 3, "total": 3, "initial": 0}
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    fit(7, ckpt_path=tmp_path / "step3.ckpt")
    assert seen == {"n": 7, "total": 7, "initial": 3}
