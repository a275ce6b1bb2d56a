"""Sample-quality metrics (vsa.eval): the metric itself on real data and on noise, a tiny model
that must generate videos of the requested class, and the validation callback's logging."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vsa.data import SyntheticVideoDataset
from vsa.diffusion import flow_matching_loss, sample_timesteps, timestep_shift
from vsa.eval import ClassifierRecipe, SampleMetrics, frechet_distance
from vsa.eval.classifier import ShapeRecipe, count_pieces, foreground, shape_map, stack_items
from vsa.eval.samples import generate_and_score
from vsa.models import DiTConfig, VideoDiT

# A cheap classifier recipe for 3x4x16x16 videos.
RECIPE = ClassifierRecipe(input_size=(4, 16, 16), steps=60, batch_size=16, train_samples=256,
                          holdout_samples=64)
COLOURS = torch.tensor([[0.9, -0.6, -0.6], [-0.6, 0.9, -0.6], [-0.6, -0.6, 0.9], [0.9, 0.9, -0.6]])


class FixedSquares(Dataset):
    """A trivially learnable set: class c is a 6x6 square of colour COLOURS[c] on a dark
    background, in a corner of its own (jittered by up to 2 pixels), moving 1 pixel per frame."""

    num_classes = 4

    def __init__(self, num_samples: int = 512, seed: int = 0) -> None:
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)
        label = int(torch.randint(4, (1,), generator=gen))
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        y0, x0 = (2 if label < 2 else 8) + dy, (2 if label % 2 == 0 else 8) + dx
        video = torch.full((3, 4, 16, 16), -0.8)
        for f in range(4):
            x = min(max(x0 + f - 1, 0), 10)
            video[:, f, y0:y0 + 6, x:x + 6] = COLOURS[label].view(3, 1, 1)
        return {"video": video, "label": torch.tensor(label)}


DATA_CFG = {"_target_": "test_eval.FixedSquares", "num_samples": 512, "seed": 0}  # the cache key only


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def metrics(cache_dir) -> SampleMetrics:
    return SampleMetrics.for_dataset(DATA_CFG, 4, RECIPE, cache_dir, dataset=FixedSquares())


def test_frechet_distance_of_gaussians():
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) = 4 + 3 * (1 + 4 - 2 * 2) = 7
    assert frechet_distance(mu, sigma, mu + torch.tensor([2.0, 0, 0]), 4 * sigma) == pytest.approx(7.0)


def test_metric_scores_real_data_near_perfect_and_noise_at_chance(metrics, cache_dir):
    real_videos, real_labels = stack_items(FixedSquares(seed=1), range(64))  # unseen seed
    real = metrics.score(real_videos, real_labels)
    noise = metrics.score(torch.randn(64, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                          real_labels)
    assert metrics.holdout_accuracy >= 0.95 and real["class_acc"] >= 0.95
    assert noise["class_acc"] <= 0.5  # chance is 0.25
    assert real["fd"] < 0.1 * noise["fd"]  # 64 samples of 64 features: the floor is not 0
    # Cached: a second call loads the same network instead of training it.
    start = time.perf_counter()
    again = SampleMetrics.for_dataset(DATA_CFG, 4, RECIPE, cache_dir)
    assert time.perf_counter() - start < 5
    assert again.score(real_videos, real_labels) == pytest.approx(real)


def test_classifier_accepts_other_sizes_and_grey_videos(metrics):
    logits, features = metrics.classifier(torch.zeros(2, 1, 16, 64, 48))
    assert logits.shape == (2, 4) and features.shape == (2, metrics.classifier.feature_dim)
    with pytest.raises(ValueError, match="channels"):
        metrics.classifier(torch.zeros(2, 12, 4, 16, 16))


def train_tiny(model: VideoDiT, steps: int, shift: float, seed: int = 0) -> None:
    """AdamW on FixedSquares with the training recipe's logit-normal times at `shift`."""
    data = FixedSquares()
    videos, labels = stack_items(data, range(len(data)))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(data), (16,), generator=gen)
        t = sample_timesteps(16, shift=shift, generator=gen)
        loss = flow_matching_loss(model, videos[batch], t, torch.randn(16, 3, 4, 16, 16, generator=gen),
                                  labels=labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.slow
def test_a_trained_tiny_model_generates_its_classes(metrics):
    """The check that would have caught confetti samples: a tiny DiT trained for a few hundred
    steps on FixedSquares must generate the requested class (by the metric, well above chance,
    0.25) and move the Fréchet distance far below the untrained model's. Times are shifted as the
    training recipe shifts them (`timestep_shift` with the module defaults; before the fix, 0.25
    at these 256 tokens)."""
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(depth=2, width=64, head_dim=64, in_channels=3, patch=(1, 2, 2),
                               num_classes=4, attention="full"))

    shift = timestep_shift(256)  # the 4x8x8 token grid, the recipe's default shift rule

    def score() -> dict:
        return generate_and_score(model, (3, 4, 16, 16), lambda x: x, metrics, per_class=8,
                                  steps=16, cfg_scale=2.0, shift=shift, seed=0)[0]

    untrained = score()
    train_tiny(model, steps=300, shift=shift)
    trained = score()
    # Measured: class_acc 0.25 -> 0.72, fd 25.5 -> 0.82; with the old shift 0.25: 0.375, 16.6.
    assert trained["class_acc"] >= 0.6, (untrained, trained)
    assert trained["fd"] < 0.2 * untrained["fd"], (untrained, trained)


def test_validation_logs_sample_quality_and_the_cli_scores_the_checkpoint(tmp_path):
    """experiment=tiny with SampleQuality every 2 steps: val/class_acc and val/fd beside val/loss
    in the CSV; then `python -m vsa.eval.samples` scores the checkpoint against the data set the
    checkpoint recorded."""
    from hydra import compose, initialize_config_dir
    from test_train import CONFIGS, csv_column, run_train

    from vsa.checkpoint import CHECKPOINT_KEY
    from vsa.config import ConfigError
    from vsa.eval.samples import evaluate

    recipe = "{steps: 5, batch_size: 8, train_samples: 32, holdout_samples: 16}"
    shape_recipe = "{steps: 5, batch_size: 8, train_samples: 16, holdout_samples: 8}"
    run_train(tmp_path, "tiny", ["experiment=tiny", "logger=csv", "callbacks.sample_videos=null",
                                 "callbacks.sample_quality.every_n_steps=2",
                                 "callbacks.sample_quality.per_class=1",
                                 "callbacks.sample_quality.steps=2",
                                 "callbacks.sample_quality.cfg_interval=[0.5,1.0]",
                                 f"callbacks.sample_quality.cache_dir={tmp_path / 'cache'}",
                                 f"+callbacks.sample_quality.recipe={recipe}",
                                 f"+callbacks.sample_quality.shape_recipe={shape_recipe}"])
    run_dir = tmp_path / "tiny"
    for name in ("val/loss", "val/class_acc", "val/fd", "val/shape_acc"):
        assert set(csv_column(run_dir, name)) == {1, 3}, name
    assert all(0 <= v <= 1 for v in csv_column(run_dir, "val/class_acc").values())

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=[f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                         f"output_dir={tmp_path / 'eval'}", "per_class=1",
                                         "steps=2", f"cache_dir={tmp_path / 'cache'}", "cfg_interval=[0.5,1.0]",
                                         f"recipe={recipe}", f"shape_recipe={shape_recipe}"])
    result = evaluate(cfg)
    assert result["cfg_interval"] == [0.5, 1.0]
    assert 0 <= result["class_acc"] <= 1 and result["fd"] >= 0 and result["num_videos"] == 10
    assert 0 <= result["shape_acc"] <= 1 and result["chance_shape_acc"] == 0.2
    assert sum(map(sum, result["shape_confusion"]["counts"])) == 10  # one row per prompted shape
    assert (tmp_path / "eval" / "scores.json").is_file() and result["grid"].is_file()
    # autoguidance by the same checkpoint: the unguided videos, so the unguided scores
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        plain, itself = (compose("eval", overrides=[f"ckpt_path={ckpt}", f"output_dir={tmp_path / name}",
                                                    "per_class=1", "steps=2", f"cache_dir={tmp_path / 'cache'}",
                                                    f"recipe={recipe}", f"shape_recipe={shape_recipe}", *extra])
                         for name, extra in (("plain", ["cfg_scale=1.0"]), ("itself", [f"guide_ckpt_path={ckpt}"])))
    plain, itself = evaluate(plain), evaluate(itself)
    assert itself["guide_ckpt_path"] == str(ckpt) and plain["guide_ckpt_path"] is None
    assert itself["fd"] == pytest.approx(plain["fd"], rel=1e-4) and itself["class_acc"] == plain["class_acc"]
    # a guide trained on another latent shape is refused, as sample.py refuses it
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint[CHECKPOINT_KEY]["latent_shape"] = [3, 8, 16, 16]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        other = compose("eval", overrides=[f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'other'}",
                                           f"guide_ckpt_path={tmp_path / 'other.ckpt'}"])
    with pytest.raises(ConfigError, match=r"guide_ckpt_path: the guide's latent shape \[3, 8, 16, 16\]"):
        evaluate(other)


def test_prompt_following_reads_colour_and_motion_from_the_pixels():
    """The data's own clips follow their captions; the same clips under other clips' captions, or
    noise, mostly do not; a prompt outside the caption grammar is a clear error."""
    from vsa.data.synthetic import SyntheticVideoDataset
    from vsa.eval.prompts import prompt_following

    ds = SyntheticVideoDataset(120, 8, 32, 32, captions=True, max_objects=1, radius=(0.2, 0.3), seed=5)
    items = [ds[i] for i in range(len(ds))]
    videos, prompts = torch.stack([i["video"] for i in items]), [i["caption"] for i in items]
    own = prompt_following(videos, prompts)
    assert own["colour"] == 1.0 and own["motion"] >= 0.95 and own["n"] == 120
    other = prompt_following(videos, prompts[7:] + prompts[:7])
    assert other["both"] < 0.3
    assert prompt_following(torch.rand_like(videos) * 2 - 1, prompts)["both"] < 0.3
    with pytest.raises(ValueError, match="is not a caption of the moving shapes"):
        prompt_following(videos[:1], ["a purple circle moves left"])


SHAPES_ARGS = {"num_samples": 1024, "frames": 8, "height": 32, "width": 32, "num_classes": 10, "seed": 0}
SHAPES_CFG = {"_target_": "vsa.data.SyntheticVideoDataset", **SHAPES_ARGS}
SHAPE_RECIPE = ShapeRecipe(steps=120, train_samples=256, holdout_samples=64)


def test_shape_accuracy_sees_outlines_not_colour(tmp_path):
    """shape_acc reads the objects' silhouettes: real unseen videos score near-perfect whatever
    their colours, noise scores near chance (0.2), and real videos coarsened into 4x4-pixel blocks
    (the issue's 'scattered blocks of the right colour') keep class_acc and a near-real FD but lose
    shape_acc."""
    metrics = SampleMetrics.for_dataset(SHAPES_CFG, cache_dir=tmp_path, shape_recipe=SHAPE_RECIPE)
    assert metrics.real_shape_acc >= 0.95
    videos, labels = stack_items(SyntheticVideoDataset(**{**SHAPES_ARGS, "seed": 5}), range(60))
    real = metrics.score(videos, labels)
    recoloured = metrics.score(videos.roll(1, dims=1), labels)  # R -> G -> B -> R: other hues
    noise = metrics.score(torch.randn(videos.shape, generator=torch.Generator().manual_seed(0)), labels)
    blocks = metrics.score(F.interpolate(F.avg_pool3d(videos, (1, 4, 4)), scale_factor=(1, 4, 4)), labels)
    assert real["shape_acc"] >= 0.95 and recoloured["shape_acc"] >= 0.95
    assert recoloured["class_acc"] <= 0.2  # the class classifier reads colour
    assert noise["shape_acc"] <= 0.4
    assert blocks["class_acc"] >= 0.8 and blocks["shape_acc"] <= 0.6, blocks  # measured 0.88, 0.27
    assert metrics.score(videos, (labels + 1) % 10)["shape_acc"] <= 0.05  # neighbouring classes' shapes differ
    # Whole objects: about the real held-out videos' pieces per frame (1-3 objects a clip); the same
    # objects cut into 2x2-pixel fragments 2 pixels apart: several times as many.
    assert real["pieces"] == pytest.approx(metrics.real_pieces, abs=0.3) and 1.0 <= real["pieces"] <= 3.0
    grid = torch.arange(videos.shape[-1]) // 2 % 2 == 0
    cut = torch.where(grid[:, None] & grid[None, :], videos, torch.full_like(videos, -1.0))
    fragments = metrics.score(cut, labels)
    assert fragments["pieces"] >= 2.5 * real["pieces"], fragments  # measured 5.0 vs 1.53
    # The per-shape view: every video counted once, under its prompted shape, on the diagonal.
    confusion = metrics.shape_confusion(videos, labels)
    counts = torch.tensor(confusion["counts"])
    assert confusion["shapes"] == ["circle", "square", "diamond", "ring", "cross"] and counts.shape == (5, 6)
    assert counts.sum() == 60 and counts.diagonal().sum() >= 0.95 * 60
    assert all(acc >= 0.8 for acc in confusion["acc"].values())
    shifted = torch.tensor(metrics.shape_confusion(videos, (labels + 1) % 10)["counts"])
    assert shifted.diagonal().sum() <= 3 and shifted.sum() == 60
    # The same table beside the scores, from one prediction (as vsa.eval.samples reports it).
    both = metrics.score(videos, labels, confusion=True)
    assert both.pop("shape_confusion") == confusion and both == pytest.approx(real)
    # Cached: loaded, not retrained; a data set without shapes gets no shape_acc.
    start = time.perf_counter()
    again = SampleMetrics.for_dataset(SHAPES_CFG, cache_dir=tmp_path, shape_recipe=SHAPE_RECIPE)
    assert time.perf_counter() - start < 5 and again.score(videos, labels) == pytest.approx(real)
    # A shape classifier cached before pieces were counted gets its real reference counted on load.
    for meta_path in tmp_path.glob("shapes_*.json"):
        meta = json.loads(meta_path.read_text())
        del meta["summary"]["holdout_pieces"]
        meta_path.write_text(json.dumps(meta))
    older = SampleMetrics.for_dataset(SHAPES_CFG, cache_dir=tmp_path, shape_recipe=SHAPE_RECIPE)
    assert older.real_pieces == pytest.approx(metrics.real_pieces)
    no_shapes = SampleMetrics(metrics.classifier, metrics.real_mu, metrics.real_sigma)
    assert shape_map(FixedSquares()) is None and "shape_acc" not in no_shapes.score(videos, labels)
    with pytest.raises(ValueError, match="no shapes"):
        no_shapes.shape_confusion(videos, labels)
    with pytest.raises(ValueError, match="confusion=True needs"):
        no_shapes.score(videos, labels, confusion=True)


def test_pieces_count_whole_objects_once_and_fragments_each():
    """count_pieces: a square is one piece, two apart are two, 16 scattered 2x2 blocks are 16 (a
    lone pixel is below min_size and not counted); frames without an object are left out of the
    mean, and a video with none is NaN."""
    videos = torch.full((4, 3, 2, 32, 32), -1.0)
    videos[0, :, :, 4:14, 4:14] = 1.0                       # one square in both frames
    videos[1, :, 0, 2:8, 2:8] = videos[1, :, 0, 20:26, 20:26] = 1.0   # two; frame 1 empty
    for i in range(4):                                       # 16 blocks of 2x2, 6 pixels apart
        for j in range(4):
            videos[3, :, :, 2 + 8 * i:4 + 8 * i, 2 + 8 * j:4 + 8 * j] = 1.0
    videos[3, :, :, 31, 31] = 1.0                            # a lone pixel: not a piece
    pieces = count_pieces(videos, ShapeRecipe())
    assert pieces[:2].tolist() == [1.0, 2.0] and math.isnan(pieces[2]) and pieces[3] == 16.0


def test_foreground_is_the_objects_silhouette():
    """The mask is the painted object: a circle's area and a ring's hole, at any input size."""
    video = torch.full((1, 3, 2, 64, 64), -0.8)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2).sqrt()
    video[0, 0, 0][r < 16] = 0.9                       # a red disc in frame 0
    video[0, 2, 1][(r < 16) & (r > 8)] = 0.9           # a blue ring in frame 1
    mask = foreground(video, (32, 32))
    assert mask.shape == (1, 1, 2, 32, 32)
    assert mask[0, 0, 0].sum() == pytest.approx(math.pi * 8 ** 2, rel=0.1)
    assert mask[0, 0, 1, 16, 16] == 0 and mask[0, 0, 1].sum() == pytest.approx(math.pi * (64 - 16), rel=0.15)
