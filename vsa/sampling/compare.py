"""Comparing attention patterns on one checkpoint (`scripts/compare_patterns.py`).

A checkpoint trained with full attention is sampled with each pattern (full, grat_b, grat_x, sta,
vsa at a sparsity; options and tile per pattern) from the same noise and labels. Per pattern:

- attention time per model evaluation: CUDA events (on the CPU: the wall clock, the backends run
  synchronously) around every block's attention backend, summed over the blocks, averaged over
  `forwards` evaluations of the sampler's velocity (one model call on the CFG batch of 2N videos)
  at t = 0.5, after `warmup` evaluations (Triton autotuning, map building and caching). For full
  attention that is SDPA; for a static pattern the cached map lookup + the block-sparse kernel;
  for VSA the coarse stage, the top-k choice and the fine stage. The whole evaluation is timed in
  a separate loop without the events.
- sampling time: `generate` (every step, guidance included) + decoding to pixels, synchronised,
  the median of `repeats` runs after the warm-up (as `sample.py` times it).
- drift against the reference (the first `full` pattern): relative L2 of the decoded video
  ||x - x_ref|| / ||x_ref||, and PSNR over all videos with pixels clamped to [-1, 1]
  (peak-to-peak 2: PSNR = 10 log10(4 / MSE)); identical videos have relative L2 0 and PSNR inf.
- validation loss: the fixed flow-matching protocol of training (`vsa.diffusion.validation`: the
  checkpoint's n_t and seed, seed + batch index per batch, mean weighted by batch size, as
  `val/loss`) on the validation split of the data the checkpoint was trained on.

Each pattern runs on a freshly loaded copy of the weights, so a backend swapped in for one
pattern never leaks into the next. Everything runs under the precision of `sample.py` (bf16
autocast on CUDA, fp32 on the CPU, unless `precision` says otherwise).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vsa.attention import BACKENDS, StaticPatternAttention
from vsa.data.codecs import build_codec
from vsa.diffusion import guided_velocity, validation_loss
from vsa.models import DiTConfig, VideoDiT, count_params
from vsa.ops.api import resolve_topk
from vsa.ops.patterns import kept_token_fraction
from vsa.sampling.checkpoint import model_from_checkpoint, read_checkpoint
from vsa.sampling.generate import default_labels, generate
from vsa.sampling.media import save_grid, to_uint8_frames
from vsa.sampling.run import _autocast, swap_attention
from vsa.training.module import CHECKPOINT_KEY, timestep_shift

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# Pattern specs: "name[@sparsity][:key=value]..."
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PatternSpec:
    """One row of the comparison: a backend, its options, the VSA sparsity / top-k, the tile."""

    label: str
    name: str
    options: dict = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    topk: int | None = None
    tile: Triple | None = None  # None: the checkpoint's tile


def parse_tile(value) -> Triple:
    """A tile of 3 positive ints from "4x8x8", "4,8,8" or a sequence of 3 ints."""
    parts = re.split(r"[x,]", value.strip().lower()) if isinstance(value, str) else value
    try:
        tile = tuple(int(p) for p in parts)
        ok = len(tile) == 3 and min(tile) >= 1 and all(
            not isinstance(p, bool) and (isinstance(p, str) or int(p) == p) for p in parts)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"tile must be 3 positive ints (t, h, w), e.g. 4x8x8, got {value!r}")
    return tile  # type: ignore[return-value]


def _option_value(key: str, text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        if "x" in low or "," in low:
            return tuple(int(p) for p in re.split(r"[x,]", low))
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise ValueError(f"option {key}={text!r}: expected an int, 3 ints (e.g. 1x1x1), a float, "
                         "true or false") from None


def parse_pattern(text: str, tile=None) -> PatternSpec:
    """Read a pattern spec `name[@sparsity][:key=value]...`.

    Examples: "full", "grat_b", "grat_b:radius=2x1x1", "grat_x:lines=true", "sta:window=3x5x5",
    "vsa@0.875", "vsa:topk=8", "grat_b:tile=4x8x8". `tile` (a per-spec `tile=` wins) is the tile
    for this pattern; None keeps the checkpoint's. Other keys are the backend's options.
    """
    head, *pairs = text.strip().split(":")
    name, _, sparsity = head.partition("@")
    name = name.strip()
    if name not in BACKENDS:
        raise ValueError(f"pattern {text!r}: unknown attention {name!r}; known: {sorted(BACKENDS)} "
                         "(spec: name[@sparsity][:key=value]..., e.g. vsa@0.875 or grat_b:radius=1)")
    spec = PatternSpec(label=text.strip(), name=name,
                       tile=None if tile is None else parse_tile(tile))
    try:
        if sparsity:
            spec.sparsity = float(sparsity)
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ValueError(f"options are written key=value (e.g. radius=1x1x1), got {pair!r}")
            if key == "tile":
                spec.tile = parse_tile(value)
            elif key == "sparsity":
                spec.sparsity = float(value)
            elif key == "topk":
                spec.topk = int(value)
            else:
                spec.options[key] = _option_value(key, value)
    except ValueError as err:
        raise ValueError(f"pattern {text!r}: {err}") from None
    if name != "vsa" and (spec.sparsity is not None or spec.topk is not None):
        raise ValueError(f"pattern {text!r}: a sparsity / topk applies to vsa only (the static "
                         "patterns fix their tiles; full attention keeps all)")
    return spec


def configure(model: VideoDiT, spec: PatternSpec) -> VideoDiT:
    """Give a freshly loaded model the attention and tile of `spec` (as sample.py would; options
    on the checkpoint's own backend rebuild it, unless it has trained parameters)."""
    if spec.name == model.cfg.attention and spec.options:
        if any(True for _ in model.blocks[0].attn.backend.parameters()):
            raise ValueError(f"pattern {spec.label!r}: the checkpoint's {spec.name} backend has "
                             "trained parameters and runs as trained; drop the options")
        model.set_attention(spec.name, **spec.options)
    swap_attention(model, spec.name, spec.options, spec.sparsity, spec.topk)
    if spec.sparsity is not None or spec.topk is not None:
        model.sparsity, model.topk = spec.sparsity, spec.topk
    if model.cfg.attention == "vsa" and model.sparsity is None and model.topk is None:
        raise ValueError(f"pattern {spec.label!r}: vsa needs a sparsity, e.g. vsa@0.875 or vsa:topk=8")
    if spec.tile is not None:
        model.set_tile(spec.tile)
    return model


def check_patterns(dit_config: dict, specs: Sequence[PatternSpec]) -> None:
    """Apply every spec to a weightless (meta-device) copy of the model: bad options, tiles or
    sparsities fail here, before anything runs."""
    for spec in specs:
        with torch.device("meta"):
            model = VideoDiT(DiTConfig(**dit_config))
        try:
            configure(model, spec)
        except (TypeError, ValueError) as err:
            message = str(err)
            if spec.label not in message:
                message = f"pattern {spec.label!r}: {message}"
            raise ValueError(message) from None


def kept_fraction(model: VideoDiT, layout) -> float:
    """Fraction of (query, key) token pairs the model's attention computes on `layout` (VSA: the
    fine stage's K / n_tiles, its coarse stage not counted)."""
    backend = model.blocks[0].attn.backend
    if isinstance(backend, StaticPatternAttention):
        layout = layout.to("cpu")
        return kept_token_fraction(layout, *backend.block_map(layout))
    if model.cfg.attention == "vsa":
        topk = model.topk
        return resolve_topk(layout.n_tiles, topk, None if topk is not None else model.sparsity) / layout.n_tiles
    return 1.0


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class _Clock:
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

    def __init__(self, model: VideoDiT, clock: _Clock):
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


def _noise_and_velocity(model: VideoDiT, latent_shape, num_videos: int, labels, cfg_scale: float,
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
def time_evaluations(model: VideoDiT, velocity: Callable, x: torch.Tensor, clock: _Clock,
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


# --------------------------------------------------------------------------------------------------
# Validation data and quality
# --------------------------------------------------------------------------------------------------


def find_data_config(ckpt_path: str | Path) -> Path | None:
    """The training config Hydra saved beside a run's checkpoints: <run>/.hydra/config.yaml."""
    path = Path(ckpt_path).expanduser().resolve().parent.parent / ".hydra" / "config.yaml"
    return path if path.is_file() else None


def validation_batches(checkpoint: dict, data_config: str | Path, device: torch.device,
                       max_batches: int | None = None) -> tuple[list, dict]:
    """The validation split of the data in `data_config` (a train config with a `data` section, as
    Hydra saves it, or a data section), encoded as in training: ([(x0, cond)], info)."""
    from hydra.utils import instantiate

    from vsa.training.module import VideoDiffusionModule

    path = Path(data_config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} does not exist")
    root = OmegaConf.load(path)
    node = root.data if "data" in root else root
    if "datamodule" not in node:
        raise ValueError(f"{path} has no data.datamodule section; pass the run's .hydra/config.yaml "
                         "or a file with the training data config")
    try:
        datamodule = instantiate(node.datamodule, _convert_="all")
    except Exception as err:  # omegaconf / hydra errors: name the file
        raise ValueError(f"could not build the validation data of {path}: {err}") from err
    hparams = checkpoint.get("hyper_parameters", {})
    spec = checkpoint[CHECKPOINT_KEY]
    data_key = str(node.get("key", hparams.get("data_key", "video")))
    validation = {"n_t": 8, "seed": 0, **hparams.get("validation", {})}
    with torch.device("meta"):  # only its config is read (conditions); no weights needed
        meta_model = VideoDiT(DiTConfig(**spec["dit_config"]))
    module = VideoDiffusionModule(meta_model, codec=spec["codec"], data_key=data_key,
                                  validation=validation)
    loader = datamodule.val_dataloader()
    if not loader:
        raise ValueError(f"the data of {path} has no validation split (val_size=0); use a config "
                         "with val_size > 0, or skip the validation loss")
    batches = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            x0 = module.encode(batch)
        if list(x0.shape[1:]) != list(spec["latent_shape"]):
            raise ValueError(f"the validation data of {path} gives inputs {list(x0.shape[1:])}, the "
                             f"checkpoint was trained on {spec['latent_shape']}; pass the data config "
                             "of its training run")
        batches.append((x0, module.condition(batch)))
    info = {"source": str(path), "samples": sum(x0.shape[0] for x0, _ in batches),
            "batches": len(batches), "n_t": int(validation["n_t"]), "seed": int(validation["seed"])}
    return batches, info


def protocol_loss(model: VideoDiT, batches: list, info: dict, chunk: int | None = None) -> float:
    """`val/loss` of training: the fixed protocol per batch (seed + batch index), weighted mean."""
    total = count = 0.0
    for index, (x0, cond) in enumerate(batches):
        loss = validation_loss(model, x0, cond, seed=info["seed"] + index, n_t=info["n_t"],
                               batch_size=chunk)
        total += loss * x0.shape[0]
        count += x0.shape[0]
    return total / count


def video_drift(pixels: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative L2 of decoded videos against the reference, and PSNR (dB) of the clamped pixels
    (range [-1, 1], peak-to-peak 2); PSNR is None (infinite) when the clamped pixels are equal."""
    x, ref = pixels.double(), reference.double()
    rel_l2 = float((x - ref).norm() / ref.norm().clamp_min(1e-300))
    mse = float((x.clamp(-1, 1) - ref.clamp(-1, 1)).square().mean())
    psnr = None if mse == 0.0 else 10.0 * math.log10(4.0 / mse)
    return {"rel_l2": rel_l2, "psnr_db": psnr}


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------


def _options(model: VideoDiT) -> dict:
    """The backend's options as it runs (static patterns: normalised, defaults filled in)."""
    backend = model.blocks[0].attn.backend
    options = dict(backend.options) if isinstance(backend, StaticPatternAttention) else dict(
        model.cfg.attention_options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _param_count(dit_config: DiTConfig) -> int:
    with torch.device("meta"):
        return count_params(VideoDiT(dit_config))


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "pattern"


def compare_patterns(ckpt_path: str | Path, patterns: Sequence[str] = ("full", "grat_b", "grat_x", "sta"),
                     *, tile=None, num_videos: int = 4, labels: Sequence[int] | None = None,
                     steps: int = 32, method: str = "euler", cfg_scale: float = 4.0,
                     shift: float | None = None, seed: int = 0, ema: bool = True,
                     device: str | None = None, precision: str = "auto", warmup: int = 3,
                     forwards: int = 10, repeats: int = 1, data_config: str | Path | None = "auto",
                     val_batches: int | None = None, val_chunk: int | None = None,
                     out: str | Path | None = None,
                     log: Callable[[str], None] | None = print) -> dict:
    """Sample with every pattern from the same noise and compare them (see the module docstring).

    `patterns`: specs for `parse_pattern`; the first `full` one is the reference (one is put first
    when none is listed). `tile`: the tile of every pattern without its own `tile=` (None: the
    checkpoint's). `data_config`: "auto" = the run's .hydra/config.yaml beside the checkpoint,
    a path, or None to skip the validation loss. `out`: a folder for compare_patterns.json,
    compare_patterns.md and one PNG grid per pattern. Returns the JSON report as a dict.
    """
    log = log or (lambda message: None)
    if precision not in ("auto", "32", "bf16"):
        raise ValueError(f"precision must be auto, 32 or bf16, got {precision!r}")
    if warmup < 0 or forwards < 1 or repeats < 1 or num_videos < 1 or steps < 1:
        raise ValueError(f"need warmup >= 0 and forwards, repeats, num_videos, steps >= 1; got "
                         f"{warmup}, {forwards}, {repeats}, {num_videos}, {steps}")
    specs = [parse_pattern(p, tile) for p in patterns]
    if not specs:
        raise ValueError("no patterns to compare; e.g. full grat_b grat_x sta vsa@0.875")
    labels_seen = [s.label for s in specs]
    if len(set(labels_seen)) != len(labels_seen):
        raise ValueError(f"patterns are listed twice: {labels_seen}")
    if not any(s.name == "full" for s in specs):
        specs.insert(0, parse_pattern("full", tile))
    reference = next(s for s in specs if s.name == "full")
    specs.remove(reference)
    specs.insert(0, reference)

    checkpoint = read_checkpoint(ckpt_path)
    spec = checkpoint[CHECKPOINT_KEY]
    if spec.get("latent_shape") is None:
        raise ValueError(f"{ckpt_path} stores no latent shape; it cannot be sampled")
    check_patterns(spec["dit_config"], specs)
    if spec["dit_config"].get("text_dim"):
        raise ValueError(f"{ckpt_path} is a text-conditional model; the comparison samples class-"
                         "conditional or unconditional models only")
    with torch.device("meta"):
        default_labels(VideoDiT(DiTConfig(**spec["dit_config"])), num_videos, labels)
    if data_config == "auto":
        data_config = find_data_config(ckpt_path)
        if data_config is None:
            raise FileNotFoundError(
                f"no training config beside {ckpt_path} (<run>/.hydra/config.yaml) to find its "
                "validation data; pass --data-config FILE (a train config or its data section), or "
                "--no-val to skip the validation loss")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    clock = _Clock(cuda)
    latent_shape = [int(s) for s in spec["latent_shape"]]
    ts = spec["timesteps"]
    dit_config = DiTConfig(**spec["dit_config"])
    grid = dit_config.token_grid(latent_shape[1:])
    if shift is None:
        shift = timestep_shift(math.prod(grid), ts["shift"], ts["base_seq_len"], ts["base_shift"])
    codec = build_codec(**spec["codec"]).to(device)
    out = None if out is None else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    val_info = None
    batches: list = []
    if data_config is not None:
        batches, val_info = validation_batches(checkpoint, data_config, device, val_batches)
        log(f"validation: {val_info['samples']} samples in {val_info['batches']} batches from "
            f"{val_info['source']}")

    rows: list[dict] = []
    ref_pixels = None
    for number, pattern in enumerate(specs, 1):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = configure(model_from_checkpoint(checkpoint, ema, device), pattern)
        layout = model.geometry(grid, device)[0]
        with _autocast(precision, device):
            x, velocity = _noise_and_velocity(model, latent_shape, num_videos, labels, cfg_scale,
                                              seed, device)
            forward_ms, attention_ms = time_evaluations(model, velocity, x, clock, warmup, forwards)
            times = []
            latents = pixels = None
            for _ in range(repeats):
                clock.sync()
                start = time.perf_counter()
                run_latents = generate(model, latent_shape, num_videos, labels=labels, steps=steps,
                                       method=method, cfg_scale=cfg_scale, shift=shift, seed=seed,
                                       device=device)
                run_pixels = codec.decode(run_latents.float())
                clock.sync()
                times.append(time.perf_counter() - start)
                if latents is None:
                    latents, pixels = run_latents.float().cpu(), run_pixels.float().cpu()
            val_loss = protocol_loss(model, batches, val_info, val_chunk) if batches else None
        row = {
            "label": pattern.label, "attention": model.cfg.attention,
            "options": _options(model),
            "sparsity": model.sparsity if model.cfg.attention == "vsa" else None,
            "topk": model.topk if model.cfg.attention == "vsa" else None,
            "tile": list(model.cfg.tile), "tile_grid": list(layout.tile_grid), "n_tiles": layout.n_tiles,
            "kept": kept_fraction(model, layout),
            "forward_ms": forward_ms, "attention_ms": attention_ms,
            "attention_share": attention_ms / forward_ms if forward_ms > 0 else None,
            "sampling_s": statistics.median(times), "sampling_runs_s": times,
            "val_loss": val_loss,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        }
        if ref_pixels is None:
            ref_pixels, ref_latents, ref_row = pixels, latents, row
        row.update(video_drift(pixels, ref_pixels))
        row["rel_l2_latents"] = float((latents.double() - ref_latents.double()).norm()
                                      / ref_latents.double().norm().clamp_min(1e-300))
        row["attention_speedup"] = (ref_row["attention_ms"] / attention_ms if attention_ms > 0 else None)
        row["sampling_speedup"] = ref_row["sampling_s"] / row["sampling_s"]
        row["val_loss_delta"] = None if val_loss is None else val_loss - ref_row["val_loss"]
        rows.append(row)
        if out is not None:
            row["grid"] = str(save_grid(out / f"grid_{number:02d}_{_safe_name(pattern.label)}.png",
                                        to_uint8_frames(pixels)))
        log(f"[{number}/{len(specs)}] {pattern.label}: attention {attention_ms:.3f} ms / evaluation "
            f"(forward {forward_ms:.3f} ms), sampling {row['sampling_s']:.3f} s, rel. L2 "
            f"{row['rel_l2']:.3e}" + ("" if val_loss is None else f", val loss {val_loss:.5f}"))
        del model, velocity, x
    report = {
        "checkpoint": str(Path(ckpt_path).expanduser().resolve()),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "model": {"params": _param_count(dit_config),
                  "depth": dit_config.depth, "width": dit_config.width, "heads": dit_config.n_heads,
                  "head_dim": dit_config.head_dim, "trained_attention": dit_config.attention,
                  "trained_tile": list(dit_config.tile), "patch": list(dit_config.patch)},
        "latent_shape": latent_shape, "token_grid": list(grid), "tokens": math.prod(grid),
        "settings": {"num_videos": num_videos, "labels": None if labels is None else list(labels),
                     "steps": steps, "method": method, "cfg_scale": cfg_scale, "shift": shift,
                     "seed": seed, "ema": ema, "precision": precision, "warmup": warmup,
                     "forwards": forwards, "repeats": repeats},
        "validation": val_info, "reference": reference.label, "rows": rows,
    }
    if out is not None:
        (out / "compare_patterns.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (out / "compare_patterns.md").write_text(markdown_report(report))
        log(f"wrote {out / 'compare_patterns.json'} and {out / 'compare_patterns.md'}")
    return report


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    """2 decimals from 1 up, 3 significant digits below (ms or s)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def markdown_report(report: dict) -> str:
    """The comparison as a markdown paragraph (settings) and table (one row per pattern)."""
    s, m = report["settings"], report["model"]
    val = report["validation"]
    lines = [
        f"Checkpoint `{report['checkpoint']}` ({m['params'] / 1e6:.1f}M parameters, trained with "
        f"{m['trained_attention']} attention, tile {'x'.join(map(str, m['trained_tile']))}); "
        f"latents {'x'.join(map(str, report['latent_shape']))} = token grid "
        f"{'x'.join(map(str, report['token_grid']))} ({report['tokens']} tokens). "
        f"{s['num_videos']} videos, {s['steps']} {s['method']} steps, CFG {s['cfg_scale']}, "
        f"seed {s['seed']}, {report['device']}, torch {report['torch']}, precision {s['precision']}, "
        f"{report['date']}.",
        "",
        f"Attention: ms per model evaluation (all {m['depth']} blocks, CFG batch), mean of "
        f"{s['forwards']} after {s['warmup']} warm-up; sampling: median of {s['repeats']} run(s), "
        "decoding included; drift of the decoded videos against "
        f"`{report['reference']}` (same noise and labels); "
        + ("validation loss: not measured." if val is None else
           f"validation loss: the training protocol on {val['samples']} validation samples "
           f"(n_t {val['n_t']}), change against `{report['reference']}` in brackets."),
        "",
        "| pattern | tile | kept | attention ms | attention speedup | sampling s | sampling speedup "
        "| rel. L2 | PSNR dB | val loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        speed = row["attention_speedup"]
        psnr = "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        rel = "0" if row["rel_l2"] == 0 else f"{row['rel_l2']:.2e}"
        loss = "-" if row["val_loss"] is None else (
            f"{row['val_loss']:.4f}" + ("" if row["label"] == report["reference"]
                                        else f" ({row['val_loss_delta']:+.3g})"))
        lines.append(
            f"| {row['label']} | {'x'.join(map(str, row['tile']))} | {100 * row['kept']:.1f}% | "
            f"{_ms(row['attention_ms'])} | {'-' if speed is None else f'{speed:.2f}x'} | "
            f"{_ms(row['sampling_s'])} | {row['sampling_speedup']:.2f}x | {rel} | {psnr} | {loss} |")
    return "\n".join(lines) + "\n"
