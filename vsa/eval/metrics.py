"""Sample-quality metrics of generated videos against a data set, in the feature space of a
classifier trained on that data set (`vsa.eval.classifier`):

- **class accuracy** (`class_acc`): the fraction of videos generated for class c that the
  classifier assigns to c. Chance is 1 / num_classes; real held-out videos score the classifier's
  held-out accuracy (~1 on the procedural data).
- **Fréchet distance** (`fd`): between Gaussians fitted to the classifier features (penultimate
  layer) of the generated videos and of real held-out videos,
  ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) (FID's formula in our own feature space;
  numbers are comparable only between runs scored with the same classifier). It is biased upwards
  for small sample counts: compare runs at the same number of generated videos.

- **shape accuracy** (`shape_acc`, the procedural shapes data sets only): the fraction of videos
  generated for class c whose objects have class c's shape, by a per-frame classifier of
  foreground masks (`vsa.eval.classifier.train_shape_classifier`). It sees outlines, not colour or
  motion, so scattered blocks of the right colour, which pass `class_acc`, fail it. Chance is
  1 / the number of shapes; a video with no object in any frame counts as wrong.
- **pieces** (`pieces`, the same data sets): separate pieces of foreground per frame that holds an
  object, averaged over frames and videos (`vsa.eval.classifier.count_pieces`). Whole objects give
  about the number of objects per clip (the real held-out videos': `real_pieces`); fragments, which
  the shape classifier can take for a ring, give more.

    metrics = SampleMetrics.for_dataset(cfg.data.datamodule.dataset)
    metrics.score(videos, labels)   # {"class_acc": ..., "fd": ..., "shape_acc": ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vsa.eval.classifier import (
    ClassifierRecipe,
    ShapeRecipe,
    VideoClassifier,
    classifier_for,
    count_pieces,
    feature_stats,
    plain_config,
    predict,
    predict_shapes,
    shape_classifier_for,
    shape_map,
)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (scipy's sqrtm; a tiny diagonal offset is
    added when the product is singular, as in the FID reference code)."""
    from scipy import linalg

    m1, m2 = mu1.double().numpy(), mu2.double().numpy()
    s1, s2 = sigma1.double().numpy(), sigma2.double().numpy()
    diff = m1 - m2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))


class SampleMetrics:
    """Class accuracy and Fréchet distance of pixel videos against a data set (module docstring).

    Args:
        classifier: the feature network / classifier of the data set.
        real_mu, real_sigma: feature statistics of real held-out videos.
        holdout_accuracy: the classifier's accuracy on those real videos (the ceiling of class_acc).
        shapes: (shape classifier, its summary, the shape of each class [num_classes]) for
            `shape_acc`, or None (data sets without shapes).
    """

    def __init__(self, classifier: VideoClassifier, real_mu: torch.Tensor, real_sigma: torch.Tensor,
                 holdout_accuracy: float | None = None,
                 shapes: tuple[VideoClassifier, dict, torch.Tensor] | None = None,
                 shape_recipe: ShapeRecipe | None = None) -> None:
        self.classifier = classifier.eval()
        self.real_mu, self.real_sigma = real_mu.double(), real_sigma.double()
        self.holdout_accuracy = holdout_accuracy
        self.shapes, self.shape_recipe = shapes, shape_recipe or ShapeRecipe()

    @property
    def real_shape_acc(self) -> float | None:
        """The shape classifier's accuracy on real held-out videos (the ceiling of shape_acc)."""
        return None if self.shapes is None else self.shapes[1].get("holdout_accuracy")

    @property
    def real_pieces(self) -> float | None:
        """Pieces per object frame of real held-out videos (the reference for `pieces`)."""
        return None if self.shapes is None else self.shapes[1].get("holdout_pieces")

    @classmethod
    def for_dataset(cls, dataset_cfg: Mapping, num_classes: int | None = None,
                    recipe: ClassifierRecipe | None = None, cache_dir: str | Path | None = None,
                    dataset: Dataset | None = None, shape_recipe: ShapeRecipe | None = None
                    ) -> SampleMetrics:
        """Metrics of the data set of a config with `_target_` (classifiers trained once, cached)."""
        net, summary = classifier_for(dataset_cfg, num_classes, recipe, cache_dir, dataset)
        shapes = shape_classifier_for(dataset_cfg, dataset, shape_recipe, cache_dir)
        if shapes is not None:
            data_class = shape_map(dataset if dataset is not None else plain_config(dataset_cfg))
            shapes = (*shapes, torch.tensor([data_class.shape_of(c) for c in range(net.num_classes)]))
        return cls(net, summary["mu"], summary["sigma"], summary.get("holdout_accuracy"), shapes,
                   shape_recipe)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @torch.no_grad()
    def score(self, videos: torch.Tensor, labels: torch.Tensor | None = None, confusion: bool = False) -> dict:
        """{"fd", and "class_acc" (and "shape_acc") when `labels` are given} of pixel videos
        [N, C, T, H, W] in [-1, 1] (clamped, as they would be shown) generated for class `labels`
        [N]. With `confusion`, also "shape_confusion" (see `shape_confusion`) from the same
        predictions."""
        if videos.dim() != 5 or videos.shape[0] < 2:
            raise ValueError(f"videos must be [N >= 2, C, T, H, W], got shape {tuple(videos.shape)}")
        if confusion and (self.shapes is None or labels is None):
            raise ValueError("confusion=True needs the `labels` of the videos and a data set with shapes "
                             "(the procedural shapes)")
        x = videos.detach().float().cpu().clamp(-1.0, 1.0)
        logits, features = predict(self.classifier, x)
        result = {"fd": frechet_distance(*feature_stats(features), self.real_mu, self.real_sigma)}
        if self.shapes is not None:  # whole objects or fragments (the real data's: real_pieces)
            pieces = count_pieces(x, self.shape_recipe)
            result["pieces"] = float(pieces.nanmean())
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu().reshape(-1)
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {x.shape[0]} videos")
            result["class_acc"] = float((logits.argmax(1) == labels).float().mean())
            if self.shapes is not None:
                net, _, shape_of = self.shapes
                seen = predict_shapes(net, x, self.shape_recipe)
                result["shape_acc"] = float((seen == shape_of[labels]).float().mean())
                if confusion:
                    result["shape_confusion"] = self._confusion(seen, shape_of[labels], pieces)
        return result

    @torch.no_grad()
    def shape_confusion(self, videos: torch.Tensor, labels: torch.Tensor) -> dict:
        """Which shape the shape classifier sees in videos generated for class `labels`:
        {"shapes": names, "counts": [prompted][seen] video counts (a last column for "none": no
        object found), "acc": {shape: its accuracy}, "pieces": {shape: its mean pieces per object
        frame}}. Needs a data set with shapes. (`score(..., confusion=True)` gives it beside the
        scores without predicting twice.)"""
        if self.shapes is None:
            raise ValueError("this data set has no shapes (shape_confusion needs the procedural shapes)")
        labels = torch.as_tensor(labels).long().cpu().reshape(-1)
        if labels.shape[0] != videos.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {videos.shape[0]} videos")
        x = videos.detach().float().cpu().clamp(-1.0, 1.0)  # as shown, and as `score` sees them
        net, _, shape_of = self.shapes
        seen = predict_shapes(net, x, self.shape_recipe)
        return self._confusion(seen, shape_of[labels], count_pieces(x, self.shape_recipe))

    def _confusion(self, seen: torch.Tensor, prompted: torch.Tensor, pieces: torch.Tensor) -> dict:
        """The confusion table of predicted shapes `seen` (-1: none) vs `prompted` [N] (see
        `shape_confusion`), with each prompted shape's mean `pieces`."""
        names = list(self.shapes[1]["shape_names"])
        counts = torch.zeros(len(names), len(names) + 1, dtype=torch.long)
        counts.index_put_((prompted, torch.where(seen < 0, len(names), seen)), torch.ones_like(seen),
                          accumulate=True)
        acc = {name: float(counts[i, i] / counts[i].sum()) for i, name in enumerate(names) if counts[i].sum()}
        pieces = {name: float(pieces[prompted == i].nanmean()) for i, name in enumerate(names) if counts[i].sum()}
        return {"shapes": names, "counts": counts.tolist(), "acc": acc, "pieces": pieces}
