"""`sample(cfg)`: videos from a training checkpoint (configs/sample.yaml).

The checkpoint brings its own model config, latent shape, codec and timestep recipe; the config
chooses the weights (EMA or raw), the attention backend and sparsity (train dense, sample
sparse), the tile size (the group size of the static patterns, e.g. GRAT's 4x8x8; the weights do
not depend on it), the sampler (Euler/Heun), the guidance weight and the seed. Output:
video_XX.mp4, grid.png, latents.pt (the raw samples, fp32) and .hydra/config.yaml in `output_dir`,
created only once the videos exist. `ckpt_path` may be a run folder (its checkpoints/last.ckpt).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vsa.attention import BACKENDS
from vsa.checkpoint import load_guide, load_model
from vsa.config import ConfigError, check_missing, config_section
from vsa.data.codecs import build_codec
from vsa.data.media import save_grid, to_uint8_frames, write_mp4
from vsa.data.text import TextEncoder
from vsa.diffusion import check_interval, check_sampling, generate, timestep_shift
from vsa.models import VideoDiT
from vsa.models.config import check_sparsity
from vsa.models.wan import WanVideoModel

log = logging.getLogger(__name__)


def precision_autocast(precision: str, device: torch.device):
    """The autocast context of `precision` on `device`: "bf16" -> bf16 autocast, "32" -> none,
    "auto" -> bf16 on CUDA, fp32 elsewhere (a ConfigError for anything else)."""
    if precision not in ("auto", "32", "bf16"):
        raise ConfigError(f"precision must be auto, 32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    if device.type == "cpu":
        log.warning("precision=bf16 on the CPU is slow (about 14x slower than fp32 on a 2-core "
                    "machine: CPUs without bf16 matrix units emulate it); precision=auto uses fp32 here")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def needs_sparsity(model: VideoDiT | WanVideoModel) -> bool:
    """Whether the model's attention backend reads a sparsity / top-k (VSA)."""
    return BACKENDS[model.cfg.attention].needs_sparsity  # (set_attention keeps cfg.attention current)


def swap_attention(model: VideoDiT, name: str, options: dict | None = None,
                   sparsity: float | None = None, topk: int | None = None) -> None:
    """Give a loaded model the attention backend `name` (train dense, sample sparse).

    A backend other than the checkpoint's is built fresh with `options`, and the model takes its
    `sparsity` / `topk`; the checkpoint's own backend is kept as trained (options ignored).
    """
    if name == model.cfg.attention:
        return
    options = dict(options or {})
    if name in BACKENDS:  # (an unknown name fails in set_attention, with the known ones)
        # A backend swapped in after training has no learned gates (VSA: "adapt" gates).
        options = BACKENDS[name].swap_in_options(options)
    model.set_attention(name, **options)
    model.sparsity, model.topk = sparsity, topk


def read_prompts(cfg: DictConfig) -> list[str] | None:
    """One prompt per video: `prompt` for all of them, or `prompts_file`'s non-empty lines, cycled
    over `num_videos`; None when neither is set."""
    prompt, path = cfg.get("prompt"), cfg.get("prompts_file")
    if prompt is not None and path is not None:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    if path is not None:
        with config_section("prompts_file"):
            lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"{path} holds no prompt (one per line)")
    elif prompt is not None:
        lines = [str(prompt)]
    else:
        return None
    return [lines[i % len(lines)] for i in range(cfg.num_videos)]


def sample(cfg: DictConfig) -> dict:
    """Sample `cfg.num_videos` videos; return the written paths and the seconds per video."""
    check_missing(cfg)
    out = Path(cfg.output_dir)  # read once: the default holds the launch time
    with config_section("sampling"):
        check_sampling(cfg.num_videos, cfg.steps, cfg.method, cfg.cfg_scale, cfg.seed)
        cfg_interval = check_interval(cfg.get("cfg_interval"))
    with config_section("sparsity"):
        check_sparsity(cfg.sparsity, cfg.topk)
    with config_section("ckpt_path"):
        model, spec = load_model(cfg.ckpt_path, ema=cfg.ema)
    guide = None
    if cfg.get("guide_ckpt_path") is not None:  # autoguidance: a weaker checkpoint guides
        with config_section("guide_ckpt_path"):
            guide = load_guide(cfg.guide_ckpt_path, spec, ema=cfg.ema)
    if isinstance(model, WanVideoModel) and (cfg.get("attention") is not None or cfg.get("tile") is not None):
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path} holds a Wan finetune, sampled with its own attention "
                          "and tiles; attention= and tile= swaps are for VideoDiT checkpoints (sparsity= works)")

    swap = cfg.get("attention")
    if swap is not None:
        with config_section("attention"):
            swap_attention(model, swap.name, OmegaConf.to_container(swap.options, resolve=True),
                           swap.sparsity, swap.topk)
    if cfg.sparsity is not None or cfg.topk is not None:  # explicit values win; topk over sparsity
        model.sparsity, model.topk = cfg.sparsity, cfg.topk
    if needs_sparsity(model) and model.sparsity is None and model.topk is None:
        raise ConfigError(f"attention={model.cfg.attention} needs a sparsity: add sparsity=<value in "
                          "[0, 1)> (or topk=<K>)")
    if cfg.get("tile") is not None:
        with config_section("tile"):
            tile = cfg.tile
            model.set_tile(list(tile) if isinstance(tile, ListConfig) else tile)

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if guide is not None:
        guide.to(device)
    latent_shape = spec["latent_shape"]
    ts = spec["timesteps"]
    shift = cfg.shift if cfg.shift is not None else (
        lambda seq_len: timestep_shift(seq_len, ts["shift"], ts["base_seq_len"], ts["base_shift"]))
    labels = None if cfg.labels is None else list(cfg.labels)
    prompts = read_prompts(cfg)
    text_encoder = None
    if cfg.get("text_encoder") is not None:
        with config_section("text_encoder"):
            text_encoder = TextEncoder.from_folder(cfg.text_encoder, cfg.text_max_length).to(device)

    start = time.perf_counter()
    with config_section("sampling"), precision_autocast(str(cfg.precision), device):
        latents = generate(model, latent_shape, cfg.num_videos, labels=labels, prompts=prompts,
                           text_encoder=text_encoder, steps=cfg.steps,
                           method=cfg.method, cfg_scale=cfg.cfg_scale, cfg_interval=cfg_interval,
                           shift=shift, seed=cfg.seed, device=device, progress=True, guide=guide)
        pixels = build_codec(**spec["codec"]).to(device).decode(latents.float())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)  # only now: a failed sampling leaves no empty folder
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    frames = to_uint8_frames(pixels)
    fps = cfg.fps or spec["fps"]
    videos = [write_mp4(out / f"video_{i:02d}.mp4", f, fps) for i, f in enumerate(frames)]
    grid = save_grid(out / "grid.png", frames)
    latents_path = out / "latents.pt"
    torch.save(latents.cpu(), latents_path)
    per_video = seconds / cfg.num_videos
    attention = model.cfg.attention + (f" (sparsity {model.sparsity})" if needs_sparsity(model) else "")
    attention += f", tile {'x'.join(map(str, model.cfg.tile))}"
    print(f"{cfg.num_videos} videos, {cfg.steps} {cfg.method} steps, {attention}, on {device}: "
          f"{seconds:.2f} s ({per_video:.2f} s per video) -> {out}")
    return {"videos": videos, "grid": grid, "latents": latents_path, "seconds_per_video": per_video}
