"""Procedural class-labelled videos of moving shapes (the default dataset; no download).

Every sample is rendered from a handful of random numbers drawn from a generator seeded by
(seed, index), so sample `i` is identical on every call, process and machine. The class fixes three
things a class-conditional model can learn: the shape (circle, square, diamond, ring, cross), the
motion pattern (wrap-around, bounce, orbit, wave) and the colour (a hue per class). Motion is
long-range: over one clip an object travels about a frame width or more, whatever the number of
frames, so distant frames depend on each other. Wrapping objects leave the frame entirely and
re-enter on the opposite side; bouncing ones reverse at the walls; orbiting ones come back to where
they started.

    ds = SyntheticVideoDataset(num_samples=1000, frames=16, height=64, width=64)
    ds[0]["video"]   # float32 [3, 16, 64, 64] in [-1, 1]
    ds[0]["label"]   # int64 scalar in [0, num_classes)

With `captions=True` items also carry a caption of the first object, e.g. "a red circle moves
left" or "a blue ring circles clockwise": its colour (the nearest of six hue names), shape and
motion with its direction; every word is in CAPTION_WORDS (the text-to-video demo's vocabulary).

Rendering is vectorised over (T, H, W); the only Python loop is over the 1-3 objects of a clip.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "diamond", "ring", "cross")
MOTIONS = ("wrap", "bounce", "orbit", "wave")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # hue spacing that keeps any number of classes apart
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue 0, 1/6, ..., 5/6 (RGB)
CAPTION_WORDS = ("a", *COLOURS, *SHAPES, "moves", "bounces", "circles", "waves", "left", "right", "up",
                 "down", "around", "clockwise", "counterclockwise")


def colour_name(hue: float) -> str:
    """The nearest of COLOURS to a hue in [0, 1) (the RGB rendering's: 0 red, 1/3 green, 2/3 blue)."""
    return COLOURS[round((hue % 1.0) * len(COLOURS)) % len(COLOURS)]


def motion_phrase(motion: str, p: torch.Tensor) -> str:
    """How an object with trajectory parameters `p` (SyntheticVideoDataset._trajectory) moves, in
    words: the dominant direction of travel (image axes: y down), the sense of an orbit, or
    "bounces around"."""
    if motion == "wrap":
        angle = 2.0 * math.pi * float(p[3])
        dy, dx = math.sin(angle), math.cos(angle)
        return "moves " + (("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up"))
    if motion == "bounce":  # it turns at the walls, within the first frames: no one direction
        return "bounces around"
    if motion == "orbit":  # theta grows with turns > 0: clockwise on screen (y points down)
        return "circles clockwise" if p[6] < 0.5 else "circles counterclockwise"
    if motion == "wave":
        return "waves right" if p[6] < 0.5 else "waves left"
    raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for one (seed, index) pair (no collisions in practice)."""
    words = np.random.SeedSequence((seed, index)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _radius_range(radius) -> tuple[float, float]:
    """(min, max) object radius: two numbers with 0 < min <= max <= 0.5 (shorter-side units)."""
    try:
        lo, hi = (float(r) for r in radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be two numbers (min, max) in units of the frame's shorter "
                         f"side, e.g. [0.10, 0.18], got {radius!r}") from None
    if not 0.0 < lo <= hi <= 0.5:
        raise ValueError(f"radius must satisfy 0 < min <= max <= 0.5 (units of the frame's shorter "
                         f"side; 0.5 spans the whole frame), got {radius!r}")
    return lo, hi


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def sample_generator(seed: int, index: int, num_samples: int) -> torch.Generator:
    """The torch generator of sample `index` of a dataset of `num_samples`, seeded by (seed, index)."""
    index = operator.index(index)
    if not -num_samples <= index < num_samples:
        raise IndexError(f"index {index} out of range for a dataset of {num_samples} samples")
    return torch.Generator().manual_seed(_sample_seed(seed, index % num_samples))


def _triangle_wave(x: torch.Tensor) -> torch.Tensor:
    """Reflect x into [0, 1] as a ball bouncing between two walls would move."""
    x = torch.remainder(x, 2.0)
    return torch.where(x > 1.0, 2.0 - x, x)


def _wrap(x: torch.Tensor, margin: float) -> torch.Tensor:
    """Wrap x onto [-margin, 1 + margin): the object is fully outside the frame before it re-enters."""
    return torch.remainder(x + margin, 1.0 + 2.0 * margin) - margin


def _distance(shape: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside) to a shape of radius r centred at the origin."""
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - r
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.85 * r
    if shape == "diamond":
        return (u.abs() + v.abs()) - 1.25 * r
    if shape == "ring":
        return (torch.sqrt(u * u + v * v) - 0.8 * r).abs() - 0.3 * r
    if shape == "cross":
        arm, half = 0.32 * r, 1.1 * r
        bar_v = torch.maximum(u.abs() - half, v.abs() - arm)
        bar_h = torch.maximum(u.abs() - arm, v.abs() - half)
        return torch.minimum(bar_v, bar_h)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class SyntheticVideoDataset(Dataset):
    """Class-labelled videos of shapes moving across the frame, deterministic per (seed, index).

    Args:
        num_samples: length of the dataset.
        frames, height, width: clip size; any positive values (odd sizes are fine).
        channels: number of colour channels (3 = RGB; other counts get a per-channel hue phase).
        num_classes: number of classes; class c has shape SHAPES[c % 5], motion MOTIONS[c % 4] and
            its own hue, so the first 20 classes differ in shape and motion, all differ in colour.
        seed: dataset seed; two datasets with different seeds give different videos.
        max_objects: each clip holds 1..max_objects objects of its class.
        radius: (min, max) object radius in units of the frame's shorter side; each object draws
            its radius uniformly from this range (default 0.10-0.18: 3-6 pixels at 32x32).
        captions: also give each item a `caption` (str) of its first object (module docstring).
        pace: how much of its path an object covers in one clip, whatever the number of frames
            (1 = all of it: a wrapping object travels 0.9-1.5 frame widths; 0.25 = a quarter, so
            it moves a quarter as far between frames). At 1, in 4-frame clips an object jumps a
            third of the frame or more between frames; the default run keeps 1, as 0.25 drew no
            better shapes (docs/sample_quality.md, 2026-12-08).

    Items: dict(video=float32 [C, T, H, W] in [-1, 1], label=int64 scalar[, caption=str]).
    """

    def __init__(
        self,
        num_samples: int,
        frames: int,
        height: int,
        width: int,
        channels: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        max_objects: int = 3,
        radius: tuple[float, float] = (0.10, 0.18),
        captions: bool = False,
        pace: float = 1.0,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.frames = _positive_int("frames", frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        self.channels = _positive_int("channels", channels)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.max_objects = _positive_int("max_objects", max_objects)
        self.seed = check_seed(seed)
        self.radius = _radius_range(radius)
        if not isinstance(captions, bool):
            raise ValueError(f"captions must be true or false, got {captions!r}")
        self.captions = captions
        if isinstance(pace, bool) or not isinstance(pace, (int, float)) or not 0.0 < pace <= 10.0:
            raise ValueError(f"pace must be a number in (0, 10] (the share of its path an object "
                             f"covers in one clip; 1 = all of it), got {pace!r}")
        self.pace = float(pace)
        # Pixel-centre coordinates in [0, 1] along each axis, and the clip time in [0, 1].
        self._ys = (torch.arange(self.height, dtype=torch.float32) + 0.5) / self.height
        self._xs = (torch.arange(self.width, dtype=torch.float32) + 0.5) / self.width
        self._tau = self.pace * torch.arange(self.frames, dtype=torch.float32) / max(self.frames - 1, 1)
        self._short = float(min(self.height, self.width))

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self, index: int) -> torch.Generator:
        """The generator of sample `index`, seeded by (seed, index)."""
        return sample_generator(self.seed, index, self.num_samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = self._generator(index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        video, first = self._render(label, gen)
        item = {"video": video, "label": torch.tensor(label, dtype=torch.int64)}
        if self.captions:
            item["caption"] = self.caption(label, first)
        return item

    def caption(self, label: int, p: torch.Tensor) -> str:
        """"a <colour> <shape> <motion phrase>" of an object of class `label` with parameters `p`."""
        shape, motion = SHAPES[label % len(SHAPES)], MOTIONS[label % len(MOTIONS)]
        hue = label * _GOLDEN + 0.04 * (float(p[9]) - 0.5)  # the object's own hue, as painted
        return f"a {colour_name(hue)} {shape} {motion_phrase(motion, p)}"

    shape_names = SHAPES

    @staticmethod
    def shape_of(label: int) -> int:
        """The index in SHAPES of class `label`'s shape (the sample metrics' shape accuracy)."""
        return int(label) % len(SHAPES)

    def label_of(self, index: int) -> int:
        """The class of sample `index` without rendering it (the generator's first draw)."""
        return int(torch.randint(self.num_classes, (1,), generator=self._generator(index)))

    def _render(self, label: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip of class `label` and the first object's parameters."""
        shape, motion = SHAPES[label % len(SHAPES)], MOTIONS[label % len(MOTIONS)]
        hue = (label * _GOLDEN) % 1.0
        C, T, H, W = self.channels, self.frames, self.height, self.width
        video = self._background(gen)
        n_objects = int(torch.randint(1, self.max_objects + 1, (1,), generator=gen))
        first = None
        for _ in range(n_objects):
            p = torch.rand(10, generator=gen)
            first = p if first is None else first
            lo, hi = self.radius
            radius = lo + (hi - lo) * float(p[0])  # in units of the frame's shorter side
            cy, cx = self._trajectory(motion, radius, p)
            self._paint(video, shape, cy, cx, radius, hue + 0.04 * (float(p[9]) - 0.5))  # as caption()
        assert video.shape == (C, T, H, W)
        return video.contiguous(), first

    def _paint(self, video: torch.Tensor, shape: str, cy: torch.Tensor, cx: torch.Tensor, radius: float,
               hue: float) -> None:
        """Draw one object (centre per frame in [0, 1] frame units, radius in shorter-side units)."""
        C, H, W = self.channels, self.height, self.width
        # Offsets from the centre in shorter-side units, so shapes stay round on any aspect ratio.
        u = ((self._ys[None, :] - cy[:, None]) * (H / self._short))[:, :, None]
        v = ((self._xs[None, :] - cx[:, None]) * (W / self._short))[:, None, :]
        dist = _distance(shape, u, v, radius)  # [T, H, W]
        alpha = dist.mul_(-self._short).add_(0.5).clamp_(0.0, 1.0)  # ~1-pixel antialiased edge
        phase = hue - torch.arange(C, dtype=torch.float32) / max(C, 3)
        colour = torch.clamp(0.25 + 0.75 * torch.cos(2.0 * math.pi * phase), -1.0, 1.0)
        video.lerp_(colour.view(C, 1, 1, 1).expand_as(video), alpha[None])

    def _background(self, gen: torch.Generator) -> torch.Tensor:
        """A dark, static gradient with a random direction and tint (not tied to the class)."""
        p = torch.rand(2 + self.channels, generator=gen)
        angle = 2.0 * math.pi * float(p[0])
        ramp = math.cos(angle) * (self._ys[:, None] - 0.5) + math.sin(angle) * (self._xs[None, :] - 0.5)
        level = -0.8 + 0.1 * float(p[1]) + 0.15 * ramp  # [H, W], within about [-0.91, -0.59]
        tint = 0.1 * (p[2:] - 0.5)
        bg = level[None, None] + tint.view(-1, 1, 1, 1)
        return bg.expand(self.channels, self.frames, self.height, self.width).clone()

    def _trajectory(self, motion: str, radius: float, p: torch.Tensor,
                    tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre (y, x) of one object at path times `tau` (default: every frame, 0..pace), in
        [0, 1] frame coordinates (may leave it)."""
        tau = self._tau if tau is None else tau
        # Half-extent of the object along each axis in frame units: the diamond reaches 1.25 r, plus
        # a pixel for the antialiased edge, so a wrapping object is fully out before it re-enters.
        reach = 1.25 * radius * self._short + 1.0  # pixels
        my, mx = reach / self.height, reach / self.width
        y0, x0 = float(p[1]), float(p[2])
        angle = 2.0 * math.pi * float(p[3])
        travel = 0.9 + 0.6 * float(p[4])  # frame widths covered over the clip
        if motion == "wrap":
            cy = _wrap(y0 + travel * math.sin(angle) * tau, my)
            cx = _wrap(x0 + travel * math.cos(angle) * tau, mx)
        elif motion == "bounce":
            travel *= 1.5
            cy = my + (1 - 2 * my) * _triangle_wave(y0 + travel * math.sin(angle) * tau)
            cx = mx + (1 - 2 * mx) * _triangle_wave(x0 + travel * math.cos(angle) * tau)
        elif motion == "orbit":
            turns = (0.75 + 0.5 * float(p[5])) * (1.0 if p[6] < 0.5 else -1.0)
            theta = 2.0 * math.pi * (float(p[7]) + turns * tau)
            ry, rx = 0.25 + 0.12 * float(p[8]), 0.25 + 0.12 * float(p[1])
            cy = 0.5 + ry * torch.sin(theta)
            cx = 0.5 + rx * torch.cos(theta)
        elif motion == "wave":
            direction = 1.0 if p[6] < 0.5 else -1.0
            cx = _wrap(x0 + direction * travel * tau, mx)
            amplitude = 0.2 + 0.15 * float(p[8])
            cy = 0.5 + amplitude * torch.sin(2.0 * math.pi * (float(p[7]) + 2.0 * tau))
        else:
            raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
        return cy, cx

    def __repr__(self) -> str:
        return (f"SyntheticVideoDataset(num_samples={self.num_samples}, frames={self.frames}, "
                f"height={self.height}, width={self.width}, channels={self.channels}, "
                f"num_classes={self.num_classes}, seed={self.seed}, max_objects={self.max_objects}, "
                f"radius={self.radius}, captions={self.captions}, pace={self.pace})")
