"""SLURM across nodes: a 3-node test cluster, each node a network namespace with its own address,
hostname and /etc/hosts, running its own slurmd, one slurmctld for all (tests/slurm_cluster.py,
NodeNetwork). Jobs take two of the nodes; DDP runs over gloo between them, found by node name as
on a real cluster:

- scripts/slurm/train.sbatch with --nodes=2, requeued by its own trap after its first checkpoint:
  it comes back, resumes from last.ckpt and ends with the weights of one process with the same
  global batch (and so of an uninterrupted run);
- `python train.py -m hydra/launcher=slurm trainer=ddp trainer.num_nodes=2`: the same weights;
- the scaling harness as a job array of 2-node jobs; the report reads its rows;
- a node killed mid-run (every process in its namespace, slurmd included): SLURM declares it
  down, requeues the job, which comes back on another node list (n[1,3]) and resumes from
  last.ckpt to the weights of one process (last: the cluster keeps a dead node).

Skipped where SLURM is missing (see tests/slurm_cluster.py) or network namespaces cannot be made
(no root, no `ip`), with the reason. Every wait is bounded; on failure every job is cancelled.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, ensure_slurm, namespaces_unavailable, start_cluster, wait_until
from test_slurm import csv_rows, final_state, job_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# The tiny CPU recipe without validation, samples or EMA; batch 2 per rank, a checkpoint every 3 steps.
RUN = ["experiment=tiny", "trainer.accelerator=cpu", "trainer.precision=32-true",
       "data.datamodule.val_size=0", "callbacks.sample_videos=null", "callbacks.ema=null",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
       f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=3"]
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=60"]
TWO_NODES = ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
             "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Three nodes for 2-node jobs (a third to come back on when one is lost)."""
    reason = ensure_slurm() or namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm3"), nodes=3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one process, no SLURM, the global batch of two ranks (4), STEPS steps."""
    folder = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    command = [sys.executable, str(REPO / "train.py"), *RUN, "data.datamodule.batch_size=4", "run_name=one"]
    result = subprocess.run(command, cwd=folder, env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return final_state(folder / "logs" / "train" / "runs" / "one")["state_dict"]


def assert_same_weights(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for key in reference:  # gradients summed over ranks in another order: float32 round-off
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


def finished(cluster: SlurmCluster, job_id: str) -> bool:
    return cluster.job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY")


def test_the_nodes_are_separate_hosts_that_find_each_other_by_name(two_nodes):
    result = two_nodes.run("srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                           'echo "$SLURM_NODEID $(hostname) $(getent hosts n1 | cut -d" " -f1)"', timeout=60)
    lines = sorted(result.stdout.split("\n")[:-1])
    first = two_nodes.network.address("n1")
    assert lines == [f"0 n1 {first}", f"1 n2 {first}"], result.stdout


def sbatch_two_nodes(cluster: SlurmCluster, folder: Path, interrupt, **env: str) -> tuple[dict, str, Path]:
    """train.sbatch on 2 nodes; `interrupt(job_id)` once its first checkpoint is written. Returns
    the job's final `scontrol show job` fields, its output and the run folder."""
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    options = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G"]
    submitted = subprocess.run(["sbatch", "--parsable", *options, str(script), *RUN, "data.datamodule.batch_size=2",
                                "run_name=two"], cwd=folder, env={**job_env(cluster), **env}, capture_output=True,
                               text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir = folder / "logs" / "train" / "runs" / "two"
    output = folder / f"slurm-vsa-train-{job_id}.out"
    start = time.monotonic()
    try:
        wait_until((run_dir / "checkpoints" / "last.ckpt").is_file, 180, 0.1, what="the first checkpoint")
        interrupt(job_id)
        wait_until(lambda: finished(cluster, job_id), 300, what=f"job {job_id} to end")
    except BaseException:
        cluster.cancel_all()
        print(output.read_text()[-5000:] if output.is_file() else "no job output")
        raise
    print(f"2-node sbatch job, interrupted once: {time.monotonic() - start:.1f} s")
    return cluster.job_info(job_id), output.read_text(), run_dir


def diagnosis(cluster: SlurmCluster, info: dict, text: str) -> str:
    """What a failed 2-node job leaves to read, whole (pytest shortens an assertion's values):
    its state, the nodes' states, the job's output and slurmctld's log."""
    fields = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode", "NodeList",
                                                      "RunTime"))
    nodes = cluster.run("sinfo", "-N", "-h", "-o", "%N %T %E", check=False).stdout
    return (f"job: {fields}\nnodes:\n{nodes}\n--- job output (tail) ---\n{text[-6000:]}\n"
            f"--- slurmctld.log (tail) ---\n{cluster.log('slurmctld', 6000)}")


def test_sbatch_on_two_nodes_requeues_resumes_and_trains_like_one_process(two_nodes, one_process, tmp_path):
    cluster = two_nodes
    # As the time limit's notice does: SIGUSR2 to the batch shell, whose trap requeues the job.
    info, text, run_dir = sbatch_two_nodes(
        cluster, tmp_path, lambda job_id: cluster.run("scancel", "--batch", "--signal=USR2", job_id))
    job_id = info["JobId"]
    if info.get("JobState") != "COMPLETED" or info.get("Restarts") != "1":
        pytest.fail(diagnosis(cluster, info, text), pytrace=False)
    assert f"job {job_id} restart 0: 2 node(s) x 1 task(s) on n[1-2]" in text
    assert f"job {job_id} restart 1: 2 node(s)" in text and "DUE TO JOB REQUEUE" in text
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert "Restoring states from the checkpoint path" in text and "srun exited with status 0" in text
    launches = csv_rows(run_dir, "train/loss")
    assert len(launches) == 2 and STEPS - 1 in launches[1] and math.isfinite(launches[1][STEPS - 1])
    state = final_state(run_dir)
    assert state["global_step"] == STEPS
    assert_same_weights(state["state_dict"], one_process)


def test_hydra_slurm_launcher_on_two_nodes_trains_like_one_process(two_nodes, one_process, tmp_path):
    command = [sys.executable, str(REPO / "train.py"), "-m", *LAUNCHER, *RUN, *TWO_NODES,
               "data.datamodule.batch_size=2", "hydra.sweep.subdir=${hydra.job.num}"]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=job_env(two_nodes), capture_output=True, text=True,
                                timeout=300)
    except BaseException:
        two_nodes.cancel_all()
        raise
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    folder = tmp_path / "logs" / "train" / "multiruns" / "tiny"
    (log,) = (folder / ".submitit").glob("*/*_0_log.out")
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log.read_text()
    state = final_state(folder / "0")
    assert state["global_step"] == STEPS
    assert_same_weights(state["state_dict"], one_process)


def test_scaling_sweep_of_two_node_jobs_and_its_report(two_nodes, tmp_path):
    env = job_env(two_nodes)
    command = [sys.executable, str(REPO / "train.py"), "-m", "sweep=scaling_tiny", *LAUNCHER, *TWO_NODES,
               "scaling.presets=[0.6m]", "scaling.budgets=[2e10]"]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    except BaseException:
        two_nodes.cancel_all()
        raise
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    folder = tmp_path / "logs" / "train" / "multiruns" / "scaling_tiny"
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*/result.json"))]
    assert sorted(r["attention"] for r in rows) == ["full", "vsa"]
    for log in (folder / ".submitit").glob("*/*_0_log.out"):
        assert "MEMBER: 1/2" in log.read_text()  # each point ran on two nodes
    report = subprocess.run([sys.executable, "-m", "vsa.scaling.report", str(folder), "--out", str(tmp_path / "r")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "2 runs" in (tmp_path / "r" / "report.md").read_text()


def test_a_node_lost_mid_run_comes_back_on_other_nodes_and_resumes(two_nodes, one_process, tmp_path):
    """Runs last: n2 stays down afterwards."""
    cluster = two_nodes
    info, text, run_dir = sbatch_two_nodes(cluster, tmp_path, lambda job_id: cluster.kill_node("n2"),
                                           LOST_NODE_WAIT_S="120")
    job_id = info["JobId"]
    if info.get("JobState") != "COMPLETED" or info.get("Restarts") != "1":
        pytest.fail(diagnosis(cluster, info, text), pytrace=False)
    assert f"job {job_id} restart 0: 2 node(s) x 1 task(s) on n[1-2]" in text
    assert "DUE TO NODE FAILURE" in text or "node(s) n2 lost" in text, text[-5000:]
    assert f"job {job_id} restart 1: 2 node(s) x 1 task(s) on n[1,3]" in text  # another node list
    ports = re.findall(rf"job {job_id} restart \d: .*\(port (\d+)\)", text)  # a rendezvous port per run
    assert len(ports) == 2 and ports[0] != ports[1], ports
    assert "Restoring states from the checkpoint path" in text and "srun exited with status 0" in text
    assert "down" in cluster.run("sinfo", "-h", "-n", "n2", "-o", "%T").stdout
    state = final_state(run_dir)
    assert state["global_step"] == STEPS
    assert_same_weights(state["state_dict"], one_process)
