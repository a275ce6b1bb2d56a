"""Sample-quality metrics: a classifier / feature network trained on a data set (cached), class
accuracy and Fréchet distance of generated videos (`vsa.eval.metrics`), and generation + scoring
of a model or checkpoint (`vsa.eval.samples`; CLI `python -m vsa.eval.samples ckpt_path=...`)."""

from vsa.eval.classifier import ClassifierRecipe, VideoClassifier, classifier_for, plain_config, train_classifier
from vsa.eval.metrics import SampleMetrics, feature_stats, frechet_distance

__all__ = ["ClassifierRecipe", "SampleMetrics", "VideoClassifier", "classifier_for",
           "feature_stats", "frechet_distance", "plain_config", "train_classifier"]
