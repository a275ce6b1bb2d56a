"""Generate videos of every class with a model and score them against its data set.

    python -m vsa.eval.samples ckpt_path=logs/train/runs/default/checkpoints/last.ckpt
    python -m vsa.eval.samples ckpt_path=... per_class=16 cfg_scale=1.0 ema=false steps=32

prints `class_acc`, `fd`, `shape_acc` (see `vsa.eval.metrics`) and the reference values of real held-out
videos, and writes scores.json and grid.png (one row per generated video, classes in order) to
`logs/eval/<date>_<time>/` (or output_dir=...). The data set is the one the checkpoint's run
trained on (stored in the checkpoint by the SampleQuality callback, else read from the run
folder's .hydra/config.yaml), or `data=NAME` (configs/data/) with any overrides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vsa.eval.classifier import ClassifierRecipe, ShapeRecipe
from vsa.eval.metrics import SampleMetrics


def metrics_for(dataset_cfg: Mapping, num_classes: int | None = None,
                cache_dir: str | Path | None = None, recipe: Mapping | None = None,
                shape_recipe: Mapping | None = None) -> SampleMetrics:
    """SampleMetrics of a data set config (the classifiers trained once, then cached); `recipe`
    and `shape_recipe` change ClassifierRecipe and ShapeRecipe fields."""
    def fields(overrides: Mapping | None) -> dict:
        return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in (overrides or {}).items()}

    return SampleMetrics.for_dataset(dataset_cfg, num_classes, ClassifierRecipe(**fields(recipe)), cache_dir,
                                     shape_recipe=ShapeRecipe(**fields(shape_recipe)))


@torch.no_grad()
def class_labels(num_classes: int, per_class: int) -> list[int]:
    """The class of each video `generate_and_score` generates: 0, 1, ..., C-1, 0, 1, ..."""
    return [i % num_classes for i in range(per_class * num_classes)]


def generate_and_score(model, latent_shape, decode: Callable[[torch.Tensor], torch.Tensor],
                       metrics: SampleMetrics, per_class: int = 4, steps: int = 16,
                       method: str = "euler", cfg_scale: float = 4.0,
                       shift: float | Callable[[int], float] = 1.0, seed: int = 0,
                       cfg_interval: Sequence[float] | None = None,
                       batch_size: int = 40, confusion: bool = False, guide=None) -> tuple[dict, torch.Tensor]:
    """Generate `per_class` videos of each class (labels 0, 1, ..., C-1, 0, 1, ...), decode them to
    pixels with `decode` and score them (`confusion`: with the shape confusion table, see
    `SampleMetrics.score`; `guide`: autoguidance's weaker model, `vsa.diffusion.generate`).
    Returns (scores, pixel videos [N, C, T, H, W] on the CPU).

    Generation runs in chunks of `batch_size` videos with seeds seed, seed + 1, ... per chunk.
    """
    from vsa.diffusion import generate

    num_classes = model.cfg.num_classes
    if not num_classes:
        raise ValueError("the model is not class-conditional (num_classes=0): class accuracy and "
                         "per-class generation need a class-conditional model")
    if num_classes != metrics.num_classes:
        raise ValueError(f"the model has {num_classes} classes, the metric's classifier "
                         f"{metrics.num_classes}; score with the data set the model was trained on")
    labels = class_labels(num_classes, per_class)
    device = next(model.parameters()).device
    videos = []
    for chunk in range(math.ceil(len(labels) / batch_size)):
        ids = labels[chunk * batch_size:(chunk + 1) * batch_size]
        latents = generate(model, latent_shape, len(ids), labels=ids, steps=steps, method=method,
                           cfg_scale=cfg_scale, cfg_interval=cfg_interval, shift=shift,
                           seed=seed + chunk, device=device, guide=guide)
        videos.append(decode(latents.float()).float().cpu())
    videos = torch.cat(videos)
    return metrics.score(videos, torch.tensor(labels), confusion=confusion), videos


def dataset_config(ckpt_path: str | Path, checkpoint: dict, override: Mapping | None) -> dict:
    """The data set config to score a checkpoint against: `override` (the `data` group), else the
    one stored by the SampleQuality callback, else the run folder's .hydra/config.yaml."""
    if override:
        return OmegaConf.to_container(override.datamodule.dataset, resolve=True)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("dataset"), dict):
            return state["dataset"]
    from vsa.checkpoint import find_data_config

    run_config = find_data_config(ckpt_path)
    if run_config is not None:
        cfg = OmegaConf.load(run_config)
        node = OmegaConf.select(cfg, "data.datamodule.dataset")
        if node is not None:
            return OmegaConf.to_container(node, resolve=False)
    raise ValueError(f"no data set config found for {ckpt_path} (neither in the checkpoint nor in "
                     "its run folder's .hydra/config.yaml); add data=NAME (e.g. data=synthetic) with "
                     "the run's overrides")


def evaluate(cfg: DictConfig) -> dict:
    """Score a checkpoint (configs/eval.yaml); returns the scores and the written paths."""
    from vsa.checkpoint import CHECKPOINT_KEY, load_guide, model_from_checkpoint, read_checkpoint
    from vsa.config import check_missing, config_section
    from vsa.data.codecs import build_codec
    from vsa.data.media import save_grid, to_uint8_frames
    from vsa.diffusion import timestep_shift

    check_missing(cfg)
    with config_section("ckpt_path"):
        checkpoint = read_checkpoint(cfg.ckpt_path)
        model = model_from_checkpoint(checkpoint, ema=cfg.ema)
    spec = checkpoint[CHECKPOINT_KEY]
    guide = None
    if cfg.get("guide_ckpt_path") is not None:  # autoguidance: a weaker checkpoint guides
        with config_section("guide_ckpt_path"):
            guide = load_guide(cfg.guide_ckpt_path, spec, ema=cfg.ema)
    with config_section("data"):
        dataset = dataset_config(cfg.ckpt_path, checkpoint, cfg.get("data"))
        recipe, shape_recipe = (None if cfg.get(k) is None else OmegaConf.to_container(cfg[k], resolve=True)
                                for k in ("recipe", "shape_recipe"))
        metrics = metrics_for(dataset, model.cfg.num_classes, cfg.cache_dir, recipe, shape_recipe)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if guide is not None:
        guide.to(device)
    codec = build_codec(**spec["codec"]).to(device)
    ts = spec["timesteps"]
    shift = cfg.shift if cfg.shift is not None else (
        lambda seq_len: timestep_shift(seq_len, ts["shift"], ts["base_seq_len"], ts["base_shift"]))
    with config_section("sampling"):
        scores, videos = generate_and_score(model, spec["latent_shape"], codec.decode, metrics,
                                            per_class=cfg.per_class, steps=cfg.steps,
                                            method=cfg.method, cfg_scale=cfg.cfg_scale, shift=shift,
                                            seed=cfg.seed, cfg_interval=cfg.get("cfg_interval"),
                                            confusion=metrics.shapes is not None, guide=guide)
    confusion = scores.pop("shape_confusion", None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(out / "grid.png", to_uint8_frames(videos[:2 * model.cfg.num_classes]))
    result = {**scores, "chance_class_acc": 1.0 / model.cfg.num_classes,
              "real_class_acc": metrics.holdout_accuracy, "real_shape_acc": metrics.real_shape_acc,
              "real_pieces": metrics.real_pieces,
              "chance_shape_acc": None if metrics.shapes is None else 1.0 / len(metrics.shapes[1]["shape_names"]),
              "num_videos": int(videos.shape[0]),
              "ckpt_path": str(cfg.ckpt_path), "ema": bool(cfg.ema), "steps": int(cfg.steps),
              "cfg_scale": float(cfg.cfg_scale), "method": str(cfg.method),
              "cfg_interval": None if cfg.get("cfg_interval") is None else list(cfg.cfg_interval),
              "guide_ckpt_path": None if cfg.get("guide_ckpt_path") is None else str(cfg.guide_ckpt_path)}
    if confusion is not None:  # which shape is seen for each prompted one
        result["shape_confusion"] = confusion
    (out / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"class_acc {scores['class_acc']:.3f} (chance {1 / model.cfg.num_classes:.3f}, real "
          f"{metrics.holdout_accuracy:.3f}), fd {scores['fd']:.2f}"
          + (f", shape_acc {scores['shape_acc']:.3f} (chance {result['chance_shape_acc']:.3f}, real "
             f"{metrics.real_shape_acc:.3f})" if "shape_acc" in scores else "")
          + f" over {videos.shape[0]} videos -> {out}")
    if "shape_confusion" in result:
        real = "-" if metrics.real_pieces is None else f"{metrics.real_pieces:.2f}"
        print(f"pieces per object frame {scores['pieces']:.2f} (real {real}); per prompted shape, "
              "shape_acc / pieces: " + ", ".join(
                  f"{name} {acc:.2f} / {result['shape_confusion']['pieces'][name]:.2f}"
                  for name, acc in result["shape_confusion"]["acc"].items()))
    return {**result, "grid": grid}


@hydra.main(version_base=None, config_path="../../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
