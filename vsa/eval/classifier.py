"""A small 3D-conv video classifier trained on a data set, cached on disk: the feature network of
the sample-quality metrics (`vsa.eval.metrics`).

    net = classifier_for(dataset_cfg)          # trained once (seconds on a CPU), then loaded
    logits, features = net(videos)             # videos [B, C, T, H, W] in [-1, 1], any size

Every input is first brought to a fixed `input_size` (T, H, W) by adaptive average pooling (area
averaging when shrinking, repetition when growing), so a 3x16x128x128 video and a 3x8x32x32 one
go through the same network. `features` is the penultimate layer (global average over space-time
of the last conv stage): the space the Fréchet distance is computed in.

Training is deterministic (seeded init, seeded batch order, CPU, fp32): the same data set and
recipe give the same weights on every machine, so the cache is keyed by the data set's config and
the recipe (`cache_key`). The cache is a safetensors file plus a JSON with the recipe and the
classifier's held-out accuracy, under `cache_dir` (default `$VSA_CACHE/eval` or
`~/.cache/vsa/eval`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

RECIPE_VERSION = 1  # bump when the network or training changes: old cache entries are ignored


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is built and trained (part of the cache key)."""

    input_size: tuple[int, int, int] = (8, 32, 32)  # (T, H, W) every video is pooled to
    widths: tuple[int, int, int] = (16, 32, 64)      # channels of the three conv stages
    steps: int = 120
    batch_size: int = 16
    lr: float = 3e-3
    train_samples: int = 512      # samples of the data set used for training (the first ones)
    holdout_samples: int = 256    # the next ones: held-out accuracy + the real feature statistics
    seed: int = 0


@dataclass(frozen=True)
class ShapeRecipe:
    """How the shape classifier is built and trained (part of its cache key): a per-frame
    classifier of foreground masks (`foreground`), so it sees outlines, not colour or motion."""

    size: tuple[int, int] = (32, 32)                 # (H, W) every frame is pooled to
    widths: tuple[int, int, int] = (16, 32, 64)
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    train_samples: int = 512      # videos, as ClassifierRecipe (every frame of each)
    holdout_samples: int = 256
    min_pixels: int = 8           # frames with less foreground (an object out of the frame) are skipped
    seed: int = 0


def default_cache_dir() -> Path:
    """`$VSA_CACHE/eval`, else `~/.cache/vsa/eval`."""
    root = os.environ.get("VSA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsa") / "eval"


class VideoClassifier(nn.Module):
    """Pool to `input_size` -> three Conv3d stages (GroupNorm, GELU; the first two downsample by
    2 in space, the second also in time) -> global average -> features [B, widths[-1]] -> logits."""

    def __init__(self, num_classes: int, channels: int = 3, input_size: Sequence[int] = (8, 32, 32),
                 widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        self.num_classes, self.channels = int(num_classes), int(channels)
        self.input_size = tuple(int(s) for s in input_size)
        w1, w2, w3 = (int(w) for w in widths)

        def stage(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1),
                                 nn.GroupNorm(8, c_out), nn.GELU())

        self.body = nn.Sequential(stage(self.channels, w1, (1, 2, 2)), stage(w1, w2, (2, 2, 2)),
                                  stage(w2, w3, (1, 1, 1)))
        self.head = nn.Linear(w3, self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def prepare(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] (any T, H, W) -> [B, channels, *input_size] fp32."""
        if videos.dim() != 5:
            raise ValueError(f"videos must be [B, C, T, H, W], got shape {tuple(videos.shape)}")
        x = videos.float()
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1, -1)
            else:
                raise ValueError(f"videos have {x.shape[1]} channels, the classifier {self.channels}; "
                                 "decode latents to pixels first (module.decode / the codec)")
        if tuple(x.shape[2:]) != self.input_size:
            x = F.adaptive_avg_pool3d(x, self.input_size)
        return x

    def forward(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, num_classes], features [B, feature_dim])."""
        features = self.body(self.prepare(videos)).mean(dim=(2, 3, 4))
        return self.head(features), features


def plain_config(value):
    """A JSON-able copy of a config (OmegaConf containers included)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


def cache_key(dataset_cfg: Mapping, recipe: ClassifierRecipe) -> str:
    """16 hex digits of a hash of (data set config, recipe, RECIPE_VERSION)."""
    blob = json.dumps({"data": plain_config(dataset_cfg), "recipe": dataclasses.asdict(recipe),
                       "version": RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_dataset(dataset_cfg: Mapping) -> Dataset:
    """The data set of a config with `_target_` (e.g. data.datamodule.dataset of a run)."""
    from hydra.utils import instantiate

    cfg = plain_config(dataset_cfg)
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise ValueError("the data set config must be a mapping with `_target_` (e.g. the run's "
                         f"data.datamodule.dataset), got {cfg!r}")
    return instantiate(cfg)


def stack_items(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos [N, C, T, H, W] fp32, labels [N]) of dataset items {"video", "label"}."""
    videos, labels = [], []
    for i in indices:
        item = dataset[int(i)]
        if "video" not in item or "label" not in item:
            raise KeyError(f"data set items need 'video' and 'label' to train a classifier; item {i} "
                           f"has {sorted(item)}")
        videos.append(torch.as_tensor(item["video"]).float())
        labels.append(int(item["label"]))
    return torch.stack(videos), torch.tensor(labels, dtype=torch.long)


def split_indices(n: int, recipe: ClassifierRecipe) -> tuple[list[int], list[int]]:
    """(training, held-out) indices: a seeded permutation of the data set, its first
    `train_samples`, then the next `holdout_samples` (fewer when the data set is small)."""
    if n < 4:
        raise ValueError(f"the data set has {n} samples; the classifier needs at least 4")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + 1)).tolist()
    n_hold = min(recipe.holdout_samples, max(1, n // 4))
    n_train = min(recipe.train_samples, n - n_hold)
    return perm[:n_train], perm[n_train:n_train + n_hold]


@torch.no_grad()
def predict(net: VideoClassifier, videos: torch.Tensor, batch_size: int = 64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of many videos, in batches, in eval mode, on the CPU in fp32."""
    net.eval()
    logits, features = [], []
    for start in range(0, videos.shape[0], batch_size):
        lo, fe = net(videos[start:start + batch_size].cpu())
        logits.append(lo)
        features.append(fe)
    return torch.cat(logits), torch.cat(features)


def fit(net: VideoClassifier, inputs: torch.Tensor, targets: torch.Tensor,
        recipe: ClassifierRecipe | ShapeRecipe, transpose: bool = False) -> float:
    """Train `net` on (inputs, targets) with the recipe's AdamW + one-cycle schedule: random
    batches and random flips (and transpositions), which keep shape classes and motion meaningful.
    Returns the last batch's loss."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    order = torch.Generator().manual_seed(recipe.seed)
    net.train()
    for _ in range(recipe.steps):
        batch = torch.randint(inputs.shape[0], (recipe.batch_size,), generator=order)
        x = inputs[batch]
        flips = torch.rand(3 if transpose else 2, generator=order) < 0.5
        if flips[0]:
            x = x.flip(-1)
        if flips[1]:
            x = x.flip(-2)
        if transpose and flips[2]:
            x = x.transpose(-1, -2)
        loss = F.cross_entropy(net(x)[0], targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def train_classifier(dataset: Dataset, num_classes: int, recipe: ClassifierRecipe | None = None,
                     ) -> tuple[VideoClassifier, dict]:
    """Train a VideoClassifier on `dataset` (items {"video", "label"}) deterministically on the CPU.

    Returns the network (eval mode) and a summary: held-out accuracy, the held-out features'
    mean and covariance (the real statistics of the Fréchet distance) and the sample counts.
    """
    recipe = recipe or ClassifierRecipe()
    train_idx, hold_idx = split_indices(len(dataset), recipe)
    videos, labels = stack_items(dataset, train_idx)
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}); got {int(labels.min())}.."
                         f"{int(labels.max())}; set num_classes to the data set's class count")
    # Gradients on, even when called from a validation hook (no_grad / inference mode there).
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        net = VideoClassifier(num_classes, videos.shape[1], recipe.input_size, recipe.widths)
        x_all = net.prepare(videos)  # pool once: the training loop sees only input_size tensors
        final_loss = fit(net, x_all, labels, recipe)
    net.eval()
    hold_videos, hold_labels = stack_items(dataset, hold_idx)
    logits, features = predict(net, hold_videos)
    accuracy = float((logits.argmax(1) == hold_labels).float().mean())
    mu, sigma = feature_stats(features)
    summary = {"holdout_accuracy": accuracy, "train_samples": len(train_idx),
               "holdout_samples": len(hold_idx), "final_loss": final_loss, "mu": mu, "sigma": sigma}
    return net, summary


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) of features [N, D], in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {tuple(features.shape)}")
    f = features.detach().double().cpu()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def foreground(videos: torch.Tensor, size: Sequence[int] = (32, 32)) -> torch.Tensor:
    """Foreground masks [N, 1, T, *size] (0/1 fp32) of pixel videos [N, C, T, H, W] in [-1, 1]:
    each frame area-pooled to `size`, then a pixel is foreground where some channel is brighter
    than mid-grey (0). The procedural data sets draw bright objects (every hue has a channel of
    0.6 or more) over a dark background (below -0.5), so the mask is the objects' silhouettes."""
    if videos.dim() != 5:
        raise ValueError(f"videos must be [N, C, T, H, W], got shape {tuple(videos.shape)}")
    x = videos.float()
    if tuple(x.shape[3:]) != tuple(size):
        x = F.adaptive_avg_pool3d(x, (x.shape[2], *size))
    return (x.amax(dim=1, keepdim=True) > 0.0).float()


def mask_frames(videos: torch.Tensor, recipe: ShapeRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [N * T, 1, 1, H, W], has_object [N, T] bool): every frame's foreground mask as a
    one-frame video for the shape classifier, and whether it holds at least `min_pixels`."""
    masks = foreground(videos, recipe.size)  # [N, 1, T, H, W]
    n, _, t, h, w = masks.shape
    frames = masks.permute(0, 2, 1, 3, 4).reshape(n * t, 1, 1, h, w)
    return frames, masks.sum(dim=(1, 3, 4)) >= recipe.min_pixels


def count_pieces(videos: torch.Tensor, recipe: ShapeRecipe, min_size: int = 3) -> torch.Tensor:
    """The number of separate pieces of foreground per object frame, averaged over each video's
    frames that hold an object [N] (NaN for a video with none): connected regions (8-neighbour) of
    the `foreground` mask with at least `min_size` pixels. A whole object is one piece; confetti, or
    a ring drawn as broken arcs, is many; real clips with k objects give up to k (fewer where
    objects touch; an object wrapping around the frame edge is two)."""
    from scipy import ndimage

    masks = foreground(videos.float().cpu(), recipe.size)[:, 0].numpy().astype(bool)  # [N, T, H, W]
    has_object = masks.sum(axis=(2, 3)) >= recipe.min_pixels
    # One labelling of every frame at once: 8-neighbour connectivity within a frame, none across
    # frames or videos, so each region lies in one frame.
    within_frame = np.zeros((3, 3, 3, 3), dtype=bool)
    within_frame[1, 1] = True
    regions, count = ndimage.label(masks & has_object[..., None, None], structure=within_frame)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    frame_of = np.zeros(count + 1, dtype=np.int64)  # the (video, frame) index of every region
    frame_of[regions.ravel()] = np.repeat(np.arange(masks.shape[0] * masks.shape[1]), masks[0, 0].size)
    kept = np.nonzero(sizes[1:] >= min_size)[0] + 1
    pieces = np.bincount(frame_of[kept], minlength=has_object.size).reshape(has_object.shape)
    frames = has_object.sum(1)
    per_video = np.full(len(frames), np.nan)
    per_video[frames > 0] = pieces.sum(1)[frames > 0] / frames[frames > 0]
    return torch.from_numpy(per_video)


@torch.no_grad()
def predict_shapes(net: VideoClassifier, videos: torch.Tensor, recipe: ShapeRecipe) -> torch.Tensor:
    """The shape of each video [N] (index into the data set's shapes): the argmax of the frame
    classifier's probabilities averaged over the frames that hold an object; -1 (no shape) for a
    video where no frame does."""
    frames, has_object = mask_frames(videos.float().cpu(), recipe)
    probs = predict(net, frames)[0].softmax(-1).view(*has_object.shape, -1)  # [N, T, S]
    probs = (probs * has_object[..., None]).sum(1)
    return torch.where(has_object.any(1), probs.argmax(-1), torch.full_like(probs[:, 0], -1).long())


def shape_split(dataset: Dataset, recipe: ShapeRecipe) -> tuple[list[int], list[int]]:
    """The shape classifier's (training, held-out) sample indices of `dataset`."""
    return split_indices(len(dataset), ClassifierRecipe(
        train_samples=recipe.train_samples, holdout_samples=recipe.holdout_samples, seed=recipe.seed))


def train_shape_classifier(dataset: Dataset, recipe: ShapeRecipe | None = None
                           ) -> tuple[VideoClassifier, dict]:
    """Train the per-frame shape classifier on `dataset`, whose class -> shape map is its
    `shape_of(label)` and whose shape count is `len(dataset.shape_names)` (SyntheticVideoDataset and
    its subclasses), deterministically on the CPU. Returns the network and a summary with the
    held-out videos' shape accuracy (`holdout_accuracy`)."""
    recipe = recipe or ShapeRecipe()
    num_shapes = len(dataset.shape_names)
    train_idx, hold_idx = shape_split(dataset, recipe)
    videos, labels = stack_items(dataset, train_idx)
    frames, has_object = mask_frames(videos, recipe)
    shapes = torch.tensor([dataset.shape_of(int(c)) for c in labels])
    keep = has_object.reshape(-1)
    frames, targets = frames[keep], shapes.repeat_interleave(has_object.shape[1])[keep]
    if frames.shape[0] < recipe.batch_size:
        raise ValueError(f"only {frames.shape[0]} frames hold an object of >= {recipe.min_pixels} "
                         "foreground pixels; the shape classifier needs bright objects on a dark background")
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        net = VideoClassifier(num_shapes, 1, (1, *recipe.size), recipe.widths)
        # Transposition too: all five shapes are symmetric under it.
        final_loss = fit(net, frames, targets, recipe, transpose=True)
    net.eval()
    hold_videos, hold_labels = stack_items(dataset, hold_idx)
    predicted = predict_shapes(net, hold_videos, recipe)
    truth = torch.tensor([dataset.shape_of(int(c)) for c in hold_labels])
    summary = {"holdout_accuracy": float((predicted == truth).float().mean()),
               "holdout_pieces": float(count_pieces(hold_videos, recipe).nanmean()),
               "train_frames": int(frames.shape[0]), "holdout_samples": len(hold_idx),
               "final_loss": final_loss, "shape_names": list(dataset.shape_names)}
    return net, summary


def _cached(folder: Path, name: str, cfg, recipe, build, arrays: tuple[str, ...] = ()
            ) -> tuple[VideoClassifier, dict]:
    """Load network `name` (with the summary's `arrays` as tensors) from the cache, or `build()`
    it and write it there atomically (safetensors + JSON)."""
    from safetensors.torch import load_file, save_file

    weights, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        state = load_file(weights)
        input_size = meta.get("input_size") or meta["recipe"]["input_size"]  # older entries: the recipe's
        net = VideoClassifier(meta["num_classes"], meta["channels"], input_size, meta["recipe"]["widths"])
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("stats.")})
        summary = {**meta["summary"], **{k: state[f"stats.{k}"].double() for k in arrays}}
        return net.eval(), summary

    net, summary = build()
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state.update({f"stats.{k}": summary[k] for k in arrays})
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    meta = {"data": cfg, "recipe": dataclasses.asdict(recipe), "channels": net.channels,
            "num_classes": net.num_classes, "input_size": list(net.input_size),
            "summary": {k: v for k, v in summary.items() if k not in arrays}}
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, meta_path)
    return net, summary


def shape_classifier_for(dataset_cfg: Mapping, dataset: Dataset | None = None,
                         recipe: ShapeRecipe | None = None, cache_dir: str | Path | None = None
                         ) -> tuple[VideoClassifier, dict] | None:
    """The shape classifier of a data set config, trained once and cached; None when the data set
    class has no class -> shape map (`shape_of` and `shape_names`: the procedural shapes only)."""
    cfg = plain_config(dataset_cfg)
    if shape_map(dataset if dataset is not None else cfg) is None:
        return None
    recipe = recipe or ShapeRecipe()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    net, summary = _cached(folder, f"shapes_{cache_key(cfg, recipe)}", cfg, recipe,
                           lambda: train_shape_classifier(dataset if dataset is not None else build_dataset(cfg),
                                                          recipe))
    if "holdout_pieces" not in summary:  # cached before pieces were counted: count them now
        data = dataset if dataset is not None else build_dataset(cfg)
        hold_videos, _ = stack_items(data, shape_split(data, recipe)[1])
        summary["holdout_pieces"] = float(count_pieces(hold_videos, recipe).nanmean())
    return net, summary


def shape_map(dataset) -> type | None:
    """The data set's class if it maps classes to shapes (static `shape_of(label)` and
    `shape_names`), else None; `dataset` is an instance or a config with `_target_` (its class is
    imported, not built)."""
    if isinstance(dataset, Mapping):
        from hydra.utils import get_class

        cls = get_class(dataset["_target_"]) if "_target_" in dataset else None
    else:
        cls = type(dataset)
    return cls if hasattr(cls, "shape_of") and hasattr(cls, "shape_names") else None


def classifier_for(dataset_cfg: Mapping, num_classes: int | None = None,
                   recipe: ClassifierRecipe | None = None, cache_dir: str | Path | None = None,
                   dataset: Dataset | None = None) -> tuple[VideoClassifier, dict]:
    """The classifier of a data set config (with `_target_`), trained once and cached.

    `num_classes` defaults to the config's `num_classes`; `dataset` (an instance built from the
    same config) saves rebuilding it. Returns (network, summary) as `train_classifier` does.
    """
    recipe = recipe or ClassifierRecipe()
    cfg = plain_config(dataset_cfg)
    if num_classes is None:
        num_classes = cfg.get("num_classes") if isinstance(cfg, Mapping) else None
        if not num_classes:
            raise ValueError("the data set config has no num_classes; pass num_classes=... (the "
                             "sample metrics need a class-labelled data set)")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _cached(folder, f"classifier_{cache_key(cfg, recipe)}", cfg, recipe,
                   lambda: train_classifier(dataset if dataset is not None else build_dataset(cfg),
                                            int(num_classes), recipe),
                   arrays=("mu", "sigma"))
