"""The training step under the real Lightning trainer on a GPU (skipped without CUDA): no host
waits for the GPU inside a step (docs/perf_notes.md, "Waits for the GPU inside the training step")."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_train import compose_train

import vsa.training.run as run_module
from vsa.scaling.result import RunRecorder
from vsa.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host waits are a GPU matter)"),
]


class NoWaitInsideSteps(Callback):
    """Turns CUDA's sync debug mode to "error" from the start of each training step (after the
    first `from_step` ones: compilation and CUDA-graph recording; before the last, whose end the
    run recorder copies the raw weights to the CPU at) to its end, after every other callback's
    end-of-step work (EMA update, the run recorder): any host read of a GPU tensor in between
    raises."""

    def __init__(self, from_step: int) -> None:
        self.from_step, self.steps_checked = from_step, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.from_step <= trainer.global_step < trainer.max_steps - 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.steps_checked += 1


@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, monkeypatch, compile_mode):
    """The default callbacks (EMA included) and a sweep's run recorder, 12 steps of the tiny
    recipe, no logging, validation or checkpoint inside the checked steps."""
    guard = NoWaitInsideSteps(from_step=4)
    build = run_module.build_callbacks
    monkeypatch.setattr(run_module, "build_callbacks", lambda cfg: [*build(cfg), RunRecorder(), guard])
    overrides = ["experiment=tiny", "trainer.max_steps=12", "trainer.log_every_n_steps=1000",
                 "trainer.val_check_interval=1000", "data.datamodule.val_size=0",
                 "callbacks.sample_videos=null", "callbacks.checkpoint.every_n_train_steps=1000",
                 "trainer.enable_progress_bar=false", "data.datamodule.dataset.num_samples=1000"]
    if compile_mode:
        overrides += ["module.compile_blocks=true", f"module.compile_mode={compile_mode}"]
    try:
        train(compose_train(tmp_path, f"no_wait_{compile_mode}", overrides))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.steps_checked == 12 - 4 - 1
