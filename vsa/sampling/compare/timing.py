"""Timing a model's evaluations: the whole velocity evaluation, and the part of it spent inside
the attention backends (CUDA events on a GPU, the wall clock on the CPU)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from vsa.diffusion import default_labels, guided_velocity
from vsa.models import VideoDiT


class Clock:
    """Interval timer: CUDA events on a GPU (read after one synchronisation), else the wall clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class AttentionTimer:
    """Time spent inside every block's attention backend while the context is open.

        with AttentionTimer(model, clock) as timer:
            model(x, t)
        timer.total_ms()   # synchronises, then sums the intervals
    """

    def __init__(self, model: VideoDiT, clock: Clock):
        self.model, self.clock = model, clock
        self.intervals: list = []
        self._open: list = []
        self._hooks: list = []

    def __enter__(self) -> AttentionTimer:
        for block in self.model.blocks:
            backend = block.attn.backend
            self._hooks.append(backend.register_forward_pre_hook(self._start))
            self._hooks.append(backend.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _start(self, module, args) -> None:
        self._open.append(self.clock.mark())

    def _stop(self, module, args, output) -> None:
        self.intervals.append((self._open.pop(), self.clock.mark()))

    def total_ms(self) -> float:
        self.clock.sync()
        return sum(self.clock.ms(a, b) for a, b in self.intervals)


def noise_and_velocity(model: VideoDiT, latent_shape, num_videos: int, labels, cfg_scale: float,
                        seed: int, device: torch.device):
    """The sampler's first state and its velocity function, exactly as `generate` builds them."""
    noise = torch.randn((num_videos, *latent_shape), generator=torch.Generator().manual_seed(seed))
    cond: dict = {}
    ids = default_labels(model, num_videos, labels)
    if ids is not None:
        cond["labels"] = torch.tensor(ids, dtype=torch.long, device=device)
    uncond = model.null_condition(cond) if cond and cfg_scale != 1.0 else None
    return noise.to(device), guided_velocity(model, cond, uncond, cfg_scale)


@torch.no_grad()
def time_evaluations(model: VideoDiT, velocity: Callable, x: torch.Tensor, clock: Clock,
                     warmup: int, forwards: int) -> tuple[float, float]:
    """(ms per velocity evaluation, ms of it inside the attention backends) at t = 0.5."""
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    for _ in range(warmup):
        velocity(x, t)
    clock.sync()
    start = clock.mark()
    for _ in range(forwards):
        velocity(x, t)
    end = clock.mark()
    clock.sync()
    forward_ms = clock.ms(start, end) / forwards
    with AttentionTimer(model, clock) as timer:
        for _ in range(forwards):
            velocity(x, t)
    return forward_ms, timer.total_ms() / forwards
