"""Compute budgets -> training steps, with the analytic FLOP counter (vsa.training.flops).

A sweep point fixes a budget C (training FLOPs) instead of a step count. Its steps are

    steps = floor(C / (flops_per_sample * global_batch))

where flops_per_sample = `training_flops(DiTConfig, latent grid)` (3 x forward, docs/design.md) and
global_batch = batch_size x devices x num_nodes x accumulate_grad_batches. With a VSA sparsity
schedule (callbacks.sparsity_schedule) the FLOPs of a step follow the schedule, so the steps are
the largest n whose summed per-step FLOPs stay within C.

In configs this is the OmegaConf resolver `${steps_for_budget:${scaling.budget}}` (registered on
`import vsa.scaling`); it reads the model, attention, data and trainer sections of the same config.
`${sweep_values:${scaling.budgets}}` turns a YAML list into Hydra's "a,b,c" sweep syntax, and
`${sweep_subdir:${hydra.job.override_dirname}}` names run folders with compact numbers (1e15).
`${budget_for:${scaling.multiple}}` reads a per-size budget grid (`budget_for_multiple`), and
`${warmup_for:${trainer.max_steps},0.05,10}` a warm-up that scales with the run's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class RunSpec:
    """What the FLOPs of one training run depend on."""

    preset: str
    dit: object  # vsa.models.DiTConfig (imported lazily: torch is heavy)
    latent_shape: tuple[int, int, int, int]  # (C, T, H, W) model input, after the codec
    text_len: int
    global_batch: int
    schedule: tuple[float, float, int, float] | None  # SparsitySchedule (target, increment, interval, start)

    def sample_flops(self, sparsity: float | None = None):
        """vsa.training.flops.FlopCount of one sample's forward (at `sparsity`, default: the model's)."""
        from vsa.training.flops import forward_flops

        return forward_flops(self.dit, self.latent_shape[1:], self.text_len, sparsity=sparsity)

    def sparsity_at(self, step: int) -> float | None:
        if self.schedule is None:
            return None
        target, increment, interval, start = self.schedule
        return min(target, start + increment * (step // interval))

    def step_flops(self, step: int) -> float:
        """Training FLOPs of optimizer step `step` (0-based), whole global batch."""
        return self.global_batch * self.sample_flops(self.sparsity_at(step)).training

    def segments(self):
        """(first step, last step or None = forever, FLOPs per step) of constant-cost stretches."""
        if self.schedule is None:
            yield 0, None, self.step_flops(0)
            return
        target, increment, interval, start = self.schedule
        n_stairs = max(0, math.ceil((target - start) / increment - 1e-9))
        for stair in range(n_stairs):
            yield stair * interval, (stair + 1) * interval - 1, self.step_flops(stair * interval)
        yield n_stairs * interval, None, self.step_flops(n_stairs * interval)

    def flops_for_steps(self, steps: int) -> float:
        """Training FLOPs actually spent by `steps` optimizer steps."""
        total = 0.0
        for first, last, per_step in self.segments():
            if first >= steps:
                break
            end = steps if last is None else min(steps, last + 1)
            total += (end - first) * per_step
        return total

    def steps_for_budget(self, budget: float) -> int:
        """The most steps whose training FLOPs fit in `budget`; an error if not even one does."""
        budget = check_budget(budget)
        steps, spent = 0, 0.0
        for first, last, per_step in self.segments():
            room = math.floor((budget - spent) / per_step * (1 + 1e-12))
            length = None if last is None else last - first + 1
            if length is not None and room >= length:
                steps, spent = steps + length, spent + length * per_step
                continue
            steps += room
            break
        if steps < 1:
            first_step = self.step_flops(0)
            raise ValueError(
                f"scaling.budget={budget:.3g} FLOPs is too small for one training step: a step of model "
                f"{self.preset} ({self.dit.attention}) on {self.latent_shape} inputs with global batch "
                f"{self.global_batch} costs {first_step:.3g} FLOPs; raise scaling.budget to at least "
                f"{first_step:.3g} or lower data.datamodule.batch_size")
        return steps


def check_budget(budget) -> float:
    """A positive, finite number of FLOPs (YAML strings such as '1e15' are accepted)."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"scaling.budget must be a number of training FLOPs (e.g. 1e15), got {budget!r}; "
                         "pick one of the sweep's scaling.budgets or set scaling.budget=...") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling.budget must be a positive, finite number of FLOPs, got {budget!r}")
    return value


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def latent_shape_of(cfg: DictConfig) -> tuple[int, int, int, int]:
    """(C, T, H, W) of one model input, derived the way vsa.training.train derives it."""
    scaling = cfg.get("scaling") or {}
    if scaling.get("latent_shape"):
        shape = tuple(int(s) for s in scaling.latent_shape)
        if len(shape) != 4:
            raise ValueError(f"scaling.latent_shape must be (C, T, H, W), got {list(shape)}")
        return shape  # type: ignore[return-value]
    data = cfg.data
    if data.key != "video":
        raise ValueError(f"data.key={data.key!r}: the latent shape cannot be read from the config; set "
                         "scaling.latent_shape=[C,T,H,W] (the shape of one latent sample)")
    dataset = data.datamodule.dataset
    missing = [k for k in ("channels", "frames", "height", "width") if dataset.get(k) is None]
    if missing:
        raise ValueError(f"data.datamodule.dataset has no {', '.join(missing)}; set scaling.latent_shape="
                         "[C,T,H,W] (the model input shape after the codec)")
    from vsa.data.codecs import build_codec

    codec = {k: v for k, v in _plain(data.codec).items() if v is not None}
    shape = (dataset.channels, dataset.frames, dataset.height, dataset.width)
    return tuple(int(s) for s in build_codec(**codec).latent_shape(shape))  # type: ignore[return-value]


def global_batch_of(cfg: DictConfig) -> int:
    """Samples per optimizer step over all ranks: batch_size x devices x num_nodes x accumulation."""
    trainer = cfg.trainer
    factors = {"data.datamodule.batch_size": cfg.data.datamodule.batch_size,
               "trainer.devices": trainer.get("devices", 1),
               "trainer.num_nodes": trainer.get("num_nodes", 1),
               "trainer.accumulate_grad_batches": trainer.get("accumulate_grad_batches", 1)}
    for name, value in factors.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: a compute budget needs the global batch size, so set "
                             f"{name} to a positive int (not 'auto' or -1)")
    return math.prod(factors.values())


def run_spec(cfg: DictConfig) -> RunSpec:
    """The RunSpec of a composed train config (configs/train.yaml + a sweep)."""
    from vsa.attention import BACKENDS
    from vsa.models.presets import preset_config

    model = {k: v for k, v in _plain(cfg.model).items() if k not in ("_target_", "name")}
    latent = latent_shape_of(cfg)
    dit = preset_config(cfg.model.name, in_channels=latent[0], **model)
    schedule = None
    node = (cfg.get("callbacks") or {}).get("sparsity_schedule")
    if node is not None and BACKENDS[dit.attention].needs_sparsity:
        schedule = (float(node.target), float(node.increment), int(node.interval), float(node.get("start", 0.0)))
    text_len = int((cfg.get("scaling") or {}).get("text_len") or 0)
    return RunSpec(preset=cfg.model.name, dit=dit, latent_shape=latent, text_len=text_len,
                   global_batch=global_batch_of(cfg), schedule=schedule)


def steps_for_budget(budget, cfg: DictConfig) -> int:
    """Training steps that spend (at most) `budget` FLOPs for the run `cfg` describes."""
    return run_spec(cfg).steps_for_budget(budget)


def _steps_resolver(budget, *, _root_: DictConfig) -> int:
    return steps_for_budget(budget, _root_)


def budget_for_multiple(multiple, base_budgets, preset: str) -> float:
    """A run's budget on a per-size grid: `multiple` x the base budget of its model preset.

    Sweeps whose model sizes differ by much give each size the budgets around its own scale
    (small models would otherwise run tens of thousands of steps, large ones a handful):
    base_budgets {5M: 2e15, 10M: 4e15, ...} with multiples [1, 2, 4, 8] puts 4 budgets spanning
    8x on every size, and where the bases double from size to size the budgets of neighbouring
    sizes coincide, which is what the IsoFLOP curves compare."""
    bases = _plain(base_budgets)
    if not isinstance(bases, dict) or preset not in bases:
        known = ", ".join(bases) if isinstance(bases, dict) else "none"
        raise ValueError(f"scaling.base_budgets has no entry for model {preset!r} (has: {known}); add "
                         f"'{preset}: <FLOPs>' or drop the model from scaling.presets")
    try:
        value = float(multiple)
    except (TypeError, ValueError):
        raise ValueError(f"scaling.multiple must be a number, got {multiple!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scaling.multiple must be positive, got {multiple!r}")
    return check_budget(value * check_budget(bases[preset]))


def warmup_steps_for(steps, fraction, minimum) -> int:
    """Warm-up steps that scale with a run's length: max(minimum, round(fraction x steps)), and
    never more than half the run."""
    steps = int(steps)
    return max(1, min(max(int(minimum), round(float(fraction) * steps)), steps // 2))


def _budget_resolver(multiple, *, _root_: DictConfig) -> float:
    return budget_for_multiple(multiple, _root_.scaling.get("base_budgets"), str(_root_.model.name))


def compact_number(text: str) -> str:
    """'500000000000000.0' -> '5e14', '0.875' -> '0.875'; ints and non-numbers unchanged."""
    try:
        int(text)
        return text
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.6g}".replace("e+", "e")


def _sweep_values(values) -> str:
    """A list -> Hydra's comma-separated sweep "a,b,c" (floats written compactly: 1e15)."""
    values = _plain(values)
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"a sweep axis must be a non-empty list, got {values!r}")
    return ",".join(compact_number(str(v)) for v in values)


def _sweep_subdir(override_dirname: str) -> str:
    """A run folder name from Hydra's override_dirname ("k=v,k=v", sorted), with numbers written
    compactly: Hydra writes a swept 1e15 as 1000000000000000.0."""
    items = []
    for item in str(override_dirname).split(","):
        key, sep, value = item.partition("=")
        items.append(f"{key}{sep}{compact_number(value)}" if sep else item)
    return ",".join(items) or "default"


def register_resolvers() -> None:
    """Register `steps_for_budget`, `sweep_values`, `sweep_subdir`, `budget_for` and `warmup_for`
    with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("steps_for_budget"):
        OmegaConf.register_new_resolver("steps_for_budget", _steps_resolver)
    if not OmegaConf.has_resolver("sweep_values"):
        OmegaConf.register_new_resolver("sweep_values", _sweep_values)
    if not OmegaConf.has_resolver("sweep_subdir"):
        OmegaConf.register_new_resolver("sweep_subdir", _sweep_subdir)
    if not OmegaConf.has_resolver("budget_for"):
        OmegaConf.register_new_resolver("budget_for", _budget_resolver)
    if not OmegaConf.has_resolver("warmup_for"):
        OmegaConf.register_new_resolver("warmup_for", warmup_steps_for)
