"""`VideoDataModule`: any map-style dataset -> train / fixed-validation DataLoaders for Lightning.

Hydra builds it from a nested config (the nested `dataset` is instantiated first by Hydra's
recursive instantiation; a partial/factory or a still-uninstantiated config with `_target_` works too):

    data:
      _target_: vsa.data.VideoDataModule
      dataset:
        _target_: vsa.data.SyntheticVideoDataset
        num_samples: 2048
        frames: 16
        height: 64
        width: 64
      batch_size: 8
      num_workers: 2
      val_size: 64

The validation set is `val_size` samples chosen by a permutation seeded with `split_seed`, so it
is the same in every run and on every rank. If the dataset has a boolean `train` attribute (as
`VideoFolderDataset` does), the validation subset reads from a copy with `train=False` (centred,
deterministic clips). Alternatively pass `val_dataset` to validate on a separate dataset.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Subset

DatasetLike = Dataset | Callable[[], Dataset] | Mapping


def _materialise(name: str, spec: DatasetLike | None) -> Dataset | None:
    """A dataset from an instance, a zero-argument factory, or a config mapping with `_target_`."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(f"{name} config has no `_target_`; name the dataset class, e.g. "
                             f"_target_: vsa.data.SyntheticVideoDataset")
        from hydra.utils import instantiate

        spec = instantiate(spec)
    elif not hasattr(spec, "__getitem__") and callable(spec):
        spec = spec()
    if not (hasattr(spec, "__getitem__") and hasattr(spec, "__len__")):
        raise TypeError(f"{name} must be a map-style dataset (with __getitem__ and __len__), a factory "
                        f"returning one, or a config with `_target_`; got {type(spec).__name__}")
    return spec


def worker_init(worker_id: int) -> None:
    """Init function of every data-loader worker: ignore SIGINT and SIGTERM, then seed as Lightning
    does (`seed_everything(workers=True)`, which adds no init function of its own to a loader that
    has one). Ctrl-C in a terminal, `timeout`, and SLURM signal the whole process group; a worker
    that died of it would fail the main process's next batch before the main process could stop
    after its step and save it. The workers end with the main process (PyTorch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


class VideoDataModule(L.LightningDataModule):
    """Train/validation loaders over one dataset with a fixed, seeded validation split.

    Args:
        dataset: a dataset, a zero-argument factory (e.g. a Hydra `_partial_`), or a config with `_target_`.
        batch_size: training batch size; val_batch_size defaults to it.
        num_workers: DataLoader workers (persistent between epochs when > 0).
        val_size: validation samples split off `dataset`: an int count, or a fraction in (0, 1).
            0 disables validation. Ignored when `val_dataset` is given.
        val_dataset: optional separate validation dataset (same forms as `dataset`).
        split_seed: seed of the split permutation (keep it fixed across runs to compare val losses).
        pin_memory: None = pin when CUDA is available.
        drop_last: drop the last incomplete training batch (keeps step shapes constant).
        prefetch_factor: batches prefetched per worker (only with num_workers > 0).
    """

    def __init__(
        self,
        dataset: DatasetLike,
        batch_size: int = 8,
        num_workers: int = 0,
        val_size: int | float = 0.05,
        val_dataset: DatasetLike | None = None,
        val_batch_size: int | None = None,
        split_seed: int = 0,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0 or (
                isinstance(val_size, float) and val_size >= 1):
            raise ValueError(f"val_size must be an int >= 0 (a count) or a float in [0, 1) (a fraction), "
                             f"got {val_size!r}")
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers > 0; drop it or add workers")
        self.dataset = _materialise("dataset", dataset)
        self.val_dataset = _materialise("val_dataset", val_dataset)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = int(split_seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.drop_last = drop_last
        self.prefetch_factor = prefetch_factor
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _num_val(self, n: int) -> int:
        if isinstance(self.val_size, float):
            count = max(1, round(self.val_size * n)) if self.val_size > 0 else 0
        else:
            count = self.val_size
        if count >= n:
            raise ValueError(f"val_size={self.val_size} leaves no training samples out of {n}; "
                             f"lower val_size or use a larger dataset")
        return count

    def setup(self, stage: str | None = None) -> None:
        """Split once (idempotent): a seeded permutation, its first `val_size` indices validate."""
        if self.train_set is not None:
            return
        n = len(self.dataset)
        if self.val_dataset is not None:
            self.train_set, self.val_set = self.dataset, self.val_dataset
            return
        n_val = self._num_val(n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val_indices, train_indices = sorted(perm[:n_val]), sorted(perm[n_val:])
        self.train_set = Subset(self.dataset, train_indices)
        if n_val == 0:
            self.val_set = None
            return
        val_source = self.dataset
        if isinstance(getattr(self.dataset, "train", None), bool):
            val_source = copy.copy(self.dataset)
            val_source.train = False
        self.val_set = Subset(val_source, val_indices)

    def worker_options(self) -> dict[str, Any]:
        """DataLoader arguments for the worker processes (none without workers): persistent,
        `prefetch_factor`, and `worker_init` as their init function."""
        if self.num_workers == 0:
            return {}
        extra: dict[str, Any] = {"persistent_workers": True, "worker_init_fn": worker_init}
        if self.prefetch_factor is not None:
            extra["prefetch_factor"] = self.prefetch_factor
        return extra

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, drop_last=drop_last, **self.worker_options())

    def _setup_train(self) -> None:
        """Set up the splits and check that the training split fills at least one batch."""
        self.setup()
        if self.drop_last and len(self.train_set) < self.batch_size:
            raise ValueError(f"the training split has {len(self.train_set)} samples, fewer than "
                             f"batch_size={self.batch_size}, so every batch would be dropped; lower "
                             f"batch_size, or set drop_last=False")

    def train_dataloader(self) -> DataLoader:
        self._setup_train()
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """The fixed validation loader (in order), or [] when validation is disabled (val_size=0)."""
        self.setup()
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False, drop_last=False)
