"""`compare_patterns`: sample one checkpoint with every pattern from the same noise and compare
(the package docstring says what is measured, and how)."""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vsa.attention.spec import parse_pattern
from vsa.checkpoint import CHECKPOINT_KEY, find_data_config, model_from_checkpoint, read_checkpoint
from vsa.data.codecs import build_codec
from vsa.data.media import save_grid, to_uint8_frames
from vsa.diffusion import default_labels, generate, timestep_shift
from vsa.models import DiTConfig, VideoDiT, count_params
from vsa.sampling.compare.patterns import backend_options, check_patterns, configure, kept_fraction
from vsa.sampling.compare.quality import protocol_loss, video_drift
from vsa.sampling.compare.report import markdown_report
from vsa.sampling.compare.timing import Clock, noise_and_velocity, time_evaluations
from vsa.sampling.run import needs_sparsity, precision_autocast
from vsa.training.validation_data import validation_batches


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
    clock = Clock(cuda)
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
        with precision_autocast(precision, device):
            x, velocity = noise_and_velocity(model, latent_shape, num_videos, labels, cfg_scale,
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
            "options": backend_options(model),
            "sparsity": model.sparsity if needs_sparsity(model) else None,
            "topk": model.topk if needs_sparsity(model) else None,
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
