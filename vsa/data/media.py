"""Writing samples: model-space -> pixels -> uint8 frames -> mp4 files (PyAV) and a PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(videos: torch.Tensor) -> np.ndarray:
    """Pixel videos [N, C, T, H, W] in [-1, 1] -> RGB frames [N, T, H, W, 3] uint8.

    One channel is shown as grey; two get a zero third channel; more than three show the first
    three (e.g. raw latents without a decoder).
    """
    if videos.dim() != 5:
        raise ValueError(f"videos must be [N, C, T, H, W], got shape {tuple(videos.shape)}")
    x = videos.detach().float().cpu()
    channels = x.shape[1]
    if channels == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    elif channels == 2:
        x = torch.cat([x, torch.full_like(x[:, :1], -1.0)], dim=1)
    else:
        x = x[:, :3]
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode frames [T, H, W, 3] uint8 as an H.264 mp4 (odd sizes are padded by one pixel)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p needs even sizes
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_grid(path: str | Path, videos: np.ndarray, max_frames: int = 16, gap: int = 2) -> Path:
    """PNG grid of videos [N, T, H, W, 3] uint8: one row per video, one column per frame (at most
    `max_frames` frames, evenly spaced), separated by `gap` white pixels."""
    from matplotlib.image import imsave

    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be [N, T, H, W, 3], got {videos.shape}")
    n, t, h, w, _ = videos.shape
    picks = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    grid = np.full((n * h + (n - 1) * gap, len(picks) * w + (len(picks) - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, f in enumerate(picks):
            y, x = i * (h + gap), j * (w + gap)
            grid[y:y + h, x:x + w] = videos[i, f]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, grid)
    return path
