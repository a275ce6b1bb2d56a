"""Training-side DataModule glue: a training stream that resumes mid-epoch exactly.

`VideoDataModule` (vsa.data) shuffles with a plain `RandomSampler`, whose order depends on the
global RNG and which restarts an epoch from its first batch after a resume. For a requeued run to
continue with the very batches an uninterrupted run would have seen, training here reads the
dataset as one deterministic stream of batches:

    global batch b (per rank)  ->  epoch e = b // batches_per_epoch,  position b % batches_per_epoch
    epoch e visits a permutation seeded with (seed, e); rank r takes every world_size-th index.

`ResumableDataModule.train_dataloader()` starts the stream at the batch the trainer has reached
(`global_step * accumulate_grad_batches`, restored from the checkpoint before the loader is built),
so the position needs no state of its own. The loader's checkpointed state is the identity of the
stream (seed, sizes): a resumed run that reads a different stream is warned that it will not see
the batches an uninterrupted run would have. Validation is unchanged (fixed, in order).

Under DDP/FSDP the sampler shards by rank itself, so the trainer must not add Lightning's
distributed sampler: `use_distributed_sampler: false` (configs/trainer/default.yaml, inherited by
the ddp and fsdp configs).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from vsa.data.datamodule import VideoDataModule


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed generator seed for one (seed, epoch) pair."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Shuffled indices of `num_samples` items as a deterministic stream of whole batches.

    Each epoch is a permutation seeded by (seed, epoch); rank r of world_size takes
    perm[r::world_size] cut to an equal length. With `drop_last` an epoch yields only whole
    batches. One `iter()` yields the rest of the current epoch, starting at the cursor; the cursor
    then points at the next epoch, so consecutive `iter()` calls (epochs) continue the stream.
    `start_batch` places the cursor at that global batch (per rank), e.g. after a resume.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, drop_last: bool = True,
                 start_batch: int = 0, rank: int | None = None, world_size: int | None = None) -> None:
        if num_samples < 1 or batch_size < 1 or start_batch < 0:
            raise ValueError(f"need num_samples >= 1, batch_size >= 1 and start_batch >= 0, got "
                             f"{num_samples}, {batch_size}, {start_batch}")
        default_rank, default_world = _rank_and_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        per_rank = num_samples // self.world_size
        self.per_epoch = (per_rank // batch_size) * batch_size if drop_last else per_rank
        if self.per_epoch < 1:
            raise ValueError(f"{num_samples} samples over {self.world_size} rank(s) leave no full batch "
                             f"of {batch_size}; lower the batch size or use more data")
        self.batches_per_epoch = -(-self.per_epoch // batch_size)
        self.epoch = start_batch // self.batches_per_epoch
        self.offset = (start_batch % self.batches_per_epoch) * batch_size  # samples into the epoch

    def __len__(self) -> int:
        return self.per_epoch  # a full epoch; a resumed one ends early, as Lightning expects

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=generator)
        mine = perm[self.rank::self.world_size][: self.per_epoch].tolist()
        start, self.offset, self.epoch = self.offset, 0, self.epoch + 1
        yield from mine[start:]


class ResumableLoader(DataLoader):
    """DataLoader over a ResumableSampler. Having `state_dict` / `load_state_dict` tells Lightning
    the loader resumes mid-epoch; the state checks that the resumed stream is the saved one."""

    def state_dict(self) -> dict:
        s = self.sampler
        return {"seed": s.seed, "num_samples": s.num_samples, "batch_size": s.batch_size,
                "world_size": s.world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict != self.state_dict():
            warnings.warn(f"the training stream differs from the checkpoint's ({state_dict} then, "
                          f"{self.state_dict()} now): the resumed run reads other batches than an "
                          "uninterrupted run would", stacklevel=2)


class ResumableDataModule(VideoDataModule):
    """`VideoDataModule` whose training loader resumes mid-epoch at the trainer's step.

    Takes VideoDataModule's arguments plus `seed`, the seed of the shuffling stream.
    """

    def __init__(self, *args, seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)

    def consumed_batches(self) -> int:
        """Training batches (per rank) the attached trainer has already consumed."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        self._setup_train()
        sampler = ResumableSampler(len(self.train_set), self.batch_size, seed=self.seed,
                                   drop_last=self.drop_last, start_batch=self.consumed_batches())
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                               num_workers=self.num_workers, pin_memory=self.pin_memory,
                               drop_last=self.drop_last, **self.worker_options())
