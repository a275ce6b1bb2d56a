"""trainer=ddp with 2 CPU processes (gloo): train.py through Lightning's DDP launcher, which starts
rank 1 by re-running train.py's command line with the run folder of rank 0 (hydra.run.dir), and
the data sharding of the training sampler (per-device batches; same samples per step as one
process with the global batch)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vsa.training.data import ResumableSampler

REPO = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_fit_through_train_py(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    command = [sys.executable, str(REPO / "train.py"), "experiment=tiny", "trainer=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
               "data.datamodule.val_size=0", "callbacks.sample_videos=null",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "distributed_backend=gloo" in output

    # The run name holds the overrides that change training (vsa/run_name.py).
    run_dir = tmp_path / "logs" / "train" / "runs" / ("tiny+data.datamodule.val_size:0+trainer:ddp+"
                                                      "trainer.accelerator:cpu+trainer.devices:2+"
                                                      "trainer.precision:32-true")
    # Both ranks used the same run folder (no timestamp in it): rank 1 logged next to rank 0.
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # rank 0 logs only

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    (stream,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert stream["world_size"] == 2 and stream["batch_size"] == 4  # batch_size is per device
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(losses) == [0, 1, 2, 3] and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_stream_reads_the_global_batches_of_one_process(world_size):
    """batch_size is per device: N ranks with batch B/N read, at every step, exactly the B samples
    one process with batch B reads (scripts/multi_gpu_check.py relies on it)."""
    num_samples, global_batch, epochs = 48, 8, 3
    sampler = ResumableSampler(num_samples, global_batch, seed=3, rank=0, world_size=1)
    single = [i for _ in range(epochs) for i in sampler]  # one iter() per epoch
    shards = []
    for rank in range(world_size):
        sampler = ResumableSampler(num_samples, global_batch // world_size, seed=3, rank=rank,
                                   world_size=world_size)
        shards.append([i for _ in range(epochs) for i in sampler])
    per_rank = global_batch // world_size
    steps = len(single) // global_batch
    assert all(len(s) == steps * per_rank for s in shards)
    for step in range(steps):
        together = sorted(i for s in shards for i in s[step * per_rank:(step + 1) * per_rank])
        assert together == sorted(single[step * global_batch:(step + 1) * global_batch]), step


def _train(tmp_path: Path, name: str, *overrides: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    command = [sys.executable, str(REPO / "train.py"), "experiment=tiny", f"run_name={name}",
               "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=3",
               "data.datamodule.val_size=0", "callbacks.sample_videos=null", "callbacks.ema=null",
               "logger=csv", "trainer.enable_progress_bar=false", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    path = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def test_two_ranks_train_like_one_process_with_the_global_batch(tmp_path):
    """Per-sample noise/timestep/dropout seeds (by position in the global batch) + the sampler's
    sharding: 2 ranks x batch 2 reach the weights of 1 process x batch 4, up to summation order."""
    single = _train(tmp_path, "single", "data.datamodule.batch_size=4")
    ddp = _train(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", "data.datamodule.batch_size=2")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


# A tiny random diffusers Wan transformer (as tests/test_wan.py): 2 blocks, text width 32.
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


def _fsdp_worker(rank: int, world: int, port: int, queue, kind: str = "videodit") -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from vsa.models import build_model
    from vsa.training.fsdp import fsdp_block_classes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if kind == "wan":
            from vsa.models.wan import build_wan

            def build(**extra):
                torch.manual_seed(0)
                return build_wan(transformer=WAN_TINY, in_channels=4, tile=(2, 4, 4), sparsity=0.5, **extra)
        else:
            def build(**extra):
                torch.manual_seed(0)
                return build_model("0.6M", in_channels=4, attention="vsa", sparsity=0.5, depth=2, **extra)
        model = build(activation_checkpointing=True)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
        reference = build()
        reference.load_state_dict(model.state_dict())
        # As configs/trainer/fsdp.yaml: one FSDP unit per transformer block.
        sharded = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(fsdp_block_classes()),
                       device_id=torch.device("cpu"), use_orig_params=True)
        units = sum(isinstance(m, FSDP) for m in sharded.modules())
        assert units == 3, units  # the root + one per block (2 blocks)
        x = torch.randn(world, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.rand(world, generator=torch.Generator().manual_seed(2))
        cond = {}
        if kind == "wan":
            cond["text"] = torch.randn(world, 5, 32, generator=torch.Generator().manual_seed(3))

        def part(c: dict) -> dict:
            return {k: v[rank:rank + 1] for k, v in c.items()}

        sharded(x[rank:rank + 1], t[rank:rank + 1], **part(cond)).square().mean().backward()  # each rank: its sample
        reference(x, t, **cond).square().mean().backward()                                    # one process: both
        with FSDP.summon_full_params(sharded, with_grads=True):
            errors = [((a.grad - b.grad).norm() / b.grad.norm()).item()
                      for a, b in zip(sharded.parameters(), reference.parameters()) if b.grad.norm() > 0]
        queue.put((rank, max(errors), len(errors)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["videodit", "wan"])
def test_fsdp_with_activation_checkpointing_gives_the_gradients_of_one_process(kind):
    """FSDP (one unit per transformer block, as trainer=fsdp) over 2 gloo processes, with the
    model's activation checkpointing and the VSA backend: the gathered gradients equal one
    process's on the whole batch. Our VideoDiT, and a finetuned diffusers Wan (one unit per
    WanTransformerBlock). (Lightning's FSDPStrategy refuses the CPU; this is torch's FSDP directly.)"""
    if kind == "wan":
        pytest.importorskip("diffusers", reason="Wan needs diffusers (pip install -e '.[diffusers]')")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(rank, 2, port, queue, kind)) for rank in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _rank, worst, count in results:
        assert count > 30 and worst < 1e-4, worst
