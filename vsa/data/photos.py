"""Camera motion over real photographs: pans, zooms and rotations over the photos in scikit-image.

The photos are the image files that ship inside the scikit-image wheel (`skimage/data/*.png|jpg`,
no fetcher, no network); grayscale ones are repeated over the three channels. Each sample moves a
virtual camera over one photo; the class is the kind of motion:

    0 "pan"       the view slides 0.15-0.5 frame widths over the clip, in a random direction
    1 "zoom_in"   the view narrows by a factor 1.3-2 about a fixed point
    2 "zoom_out"  the view widens by a factor 1.3-2 about a fixed point
    3 "rotate"    the view turns 15-60 degrees, either way, about its centre

The photo, the start view (position, size, angle), speed and direction are random per sample and
the view always stays inside the photo. Frames are rendered with `F.affine_grid` + `grid_sample`
(bilinear), all frames in one call, from a copy of the photo scaled once so that one output pixel
covers about one photo pixel. Items: dict(video=float32 [3, T, H, W] in [-1, 1], label=int64),
deterministic per (seed, index). `camera(index)` returns the view of every frame.

    ds = PhotoPanDataset(1000, frames=16, height=128, width=128)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vsa.data.bundled import bundled_files
from vsa.data.synthetic import _positive_int, check_seed, sample_generator

MOTIONS = ("pan", "zoom_in", "zoom_out", "rotate")
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png", "grass.png", "gravel.png",
          "camera.png", "moon.png")
_VIEW = (0.35, 0.6)  # longer side of the start view, as a fraction of the photo's shorter side
_PIXELS_PER_VIEW = 0.55  # cached photo: shorter side = max(height, width) / this (so scale 0.64-1.09 at the start view)


def load_photo(path, shorter_side: int) -> torch.Tensor:
    """An image file -> float32 [3, h, w] in [-1, 1], scaled so its shorter side is `shorter_side`."""
    from PIL import Image  # a dependency of scikit-image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = shorter_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class PhotoPanDataset(Dataset):
    """Clips of a camera panning, zooming or rotating over a photo; class = kind of motion.

    Args:
        num_samples: length of the dataset.
        frames, height, width: clip size; any positive values.
        channels: must be 3 (RGB photos); present so configs read like the synthetic set's.
        seed: dataset seed.
        photos: file names in skimage/data (default: PHOTOS, 13 colour and grayscale photos).

    Items: dict(video=float32 [3, T, H, W] in [-1, 1], label=int64 index into MOTIONS).
    """

    num_classes = len(MOTIONS)

    def __init__(
        self,
        num_samples: int,
        frames: int,
        height: int,
        width: int,
        channels: int = 3,
        seed: int = 0,
        photos: Sequence[str] | None = None,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.frames = _positive_int("frames", frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        if channels != 3:
            raise ValueError(f"channels must be 3 (the photos are RGB), got {channels!r}")
        self.channels = 3
        self.seed = check_seed(seed)
        self.photo_names = tuple(PHOTOS if photos is None else photos)
        paths = bundled_files("skimage", "data", self.photo_names, pip_name="scikit-image")
        shorter = math.ceil(max(self.height, self.width) / _PIXELS_PER_VIEW)
        self.photos = [load_photo(path, shorter) for path in paths]
        self._tau = torch.arange(self.frames, dtype=torch.float32) / max(self.frames - 1, 1)

    def __len__(self) -> int:
        return self.num_samples

    def camera(self, index: int) -> dict:
        """The view of every frame of sample `index`, in pixels of its (cached) photo.

        Returns dict(label, photo (index into photo_names), centre [T, 2] as (x, y), scale [T]
        (photo pixels per output pixel), angle [T] (radians, counter-clockwise on screen)).
        """
        gen = sample_generator(self.seed, index, self.num_samples)
        label = int(torch.randint(len(MOTIONS), (1,), generator=gen))
        photo = int(torch.randint(len(self.photos), (1,), generator=gen))
        p = torch.rand(8, generator=gen, dtype=torch.float64).tolist()
        _, ph, pw = self.photos[photo].shape
        longest = max(self.height, self.width)
        view = _VIEW[0] + (_VIEW[1] - _VIEW[0]) * p[0]  # start view, fraction of the shorter side
        scale0 = view * min(ph, pw) / longest
        tau = self._tau.double()
        scale = torch.full_like(tau, scale0)
        angle = torch.zeros_like(tau)
        motion = MOTIONS[label]
        if motion in ("zoom_in", "zoom_out"):
            factor = 1.3 + 0.7 * p[1]
            scale = scale0 * factor ** (-tau if motion == "zoom_in" else tau - 1.0)  # widest view <= start
        elif motion == "rotate":
            scale = torch.full_like(tau, min(scale0, 0.98 * min(ph, pw) / math.hypot(self.height, self.width)))
            turn = math.radians(15 + 45 * p[1]) * (1.0 if p[2] < 0.5 else -1.0)
            angle = 2 * math.pi * p[3] + turn * tau
        # Half-extent of the widest view, rotated by any angle it takes: the centre keeps this far in.
        hx, hy = self.width / 2 * float(scale.max()), self.height / 2 * float(scale.max())
        if motion == "rotate":
            hx = hy = math.hypot(hx, hy)
        travel = torch.zeros(2, dtype=torch.float64)
        if motion == "pan":
            direction = 2 * math.pi * p[1]
            length = (0.15 + 0.35 * p[2]) * self.width * scale0  # photo pixels over the clip
            travel = length * torch.tensor([math.cos(direction), math.sin(direction)], dtype=torch.float64)
        # Start so that start and end centres both stay in [h, size - h] on each axis.
        lo = torch.tensor([hx, hy], dtype=torch.float64) - travel.clamp(max=0)
        hi = torch.tensor([pw - hx, ph - hy], dtype=torch.float64) - travel.clamp(min=0)
        start = lo + (hi - lo).clamp(min=0) * torch.tensor(p[4:6], dtype=torch.float64)
        centre = start + tau[:, None] * travel
        return {"label": label, "photo": photo, "centre": centre.float(), "scale": scale.float(),
                "angle": angle.float()}

    def render(self, photo: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor,
               angle: torch.Tensor) -> torch.Tensor:
        """[3, h, w] photo + per-frame view -> [3, T, H, W]: output pixel offset (u, v) from the frame
        centre shows photo pixel centre + scale * R(angle) (u, v)."""
        _, ph, pw = photo.shape
        H, W = self.height, self.width
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        # affine_grid maps normalised output coords (x W/2 = u) to normalised photo coords.
        theta = torch.stack([
            torch.stack([cos * W / pw, -sin * H / pw, 2 * centre[:, 0] / pw - 1], dim=1),
            torch.stack([sin * W / ph, cos * H / ph, 2 * centre[:, 1] / ph - 1], dim=1),
        ], dim=1)  # [T, 2, 3]
        T = theta.shape[0]
        grid = F.affine_grid(theta, [T, 3, H, W], align_corners=False)
        frames = F.grid_sample(photo.expand(T, -1, -1, -1), grid, mode="bilinear",
                               padding_mode="border", align_corners=False)
        return frames.permute(1, 0, 2, 3).clamp_(-1.0, 1.0).contiguous()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cam = self.camera(index)
        video = self.render(self.photos[cam["photo"]], cam["centre"], cam["scale"], cam["angle"])
        return {"video": video, "label": torch.tensor(cam["label"], dtype=torch.int64)}

    def label_of(self, index: int) -> int:
        """The class (index into MOTIONS) of sample `index` without rendering it."""
        return int(torch.randint(len(MOTIONS), (1,), generator=sample_generator(self.seed, index,
                                                                                 self.num_samples)))

    def __repr__(self) -> str:
        return (f"PhotoPanDataset(num_samples={self.num_samples}, frames={self.frames}, height={self.height}, "
                f"width={self.width}, photos={len(self.photos)}, seed={self.seed})")
