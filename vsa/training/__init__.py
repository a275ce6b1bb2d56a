"""Training: the LightningModule, DataModule glue, callbacks, checkpoint IO and `train(cfg)`.

Names are imported on first use, so `import vsa.training.flops` does not pay for Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsa._lazy import lazy_exports

_EXPORTS = {
    "train": "vsa.training.run",
    "ConfigError": "vsa.config",
    "load_init_weights": "vsa.training.run",
    "VideoDiffusionModule": "vsa.training.module",
    "WarmupSchedule": "vsa.training.module",
    "ResumableDataModule": "vsa.training.data",
    "ResumableSampler": "vsa.training.data",
    "SparsitySchedule": "vsa.training.callbacks",
    "TrainingSpeed": "vsa.training.callbacks",
    "SampleVideos": "vsa.training.callbacks",
    "RunCheckpoint": "vsa.training.callbacks",
    "AtomicCheckpointIO": "vsa.training.checkpoint_io",
    "forward_flops": "vsa.training.flops",
    "fsdp_block_classes": "vsa.training.fsdp",
    "training_flops": "vsa.training.flops",
}

__all__ = [
    "AtomicCheckpointIO",
    "ConfigError",
    "ResumableDataModule",
    "ResumableSampler",
    "RunCheckpoint",
    "SampleVideos",
    "SparsitySchedule",
    "TrainingSpeed",
    "VideoDiffusionModule",
    "WarmupSchedule",
    "forward_flops",
    "fsdp_block_classes",
    "load_init_weights",
    "train",
    "training_flops",
]

if TYPE_CHECKING:
    from vsa.config import ConfigError
    from vsa.training.callbacks import RunCheckpoint, SampleVideos, SparsitySchedule, TrainingSpeed
    from vsa.training.checkpoint_io import AtomicCheckpointIO
    from vsa.training.data import ResumableDataModule, ResumableSampler
    from vsa.training.flops import forward_flops, training_flops
    from vsa.training.fsdp import fsdp_block_classes
    from vsa.training.module import VideoDiffusionModule, WarmupSchedule
    from vsa.training.run import load_init_weights, train


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
