"""Procedural videos whose content at one place is fixed by content far away, with a distance knob.

Three kinds of clip; in each, `distance` is the gap the model has to bridge, as a fraction of the
frame width (mirror) or of the clip length (return, repeat), and distance 0 is plain local motion:

- "mirror": an object bounces up and down in the left half; the right half of every frame is the
  exact left-right flip of the left half (background included). The object's edge and its mirror
  image's edge are `round(distance * width)` pixels apart; at distance 0 they touch at the axis.
- "return": an object moves towards a frame edge (one of four), leaves, stays completely out of view
  for `round(distance * frames)` frames and comes back on its mirrored path (as if it bounced off a
  wall off-screen), so where and when it re-enters is fixed by how it left. At distance 0 it bounces
  off the frame edge and never leaves.
- "repeat": 1..max_objects objects move as in the synthetic set; the first P = max(1, frames // 4)
  frames (the pattern) are shown again, exactly, after `round(distance * frames)` frames of other
  content (the clip rewinds, then moves on with new positions). At distance 0 the pattern repeats
  straight away.

The class fixes the shape and colour (and for "repeat" the motion) as in `SyntheticVideoDataset`,
so a class-conditional model and a classifier have something to learn; `kind="mixed"` draws the
kind per sample. Items: dict(video=float32 [C, T, H, W] in [-1, 1], label=int64 scalar), rendered
from a generator seeded by (seed, index). `info(index)` gives the frame and pixel positions of the
long-range structure (for tests and analysis).

    ds = LongRangeVideoDataset(1000, frames=16, height=128, width=128, kind="return", distance=0.5)
"""

from __future__ import annotations

import math

import torch

from vsa.data.synthetic import MOTIONS, SHAPES, SyntheticVideoDataset, _triangle_wave

KINDS = ("mirror", "return", "repeat")
# Half-extent of each shape along an axis, in units of its radius (see synthetic._distance).
EXTENT = {"circle": 1.0, "square": 0.85, "diamond": 1.25, "ring": 1.1, "cross": 1.1}
_EDGES = ("right", "left", "bottom", "top")


class LongRangeVideoDataset(SyntheticVideoDataset):
    """Class-labelled clips with mirror, leave-and-return or repeat structure at a given distance.

    Args:
        num_samples, frames, height, width, channels, num_classes, seed: as SyntheticVideoDataset.
        kind: "mirror", "return", "repeat", or "mixed" (one of the three drawn per sample).
        distance: in [0, 1): gap as a fraction of the width (mirror) or of the clip length (return,
            repeat); see the module docstring. 0 = local motion.
        max_objects: objects per "repeat" clip (1..max_objects); "mirror" and "return" clips hold one.
        pattern_frames: frames in a "repeat" clip's pattern; None = frames // 4. The pattern, the gap
            and its repeat must fit the clip: 2 * pattern_frames + round(distance * frames) <= frames.
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
        kind: str = "mixed",
        distance: float = 0.25,
        max_objects: int = 2,
        pattern_frames: int | None = None,
    ) -> None:
        super().__init__(num_samples, frames, height, width, channels=channels, num_classes=num_classes,
                         seed=seed, max_objects=max_objects)
        if kind not in (*KINDS, "mixed"):
            raise ValueError(f"kind must be one of {(*KINDS, 'mixed')}, got {kind!r}")
        if isinstance(distance, bool) or not isinstance(distance, (int, float)) or not 0 <= distance < 1:
            raise ValueError(f"distance must be a number in [0, 1) (a fraction of the frame width or clip "
                             f"length), got {distance!r}")
        self.kind, self.distance = kind, float(distance)
        self.kinds = KINDS if kind == "mixed" else (kind,)
        self.gap_pixels = round(self.distance * self.width)  # mirror
        self.gap_frames = round(self.distance * self.frames)  # return, repeat
        if pattern_frames is not None and (isinstance(pattern_frames, bool) or not isinstance(pattern_frames, int)
                                           or pattern_frames < 1):
            raise ValueError(f"pattern_frames must be a positive integer or None (frames // 4), got "
                             f"{pattern_frames!r}")
        self.pattern_frames = max(1, self.frames // 4) if pattern_frames is None else pattern_frames  # repeat
        self._check_fits()

    def _check_fits(self) -> None:
        d, T = self.distance, self.frames
        if "mirror" in self.kinds and (self.width - self.gap_pixels) / 4 < 2.5:
            raise ValueError(f"kind='mirror' with distance={d} leaves no room for an object and its mirror "
                             f"image in width={self.width}; lower distance or widen the frame")
        if "return" in self.kinds and self.gap_frames > 0 and self.gap_frames + 2 > T:
            raise ValueError(f"kind='return' with distance={d} keeps the object out for {self.gap_frames} "
                             f"of {T} frames, leaving none to see it leave and return; lower distance "
                             f"or use more frames")
        if "repeat" in self.kinds and 2 * self.pattern_frames + self.gap_frames > T:
            raise ValueError(f"kind='repeat' with distance={d} needs 2 x {self.pattern_frames} pattern "
                             f"frames + {self.gap_frames} gap frames > frames={T}; lower distance, lower "
                             f"pattern_frames or use more frames")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        label, video, _ = self._sample(index)
        return {"video": video, "label": torch.tensor(label, dtype=torch.int64)}

    def info(self, index: int) -> dict:
        """Where the long-range structure of sample `index` lies (kind, label and per-kind positions)."""
        label, _, info = self._sample(index)
        return {"label": label, **info}

    def _sample(self, index: int) -> tuple[int, torch.Tensor, dict]:
        gen = self._generator(index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))  # first draw, as label_of reads
        kind = self.kinds[int(torch.randint(len(self.kinds), (1,), generator=gen))]
        video = self._background(gen)
        p = torch.rand(10, generator=gen)
        shape, hue = SHAPES[label % len(SHAPES)], (label * (math.sqrt(5.0) - 1.0) / 2.0) % 1.0
        hue += 0.04 * (float(p[9]) - 0.5)
        radius = 0.10 + 0.08 * float(p[0])  # shorter-side units, as in the synthetic set
        if kind == "mirror":
            info = self._mirror(video, shape, radius, hue, p)
        elif kind == "return":
            info = self._return(video, shape, radius, hue, p)
        else:
            info = self._repeat(video, label, hue, gen)
        return label, video.contiguous(), {"kind": kind, **info}

    def _reach(self, shape: str, radius: float, pixels: int) -> float:
        """The object's half-extent plus a pixel of antialiasing, in frame units along an axis."""
        return (EXTENT[shape] * radius * self._short + 1.0) / pixels

    def _bounce(self, margin: float, start: float, travel: float, tau: torch.Tensor) -> torch.Tensor:
        """A coordinate bouncing between margin and 1 - margin (frame units)."""
        return margin + (1 - 2 * margin) * _triangle_wave(start + travel * tau)

    def _mirror(self, video: torch.Tensor, shape: str, radius: float, hue: float, p: torch.Tensor) -> dict:
        W, half = self.width, self.width // 2
        # Largest radius whose object and mirror image fit beside the gap: 2 * extent <= (W - gap) / 2.
        fit = ((W - self.gap_pixels) / 4 - 0.5) / (EXTENT[shape] * self._short)
        radius = min(radius, fit)
        extent = EXTENT[shape] * radius * self._short + 0.5  # pixels, antialiased edge included
        cx = (W - self.gap_pixels) / 2 - extent  # pixels: the object's edge is gap / 2 left of the axis
        travel = (0.9 + 0.6 * float(p[4])) * (1.0 if p[6] < 0.5 else -1.0)
        cy = self._bounce(self._reach(shape, radius, self.height), float(p[1]), travel, self._tau)
        self._paint(video, shape, cy, torch.full_like(cy, cx / W), radius, hue)
        video[..., W - half:] = video[..., :half].flip(-1)
        return {"object_x": cx, "object_extent": extent, "gap_pixels": self.gap_pixels}

    def _return(self, video: torch.Tensor, shape: str, radius: float, hue: float, p: torch.Tensor) -> dict:
        T, g = self.frames, self.gap_frames
        edge = _EDGES[int(4 * float(p[5])) % 4]
        along, across = (self.width, self.height) if edge in ("right", "left") else (self.height, self.width)
        m = self._reach(shape, radius, along)  # beyond 1 + m the object is fully out of view
        t = torch.arange(T, dtype=torch.float32)
        jitter = int(3 * float(p[7])) - 1  # -1, 0 or 1: where in the clip it leaves
        if g == 0:  # bounces off the edge inside the frame
            t_turn = min(max((T - 1) / 2 + jitter, 0.0), T - 1.0)
            a_turn, n = 1.0 - m, max(t_turn, T - 1 - t_turn, 1.0)
            lo, hi = 2.0 / along, (1.0 - 2 * m) / n
            t_exit = None
        else:  # out of view for frames t_exit .. t_exit + g - 1
            t_exit = min(max((T - g) // 2 + jitter, 1), T - g - 1)
            t_turn, a_turn = t_exit + (g - 1) / 2, 1.0 + m  # a_turn gets + v (g - 1) / 2 below
            before, after = t_exit, T - t_exit - g
            lo, hi = max(m / min(before, after), 2.0 / along), (1.0 + m) / max(before, after)
        v = lo + (hi - lo) * float(p[4]) if hi > lo else hi  # frame units per frame
        if g > 0:
            a_turn += v * (g - 1) / 2
        a = a_turn - v * (t - t_turn).abs()
        b = self._bounce(self._reach(shape, radius, across), float(p[1]),
                         0.5 * (float(p[8]) - 0.5), self._tau)
        if edge in ("left", "top"):
            a = 1.0 - a
        cy, cx = (b, a) if edge in ("right", "left") else (a, b)
        self._paint(video, shape, cy, cx, radius, hue)
        absent = list(range(t_exit, t_exit + g)) if g else []
        return {"edge": edge, "absent_frames": absent, "speed": v}

    def _repeat(self, video: torch.Tensor, label: int, hue: float, gen: torch.Generator) -> dict:
        T, P, g = self.frames, self.pattern_frames, self.gap_frames
        t = torch.arange(T)
        # Trajectory time of every frame: 0..P+g-1, then the pattern 0..P-1 again, then onwards.
        s = torch.where(t < P + g, t, torch.where(t < 2 * P + g, t - P - g, t - P))
        tau = s.float() / max(T - 1, 1)
        shape, motion = SHAPES[label % len(SHAPES)], MOTIONS[label % len(MOTIONS)]
        n_objects = int(torch.randint(1, self.max_objects + 1, (1,), generator=gen))
        for _ in range(n_objects):
            p = torch.rand(10, generator=gen)
            radius = 0.10 + 0.08 * float(p[0])
            cy, cx = self._trajectory(motion, radius, p, tau)
            self._paint(video, shape, cy, cx, radius, hue)
        return {"pattern_frames": list(range(P)), "repeat_frames": list(range(P + g, 2 * P + g))}

    def __repr__(self) -> str:
        return (f"LongRangeVideoDataset(num_samples={self.num_samples}, frames={self.frames}, "
                f"height={self.height}, width={self.width}, kind={self.kind!r}, distance={self.distance}, "
                f"num_classes={self.num_classes}, seed={self.seed})")
