"""Tests of vsa.data: synthetic videos, video folders, latent shards, codecs, the DataModule and
scripts/encode_latents.py. CPU only, a few seconds in all."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vsa.data.codecs import DiffusersVAECodec, IdentityCodec, SpaceToDepthCodec, build_codec
from vsa.data.decode import UnreadableVideoError, read_clip
from vsa.data.latents import LatentShardDataset, write_latent_shard
from vsa.data.synthetic import MOTIONS, SyntheticVideoDataset
from vsa.data.videos import UnreadableVideoWarning, VideoFolderDataset, resize_center_crop

av = pytest.importorskip("av", reason="PyAV (`pip install av`) writes the test videos")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic

def _foreground(video: torch.Tensor) -> torch.Tensor:
    """[T, H, W] mask of object pixels: the background stays below -0.5 in every channel."""
    return video.max(dim=0).values > 0.0


def test_synthetic_is_deterministic_per_index():
    ds = SyntheticVideoDataset(50, frames=8, height=24, width=24, seed=3)
    a, b = ds[7], SyntheticVideoDataset(50, frames=8, height=24, width=24, seed=3)[7]
    assert torch.equal(a["video"], b["video"]) and a["label"] == b["label"]
    assert torch.equal(ds[7]["video"], a["video"])
    assert not torch.equal(ds[8]["video"], a["video"])
    assert not torch.equal(SyntheticVideoDataset(50, 8, 24, 24, seed=4)[7]["video"], a["video"])
    assert ds.label_of(7) == int(a["label"])


@pytest.mark.parametrize("frames,height,width,channels", [(5, 18, 30, 3), (1, 7, 5, 1), (3, 33, 17, 4)])
def test_synthetic_shapes_dtypes_and_range(frames, height, width, channels):
    ds = SyntheticVideoDataset(6, frames, height, width, channels=channels, num_classes=5)
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"].shape == (channels, frames, height, width)
        assert item["video"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
        assert 0 <= int(item["label"]) < 5
        assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["video"].shape == (3, channels, frames, height, width) and batch["label"].shape == (3,)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="frames must be a positive int"):
        SyntheticVideoDataset(4, frames=0, height=8, width=8)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        SyntheticVideoDataset(4, 4, 8, 8, seed=-1)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticVideoDataset(4, 4, 8, 8)[4]


def test_synthetic_classes_differ_in_colour_and_shape():
    ds = SyntheticVideoDataset(400, frames=4, height=32, width=32, num_classes=4, max_objects=1)
    colours: dict[int, list[torch.Tensor]] = {c: [] for c in range(4)}
    areas: dict[int, list[float]] = {c: [] for c in range(4)}
    for i in range(120):
        item = ds[i]
        c, video = int(item["label"]), item["video"]
        mask = _foreground(video)
        if mask.sum() > 20:
            colours[c].append(video[:, mask].mean(dim=1))
            areas[c].append(float(mask.float().mean()))
    assert all(len(v) >= 10 for v in colours.values()), {c: len(v) for c, v in colours.items()}
    means = {c: torch.stack(v).mean(0) for c, v in colours.items()}
    spread = max(float(torch.stack(v).std(0).max()) for v in colours.values())
    gaps = [float((means[a] - means[b]).norm()) for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 0.3 and spread < 0.15, (gaps, spread)


def test_synthetic_radius_sets_the_object_size():
    """`radius` is the (min, max) object radius in shorter-side units; the default is (0.10, 0.18)."""
    default = SyntheticVideoDataset(20, frames=4, height=32, width=32, max_objects=1)
    explicit = SyntheticVideoDataset(20, frames=4, height=32, width=32, max_objects=1, radius=[0.10, 0.18])
    assert all(torch.equal(default[i]["video"], explicit[i]["video"]) for i in range(20))

    def mean_area(radius) -> float:
        ds = SyntheticVideoDataset(60, frames=4, height=32, width=32, num_classes=3, max_objects=1,
                                   radius=radius)
        # frame 0 of orbit / bounce clips only (class 0 wraps and may start off-frame)
        areas = [float(_foreground(ds[i]["video"])[0].float().sum()) for i in range(60)
                 if int(ds[i]["label"]) != 0]
        return sum(areas) / len(areas)

    small, large = mean_area((0.10, 0.10)), mean_area((0.25, 0.25))
    # circle / square area scales with r^2: (0.25 / 0.10)^2 = 6.25
    assert 4.0 < large / small < 8.0, (small, large)
    for bad in ([0.2], (0.3, 0.2), (0.0, 0.1), (0.1, 0.6), "big", None):
        with pytest.raises(ValueError, match="radius must"):
            SyntheticVideoDataset(4, 4, 8, 8, radius=bad)


def test_synthetic_pace_slows_the_motion_whatever_the_frames():
    """`pace` is the share of its path an object covers in one clip: 1 (the default) renders the
    same clips as before, 0.25 moves each object a quarter as far between frames."""
    kw = dict(num_samples=40, frames=4, height=32, width=32, num_classes=3, max_objects=1, seed=2)
    default, one, slow = (SyntheticVideoDataset(**kw, **extra) for extra in ({}, {"pace": 1}, {"pace": 0.25}))
    assert all(torch.equal(default[i]["video"], one[i]["video"]) for i in range(10))

    def mean_step(ds) -> float:  # mean centroid displacement between frames 0 and 1 (orbit clips)
        steps = []
        for i in range(40):
            item = ds[i]
            if int(item["label"]) % 4 != 2:  # class 2 orbits: never leaves the frame
                continue
            mask = _foreground(item["video"]).float()
            ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
            centre = [torch.stack([(m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()]) for m in mask[:2]]
            steps.append(float((centre[1] - centre[0]).norm()))
        assert len(steps) >= 5
        return sum(steps) / len(steps)

    ratio = mean_step(slow) / mean_step(default)
    assert 0.15 < ratio < 0.4, ratio
    assert "pace=0.25" in repr(slow)
    for bad in (0, -1.0, 11.0, True, "fast", None):
        with pytest.raises(ValueError, match="pace must be"):
            SyntheticVideoDataset(4, 4, 8, 8, pace=bad)


def test_synthetic_motion_is_long_range_and_objects_reenter():
    ds = SyntheticVideoDataset(200, frames=16, height=32, width=32, num_classes=4, max_objects=1, seed=1)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    far, reentered, n = 0, 0, 40
    for i in range(n):
        item = ds[i]
        video, motion = item["video"], MOTIONS[int(item["label"]) % len(MOTIONS)]
        changes = (video[:, 1:] - video[:, :-1]).abs().flatten(2).amax(dim=(0, 2))
        assert (changes > 0.1).float().mean() >= 0.5, f"sample {i} barely moves"
        mask = _foreground(video)
        visible = mask.flatten(1).sum(1) > 3
        cents = torch.stack([(ys * mask).flatten(1).sum(1), (xs * mask).flatten(1).sum(1)], 1)
        cents = cents[visible] / mask.flatten(1).sum(1)[visible, None]
        if len(cents) >= 2 and torch.cdist(cents, cents).max() > 0.4:
            far += 1
        if motion == "wrap":
            v = visible.tolist()
            gone = [t for t in range(1, 15) if not v[t] and any(v[:t]) and any(v[t + 1:])]
            reentered += bool(gone)
    assert far == n, f"only {far}/{n} clips move an object 0.4 frame or more"
    assert reentered >= 1, "no wrapping object left the frame and came back"


# ----------------------------------------------------------------------------- video folders

RED = lambda i: 8 + 15 * i  # noqa: E731  frame index encoded in the red level (16 frames max)


def _write_video(path: Path, codec: str, frames: int, height: int, width: int) -> np.ndarray:
    """Write frames whose red level encodes their index; left half green, right half dim."""
    refs = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 40, np.uint8)
            img[..., 0] = RED(i)
            img[:, : width // 2, 1] = 200
            refs.append(img)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return np.stack(refs)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    refs = {
        "a.mp4": _write_video(root / "a.mp4", "libx264", 12, 32, 48),   # width 48: decord2 padded rows
        "b.avi": _write_video(root / "b.avi", "mpeg4", 12, 32, 48),
        "sub/c.mkv": None,
    }
    (root / "sub").mkdir()
    refs["sub/c.mkv"] = _write_video(root / "sub" / "c.mkv", "libx264", 16, 32, 40)
    (root / "z_corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return root, refs


def _frame_indices(video: torch.Tensor) -> list[int]:
    red = (video[0].mean(dim=(1, 2)) + 1.0) * 127.5
    return [round((float(r) - 8) / 15) for r in red]


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_video_folder_decodes_skips_and_counts(video_dir, backend):
    if backend == "decord":
        pytest.importorskip("decord", reason="decord2 is not installed (`pip install decord2`)")
    root, refs = video_dir
    ds = VideoFolderDataset(root, frames=12, height=32, width=48, backend=backend, train=False)
    assert ds.files == ["a.mp4", "b.avi", "sub/c.mkv", "z_corrupt.mp4"]
    for i, name in enumerate(["a.mp4", "b.avi"]):
        video = ds[i]["video"]
        expected = torch.from_numpy(refs[name]).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        assert video.shape == (3, 12, 32, 48) and video.dtype == torch.float32
        assert (video - expected).abs().mean() < 0.03, name
        assert _frame_indices(video) == list(range(12))
    assert ds.num_skipped == 0
    with pytest.warns(UnreadableVideoWarning, match="z_corrupt.mp4"):
        item = ds[3]  # the corrupt file: the next readable sample (wrapping to a.mp4) instead
    assert torch.equal(item["video"], ds[0]["video"])
    assert ds.num_skipped == 1 and list(ds.skipped_files) == ["z_corrupt.mp4"]
    ds[3]  # known bad in this process: skipped silently, still counted once
    assert ds.num_skipped == 1


def test_decord_matches_pyav_including_padded_widths(video_dir):
    pytest.importorskip("decord", reason="decord2 is not installed (`pip install decord2`)")
    root, _ = video_dir
    for name in ["a.mp4", "b.avi", "sub/c.mkv"]:
        pick = lambda n: list(range(0, n, 2))  # noqa: E731
        a = read_clip(root / name, pick, backend="decord")
        b = read_clip(root / name, pick, backend="av")
        assert a.shape == b.shape and a.shape[-1] == 3
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, name
    for backend in ["decord", "av", "auto"]:
        with pytest.raises(UnreadableVideoError, match="z_corrupt.mp4"):
            read_clip(root / "z_corrupt.mp4", lambda n: [0], backend=backend)


def test_clip_sampling_stride_train_and_eval(video_dir):
    root, _ = video_dir
    ds = VideoFolderDataset(root, frames=4, height=32, width=40, stride=3, backend="av", train=False)
    c = ds.files.index("sub/c.mkv")
    assert _frame_indices(ds[c]["video"]) == [3, 6, 9, 12]  # 16 frames, span 10: centred start 3
    ds.train = True
    torch.manual_seed(0)
    starts = set()
    for _ in range(12):
        idx = _frame_indices(ds[c]["video"])
        assert idx == [idx[0] + 3 * k for k in range(4)] and 0 <= idx[0] <= 6
        starts.add(idx[0])
    assert len(starts) >= 3
    long = VideoFolderDataset(root, frames=6, height=32, width=48, stride=3, backend="av", train=False)
    assert _frame_indices(long[0]["video"]) == [0, 3, 6, 9, 11, 11]  # too short: last frame repeats


def test_resize_then_centre_crop(video_dir):
    root, _ = video_dir
    ds = VideoFolderDataset(root, frames=2, height=16, width=16, backend="av", train=False)
    video = ds[0]["video"]  # 32x48 -> 16x24 -> centre 16x16 (columns 4..19)
    assert video.shape == (3, 2, 16, 16)
    green = (video[1, 0] + 1) * 127.5
    assert green[:, :6].mean() > 150 and green[:, 10:].mean() < 90
    up = resize_center_crop(torch.rand(3, 2, 5, 7), 9, 4)
    assert up.shape == (3, 2, 9, 4)


def test_dataloader_epoch_survives_corrupt_file(video_dir):
    root, _ = video_dir
    for num_workers in (0, 2):
        ds = VideoFolderDataset(root, frames=8, height=16, width=16, backend="auto", train=True)
        loader = DataLoader(ds, batch_size=2, num_workers=num_workers, shuffle=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableVideoWarning)
            batches = list(loader)
        assert sum(b["video"].shape[0] for b in batches) == len(ds) == 4
        assert all(torch.isfinite(b["video"]).all() for b in batches)
        assert ds.num_skipped == 1, f"num_workers={num_workers}: {ds.skipped_files}"
        assert "z_corrupt.mp4" in ds.skipped_files


def test_metadata_labels_and_captions(video_dir, tmp_path):
    root, _ = video_dir
    for name in ["a.mp4", "b.avi"]:
        (tmp_path / name).write_bytes((root / name).read_bytes())
    rows = [{"file_name": "a.mp4", "label": "dog", "caption": "a red frame"},
            {"file_name": "b.avi", "label": "cat"},
            {"file_name": "gone.mp4", "label": "cat"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match="gone.mp4"):
        ds = VideoFolderDataset(tmp_path, frames=2, height=8, width=8, backend="av")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert [int(ds[i]["label"]) for i in range(2)] == [1, 0]
    assert [ds[i]["caption"] for i in range(2)] == ["a red frame", ""]
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["caption"] == ["a red frame", ""] and batch["label"].tolist() == [1, 0]

    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,label\na.mp4,3\nb.avi,\n")
    ds = VideoFolderDataset(tmp_path, frames=2, height=8, width=8, backend="av")
    assert ds.classes is None and [int(ds[i]["label"]) for i in range(2)] == [3, -1]
    assert "caption" not in ds[0]
    (tmp_path / "metadata.csv").write_text("name,label\na.mp4,3\n")
    with pytest.raises(ValueError, match="missing `file_name`"):
        VideoFolderDataset(tmp_path, frames=2, height=8, width=8)


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video folder .*nope does not exist; create it"):
        VideoFolderDataset(tmp_path / "nope", frames=4, height=8, width=8)
    (tmp_path / "notes.txt").write_text("no videos here")
    with pytest.raises(FileNotFoundError, match=r"no video files \(.mp4.*under .*point `root`"):
        VideoFolderDataset(tmp_path, frames=4, height=8, width=8)
    (tmp_path / "x.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="backend must be one of"):
        VideoFolderDataset(tmp_path, frames=4, height=8, width=8, backend="ffmpeg")
    with pytest.raises(ValueError, match="stride must be a positive int"):
        VideoFolderDataset(tmp_path, frames=4, height=8, width=8, stride=0)
    ds = VideoFolderDataset(tmp_path, frames=4, height=8, width=8)
    with pytest.warns(UnreadableVideoWarning):
        with pytest.raises(UnreadableVideoError, match="none of the 1 videos"):
            ds[0]


# ----------------------------------------------------------------------------- latent shards

@pytest.mark.parametrize("with_text", [False, True])
def test_latent_shards_round_trip(tmp_path, with_text):
    g = torch.Generator().manual_seed(0)
    shards = []
    for n in (3, 2):
        shard = {"latents": torch.randn(n, 4, 2, 3, 5, generator=g), "labels": torch.randint(10, (n,))}
        if with_text:
            shard["text_emb"] = torch.randn(n, 7, 6, generator=g)
            shard["text_mask"] = torch.rand(n, 7, generator=g) > 0.3
        shards.append(shard)
        write_latent_shard(tmp_path / f"shard-{len(shards) - 1:05d}.safetensors", **shard)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-00000.safetensors", "shard-00001.safetensors"]  # no temporary files left
    ds = LatentShardDataset(tmp_path)
    assert len(ds) == 5 and ds.sample_shape == (4, 2, 3, 5)
    flat = [(s, i) for s in shards for i in range(s["latents"].shape[0])]
    for k, (s, i) in enumerate(flat):
        item = ds[k]
        assert torch.equal(item["latents"], s["latents"][i]) and int(item["label"]) == int(s["labels"][i])
        if with_text:
            assert torch.equal(item["text_emb"], s["text_emb"][i])
            assert torch.equal(item["text_mask"], s["text_mask"][i])
        else:
            assert "text_emb" not in item
    batch = next(iter(DataLoader(ds, batch_size=5, num_workers=0)))
    assert batch["latents"].shape == (5, 4, 2, 3, 5) and batch["label"].dtype == torch.int64


def test_latent_shard_errors(tmp_path):
    z = torch.randn(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="must have 5 dims"):
        write_latent_shard(tmp_path / "a.safetensors", torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="3 samples but latents has 2"):
        write_latent_shard(tmp_path / "a.safetensors", z, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="text_mask was given without text_emb"):
        write_latent_shard(tmp_path / "a.safetensors", z, text_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"end in \.safetensors"):
        write_latent_shard(tmp_path / "a.pt", z)
    with pytest.raises(FileNotFoundError, match="encode_latents.py"):
        LatentShardDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors shards"):
        LatentShardDataset(tmp_path)
    write_latent_shard(tmp_path / "a.safetensors", z)
    write_latent_shard(tmp_path / "b.safetensors", torch.randn(2, 4, 1, 2, 3))
    with pytest.raises(ValueError, match="all shards in .* must match"):
        LatentShardDataset(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ----------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("factor", [(1, 2, 2), (2, 2, 2), (1, 3, 1), 2])
def test_space_to_depth_is_an_exact_inverse(factor):
    codec = SpaceToDepthCodec(factor)
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    z = codec.encode(x)
    assert z.shape == (2, *codec.latent_shape((3, 4, 6, 6)))
    y = codec.decode(z)
    assert y.dtype == x.dtype and torch.equal(y.view(torch.int32), x.view(torch.int32))  # bitwise
    # Channel c*prod+k of the latent holds pixel offset k of input channel c inside each block.
    assert torch.equal(z[:, 0, 0, 0, 0], x[:, 0, 0, 0, 0])


def test_codec_errors_and_registry():
    codec = SpaceToDepthCodec((1, 2, 2))
    with pytest.raises(ValueError, match=r"divisible by \(1, 2, 2\), got \(5, 18, 31\)"):
        codec.encode(torch.zeros(1, 3, 5, 18, 31))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        codec.decode(torch.zeros(1, 6, 1, 2, 2))
    with pytest.raises(ValueError, match="5-D"):
        codec.encode(torch.zeros(3, 4, 4, 4))
    with pytest.raises(ValueError, match="3 positive ints"):
        SpaceToDepthCodec((0, 2, 2))
    assert isinstance(build_codec("identity"), IdentityCodec)
    assert build_codec("space_to_depth", factor=(1, 4, 4)).factor == (1, 4, 4)
    with pytest.raises(ValueError, match="unknown codec 'jpeg'; choose one of"):
        build_codec("jpeg")
    x = torch.randn(1, 3, 2, 4, 4)
    assert build_codec("identity").decode(build_codec("identity").encode(x)) is x


def test_vae_codec_error_without_diffusers_or_weights(tmp_path):
    if importlib.util.find_spec("diffusers") is None:
        with pytest.raises(ImportError, match="pip install diffusers"):
            DiffusersVAECodec(tmp_path)
    else:
        with pytest.raises(FileNotFoundError, match="no VAE config"):
            DiffusersVAECodec(tmp_path)


def test_vae_codec_with_tiny_random_vaes(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (optional extra)")
    kl = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                 norm_num_groups=4, layers_per_block=1)
    kl.save_pretrained(tmp_path / "kl")
    codec = build_codec("vae", path=tmp_path / "kl")
    x = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, *codec.latent_shape((3, 3, 8, 8))) == (2, 4, 3, 4, 4)
    assert codec.decode(z).shape == x.shape
    wan = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[True], latents_mean=[0.1] * 4,
                                     latents_std=[2.0] * 4)
    wan.save_pretrained(tmp_path / "wan" / "vae")
    codec = DiffusersVAECodec(tmp_path / "wan", subfolder="vae")
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (1, *codec.latent_shape((3, 5, 8, 8)))
    assert codec.decode(z).shape[:2] == (1, 3)
    with pytest.raises(ValueError, match="frames = 1 \\+"):
        codec.encode(torch.zeros(1, 3, 4, 8, 8))


# ----------------------------------------------------------------------------- datamodule

def test_datamodule_split_and_loaders():
    from vsa.data.datamodule import VideoDataModule

    def make():
        return SyntheticVideoDataset(20, frames=4, height=8, width=12)

    dm = VideoDataModule(make(), batch_size=4, num_workers=0, val_size=6)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    batch = next(iter(train))
    assert batch["video"].shape == (4, 3, 4, 8, 12) and batch["label"].shape == (4,)
    assert len(train) == 14 // 4 and sum(b["video"].shape[0] for b in val) == 6
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    again = VideoDataModule(make, batch_size=4, val_size=0.3)  # a factory; 30% of 20 = 6
    again.setup()
    assert again.val_set.indices == dm.val_set.indices
    v1 = torch.cat([b["video"] for b in dm.val_dataloader()])
    v2 = torch.cat([b["video"] for b in again.val_dataloader()])
    assert torch.equal(v1, v2)
    cfg = {"_target_": "vsa.data.SyntheticVideoDataset", "num_samples": 10, "frames": 2, "height": 4,
           "width": 4}
    hydra_dm = VideoDataModule(cfg, batch_size=2, num_workers=2, val_size=0)
    loader = hydra_dm.train_dataloader()
    assert loader.persistent_workers and hydra_dm.val_dataloader() == []
    assert next(iter(loader))["video"].shape == (2, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="val_size"):
        VideoDataModule(make(), val_size=1.5)
    with pytest.raises(ValueError, match="leaves no training samples"):
        VideoDataModule(make(), val_size=20).setup()


def test_datamodule_hydra_instantiate_and_eval_copy(video_dir):
    hydra = pytest.importorskip("hydra", reason="hydra-core is not installed")
    from omegaconf import OmegaConf

    root, _ = video_dir
    cfg = OmegaConf.create({
        "_target_": "vsa.data.VideoDataModule", "batch_size": 1, "val_size": 1,
        "dataset": {"_target_": "vsa.data.VideoFolderDataset", "root": str(root), "frames": 2,
                    "height": 8, "width": 8, "backend": "av"},
    })
    dm = hydra.utils.instantiate(cfg)
    dm.setup("fit")
    assert dm.train_set.dataset.train is True and dm.val_set.dataset.train is False
    assert next(iter(dm.val_dataloader()))["video"].shape == (1, 3, 2, 8, 8)


# ----------------------------------------------------------------------------- encode script

def test_encode_latents_script(video_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("encode_latents", REPO / "scripts" / "encode_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, _ = video_dir
    dst = tmp_path / "latents"
    args = ["--src", str(root), "--dst", str(dst), "--codec", "space_to_depth", "--frames", "4",
            "--height", "16", "--width", "16", "--shard-size", "2", "--batch-size", "2", "--backend", "av"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        assert script.main(args) == 0
    out = capsys.readouterr().out
    assert "encoded 3 clips of 4 videos into 2 shards" in out and "z_corrupt.mp4" in out
    ds = LatentShardDataset(dst)
    assert len(ds) == 3 and ds.sample_shape == (12, 4, 8, 8)
    assert ds.metadata["codec"] == "space_to_depth" and json.loads(ds.metadata["factor"]) == [1, 2, 2]
    videos = VideoFolderDataset(root, frames=4, height=16, width=16, backend="av", train=False)
    codec = SpaceToDepthCodec((1, 2, 2))
    assert torch.equal(codec.decode(ds[2]["latents"][None])[0], videos[2]["video"])
    assert script.main(args) == 2  # refuses to overwrite without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_captions_name_the_colour_shape_and_direction_of_the_first_object():
    from vsa.data.synthetic import CAPTION_WORDS, COLOURS, SHAPES

    ds = SyntheticVideoDataset(40, frames=8, height=24, width=24, seed=1, captions=True, max_objects=1)
    assert "caption" not in SyntheticVideoDataset(4, 8, 24, 24)[0]
    seen = set()
    for i in range(40):
        item = ds[i]
        label, words = int(item["label"]), item["caption"].split()
        assert words[0] == "a" and words[1] in COLOURS and words[2] == SHAPES[label % 5]
        assert set(words) <= set(CAPTION_WORDS) and item["caption"] == ds[i]["caption"]  # deterministic
        assert torch.equal(item["video"], SyntheticVideoDataset(40, 8, 24, 24, seed=1, max_objects=1)[i]["video"])
        seen.add(" ".join(words[3:]))
    assert {"moves left", "moves right", "circles clockwise", "waves left"} & seen and len(seen) >= 6
    # Directions agree with the pixels: a "moves right" object's centre of mass moves right.
    for i in range(40):
        item = ds[i]
        if item["caption"].endswith("moves right") or item["caption"].endswith("moves left"):
            bright = (item["video"].mean(0) > -0.3).float()  # [T, H, W]: the object, not the dark background
            xs = torch.arange(24.0)
            centre = [(f.sum(0) * xs).sum() / f.sum().clamp(min=1) for f in bright[:2]]
            step = float(centre[1] - centre[0])
            assert (step > 0) == item["caption"].endswith("right"), (item["caption"], step)
    with pytest.raises(ValueError, match="captions must be true or false"):
        SyntheticVideoDataset(4, 4, 8, 8, captions="yes")
