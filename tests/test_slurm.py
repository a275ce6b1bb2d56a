"""SLURM on a real single-node cluster on localhost (tests/slurm_cluster.py, fixture in conftest):

- a 2-job sweep through `train.py -m hydra/launcher=slurm` (one job array, CPU, tiny model);
- preemption: one job of that sweep gets submitit's signal (SIGUSR2) from `scancel --signal`, is
  requeued (same job id, Restarts=1), resumes from its checkpoints/last.ckpt and ends with exactly
  the losses and weights of the other, uninterrupted job (same config);
- scripts/slurm/train.sbatch: trainer=ddp through srun on 1 node x 1 CPU task, requeued by its own
  trap when its batch shell gets SIGUSR2, resumed from last.ckpt.

Every wait is bounded; on any failure every job is cancelled (no slurmdbd here, so submitit could
not tell a job killed from outside from a running one and would wait forever).
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
# The tiny CPU recipe without validation, samples or EMA; a checkpoint every 5 steps.
COMMON = ["experiment=tiny", "trainer.accelerator=cpu", "trainer.precision=32-true",
          "data.datamodule.val_size=0", "callbacks.sample_videos=null", "callbacks.ema=null",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
          "callbacks.checkpoint.every_n_train_steps=5"]
# hydra/launcher=slurm on a CPU-only node: no GPUs, 1 CPU and 2 GB per task. A time limit of an
# hour, so that submitit classes the signal as a preemption (not a time-out).
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=60", "hydra.sweep.subdir=${hydra.job.num}"]


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    env = cluster.env
    bin_dir = str(Path(sys.executable).parent)  # `python` inside jobs = this interpreter
    return {**env, "PATH": os.pathsep.join([bin_dir, env["PATH"]]), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "VSA_ROOT": str(REPO),
            "PYTHON": sys.executable}


def csv_rows(run_dir: Path, column: str) -> list[dict[int, float]]:
    """One {step: value} per launch of the run (csv/version_N, N = 0, 1, ...)."""
    launches = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path, newline="") as f:
            launches.append({int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)})
    return launches


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def wait_for_jobs_to_end(cluster: SlurmCluster, timeout: float = 60) -> None:
    wait_until(lambda: not cluster.job_ids(), timeout, what="all jobs to end")


@dataclass
class SweepResult:
    returncode: int
    output: str
    folder: Path          # the sweep folder: <folder>/0 (reference) and <folder>/1 (preempted)
    job_ids: dict[int, str]
    infos: dict[int, dict]
    seconds: float
    signal_step: int      # global step of last.ckpt when the signal was sent

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "folder": str(self.folder)})

    @classmethod
    def from_json(cls, text: str) -> SweepResult:
        data = json.loads(text)
        return cls(**{**data, "folder": Path(data["folder"]),
                      "job_ids": {int(k): v for k, v in data["job_ids"].items()},
                      "infos": {int(k): v for k, v in data["infos"].items()}})


def run_preempted_sweep(cluster: SlurmCluster, workdir: Path) -> SweepResult:
    """A 2-point sweep of two identical runs (`+sweep_point=reference,preempted`); as soon as the
    second has written its first checkpoint it gets `scancel --signal=USR2`."""
    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / "logs" / "train" / "multiruns" / "tiny"
    command = [sys.executable, str(REPO / "train.py"), "-m", *LAUNCHER, *COMMON, "logger=many",
               "+sweep_point=reference,preempted"]
    start = time.monotonic()
    with open(workdir / "sweep.log", "w") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=job_env(cluster), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        ckpt = folder / "1" / "checkpoints" / "last.ckpt"
        wait_until(ckpt.is_file, 120, 0.2, what="the first checkpoint of sweep job 1")
        (task_folder,) = wait_until(lambda: list((folder / ".submitit").glob("*_1")), 30,
                                    what="submitit's folder of array task 1")
        job_id = task_folder.name
        signal_step = int(torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"])
        cluster.run("scancel", "--signal=USR2", job_id)
        proc.wait(timeout=240)
        wait_for_jobs_to_end(cluster)
    except BaseException:
        cluster.cancel_all()
        proc.kill()
        proc.wait(timeout=30)
        print((workdir / "sweep.log").read_text()[-5000:])
        raise
    job_ids = {0: job_id[:-1] + "0", 1: job_id}
    return SweepResult(returncode=proc.returncode, output=(workdir / "sweep.log").read_text()[-20000:],
                       folder=folder, job_ids=job_ids,
                       infos={i: cluster.job_info(j) for i, j in job_ids.items()},
                       seconds=time.monotonic() - start, signal_step=signal_step)


@pytest.fixture(scope="module")
def preempted_sweep(request, tmp_path_factory) -> SweepResult:
    """The sweep, run once per test session even with pytest-xdist (`-n 2`): the first worker
    that needs it runs it under a file lock and stores the result beside the workers' temp
    folders; another worker waits for the lock and reads it (and starts no cluster for it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    cache = shared / "slurm_preempted_sweep.json"
    with open(shared / "slurm_preempted_sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache.is_file():
            data = json.loads(cache.read_text())
            if "error" in data:
                pytest.fail(f"the shared SLURM sweep failed in another worker: {data['error']}")
            return SweepResult.from_json(cache.read_text())
        try:
            result = run_preempted_sweep(request.getfixturevalue("slurm_cluster"), shared / "slurm_sweep")
        except pytest.skip.Exception:
            raise
        except BaseException as exc:
            cache.write_text(json.dumps({"error": repr(exc)[:2000]}))
            raise
        cache.write_text(result.to_json())
        return result


def test_sweep_on_slurm_runs_both_jobs_and_collects_their_results(preempted_sweep):
    sweep = preempted_sweep
    assert sweep.returncode == 0, sweep.output[-5000:]
    print(f"2-job sweep with one requeue: {sweep.seconds:.1f} s")
    for index, point in ((0, "reference"), (1, "preempted")):
        run_dir = sweep.folder / str(index)
        assert f"+sweep_point={point}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert sweep.infos[index]["JobState"] == "COMPLETED", sweep.infos[index]
        assert final_state(run_dir)["global_step"] == STEPS
        losses = csv_rows(run_dir, "train/loss")
        assert losses and STEPS - 1 in losses[-1] and math.isfinite(losses[-1][STEPS - 1])
        assert losses[-1][STEPS - 1] < losses[0][0]
        log = (run_dir / "train.log").read_text()
        # One requeue mechanism: Lightning's SLURM auto-requeue handler is not installed.
        assert "SLURM auto-requeueing enabled" not in log
    # submitit's job array: one array job id, task 0 and task 1.
    assert sweep.infos[0]["ArrayJobId"] == sweep.infos[1]["ArrayJobId"]
    assert (sweep.infos[0]["ArrayTaskId"], sweep.infos[1]["ArrayTaskId"]) == ("0", "1")


def test_preempted_job_is_requeued_and_resumes_exactly(preempted_sweep):
    sweep = preempted_sweep
    assert sweep.returncode == 0, sweep.output[-5000:]
    reference, preempted = sweep.folder / "0", sweep.folder / "1"
    # The same job, requeued once; the other job ran through.
    assert sweep.infos[1]["Restarts"] == "1" and sweep.infos[0]["Restarts"] == "0"
    task_log = "".join(f.read_text() for f in (sweep.folder / ".submitit" / sweep.job_ids[1]).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in task_log and "this job is preempted" in task_log
    assert f"Requeued job {sweep.job_ids[1]}" in task_log

    # The second launch restored last.ckpt (at or after the step it had when signalled).
    log = (preempted / "train.log").read_text()
    assert f"Restoring states from the checkpoint path at {preempted / 'checkpoints' / 'last.ckpt'}" in log
    launches = csv_rows(preempted, "train/loss")
    assert len(launches) == 2
    resumed_from = min(launches[1])
    assert resumed_from >= sweep.signal_step and resumed_from % 5 == 0 and resumed_from < STEPS - 1
    print(f"signalled at checkpoint step {sweep.signal_step}, resumed at step {resumed_from}")

    # Same losses at every step (steps redone after the checkpoint included) and same weights.
    (whole,) = csv_rows(reference, "train/loss")
    assert sorted(whole) == list(range(STEPS))
    for launch in launches:
        assert {s: whole[s] for s in launch} == launch
    assert set(launches[0]) | set(launches[1]) == set(whole)
    a, b = final_state(reference), final_state(preempted)
    assert a["global_step"] == b["global_step"] == STEPS
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name

    # W&B (offline): both launches log to the run id stored in the run folder.
    run_id = (preempted / "wandb_run_id.txt").read_text().strip()
    offline = sorted((preempted / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)


def test_sbatch_script_runs_ddp_through_srun_and_requeues_itself(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    cpu = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G"]
    env = job_env(cluster)
    test_only = subprocess.run(["sbatch", "--test-only", *cpu, str(script)], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=30)
    assert test_only.returncode == 0, test_only.stderr

    submitted = subprocess.run(["sbatch", "--parsable", *cpu, str(script), *COMMON], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    # The run folder: tiny + the script's and COMMON's training overrides (vsa/run_name.py).
    checkpoints = (tmp_path / "logs" / "train" / "runs").glob
    output = tmp_path / f"slurm-vsa-train-{job_id}.out"
    start = time.monotonic()
    try:
        wait_until(lambda: any(checkpoints("tiny+*/checkpoints/last.ckpt")), 120, 0.2, what="the first checkpoint")
        (run_dir,) = (path.parents[1] for path in checkpoints("*/checkpoints/last.ckpt"))
        # --signal=B:USR2@120 delivers to the batch shell only; scancel does the same with --batch.
        cluster.run("scancel", "--batch", "--signal=USR2", job_id)
        wait_until(lambda: cluster.job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                         "TIMEOUT", "NODE_FAIL"),
                   240, what=f"job {job_id} to end")
    except BaseException:
        cluster.cancel_all()
        print(output.read_text()[-5000:] if output.is_file() else "no job output")
        raise
    seconds = time.monotonic() - start
    info = cluster.job_info(job_id)
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-5000:])
    print(f"sbatch job with one requeue: {seconds:.1f} s")
    assert "SIGUSR2: time limit or preemption notice (restart 0)" in text
    assert f"requeueing job {job_id}" in text and "DUE TO JOB REQUEUE" in text
    assert f"job {job_id} restart 1:" in text
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/1" in text  # trainer=ddp through srun
    assert "Restoring states from the checkpoint path" in text
    assert "srun exited with status 0" in text
    launches = csv_rows(run_dir, "train/loss")
    assert len(launches) == 2 and STEPS - 1 in launches[1] and math.isfinite(launches[1][STEPS - 1])
    assert final_state(run_dir)["global_step"] == STEPS


def test_scaling_sweep_runs_as_a_slurm_job_array(slurm_cluster, tmp_path):
    """`python train.py -m sweep=... hydra/launcher=slurm`: the scaling harness on SLURM, one job
    per point (full and vsa here), each writing its result row; a relaunch skips both."""
    env = job_env(slurm_cluster)
    launcher = [a for a in LAUNCHER if not a.startswith("hydra.sweep.subdir")]
    command = [sys.executable, str(REPO / "train.py"), "-m", "sweep=scaling_tiny", *launcher,
               "scaling.presets=[0.6m]", "scaling.budgets=[2e10]"]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    except BaseException:
        slurm_cluster.cancel_all()
        raise
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    folder = tmp_path / "logs" / "train" / "multiruns" / "scaling_tiny"
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*/result.json"))]
    assert sorted(r["attention"] for r in rows) == ["full", "vsa"]
    for row in rows:
        assert row["sweep"] == "scaling_tiny" and row["steps"] >= 1 and math.isfinite(row["val_loss"])
    assert len(list((folder / ".submitit").glob("*_[01]"))) == 2  # one array, tasks 0 and 1
    written = {p: p.read_text() for p in folder.glob("*/result.json")}
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert all(p.read_text() == text for p, text in written.items())  # finished points: skipped


def test_slurm_is_installed_only_when_asked(monkeypatch):
    """Without VSA_TEST_INSTALL_SLURM=1 a machine without SLURM skips these tests (with the
    reason) instead of apt-get installing it."""
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster, "_which", lambda name: None)
    monkeypatch.setattr(slurm_cluster, "_apt_install", lambda timeout: pytest.fail("apt-get was run"))
    monkeypatch.delenv("VSA_TEST_INSTALL_SLURM", raising=False)
    assert "set VSA_TEST_INSTALL_SLURM=1" in slurm_cluster.ensure_slurm()


def test_no_srun_warning_outside_a_slurm_job(tmp_path, monkeypatch):
    """SLURM installed (an `srun` on PATH) but train.py not run as a SLURM job: no Lightning hint
    about srun."""
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from vsa.training.run import quiet_known_noise

    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        assert not SLURMEnvironment.detect()
    assert not [w for w in caught if "srun" in str(w.message)]
