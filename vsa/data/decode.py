"""Decode a clip of RGB frames from one video file with decord (the `decord2` wheel) or PyAV.

    frames = read_clip(path, pick=lambda n: [0, 2, 4], backend="auto")   # uint8 [3, H, W, 3]

`pick(n)` receives the number of frames in the file and returns the frame indices to
decode, so the caller chooses the clip once the length is known. Backends:

- "decord": random access, fast on long files. decord2 3.4.0 mis-shapes frames of a few narrow
  widths (measured: 2, 4, 6, 8, 12, 16, 24, 48 and 72 px): each row keeps FFmpeg's line padding and
  the frame comes back as [H, W, k != 3], so `get_batch` fails with "The size must exactly match".
  Those files are read frame by frame and the padding is cut off (checked pixel-identical to PyAV).
- "av": PyAV, decodes sequentially from the start of the file up to the last wanted frame.
- "auto": decord if installed, and PyAV for any file decord cannot read.

Every failure to read a file is raised as `UnreadableVideoError` naming the file and the reason(s).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "decord", "av")
_INSTALL = {"decord": "pip install decord2", "av": "pip install av"}

PickFn = Callable[[int], Sequence[int]]


class UnreadableVideoError(RuntimeError):
    """A video file could not be opened or decoded (corrupt, truncated, no video stream, ...)."""


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_backend(backend: str) -> str:
    """Validate a backend name and that its library is installed; returns the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not (_installed("decord") or _installed("av")):
            raise ImportError("no video decoder is installed; run `pip install decord2 av`")
    elif not _installed(backend):
        raise ImportError(f"backend={backend!r} needs the `{backend}` module; run `{_INSTALL[backend]}` "
                          f"or choose another backend from {BACKENDS}")
    return backend


def _checked_indices(pick: PickFn, n: int, path: Path) -> list[int]:
    if n < 1:
        raise UnreadableVideoError(f"{path}: the video stream has no frames")
    indices = [int(i) for i in pick(n)]
    if not indices or min(indices) < 0 or max(indices) >= n:
        raise ValueError(f"frame indices {indices} out of range for {path} with {n} frames")
    return indices


def _strip_row_padding(frame: np.ndarray) -> np.ndarray:
    """[H, W, k] array whose rows hold a padded RGB line -> [H, W, 3] (see the module docstring)."""
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    h, w = frame.shape[:2]
    rows = frame.reshape(h, -1)
    if rows.shape[1] < 3 * w:
        raise UnreadableVideoError(f"decoded frame of shape {frame.shape} is not an RGB image")
    return np.ascontiguousarray(rows[:, : 3 * w]).reshape(h, w, 3)


def _read_decord(path: Path, pick: PickFn, threads: int) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for unreadable files
        raise UnreadableVideoError(f"decord cannot open {path}: {exc}") from exc
    indices = _checked_indices(pick, len(reader), path)
    try:
        batch = reader.get_batch(indices).asnumpy()
        if batch.ndim == 4 and batch.shape[-1] == 3:
            return batch
    except Exception as exc:
        if "must exactly match" not in str(exc):
            raise UnreadableVideoError(f"decord cannot decode {path}: {exc}") from exc
    # Padded-row frames (narrow widths, or a batch that is not RGB): read one by one, cut the padding.
    try:
        return np.stack([_strip_row_padding(reader[i].asnumpy()) for i in indices])
    except Exception as exc:
        raise UnreadableVideoError(f"decord cannot decode {path}: {exc}") from exc


def _count_frames_av(path: Path) -> int:
    """Frame count from the container header, else by counting video packets (no decoding)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnreadableVideoError(f"{path} has no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _read_av(path: Path, pick: PickFn, threads: int) -> np.ndarray:
    import av

    try:
        n = _count_frames_av(path)
    except UnreadableVideoError:
        raise
    except Exception as exc:  # av.error.* (InvalidDataError, ...), OSError, ...
        raise UnreadableVideoError(f"PyAV cannot open {path}: {exc}") from exc
    indices = _checked_indices(pick, n, path)
    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            if threads != 1:
                stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as exc:
        raise UnreadableVideoError(f"PyAV cannot decode {path}: {exc}") from exc
    missing = sorted(wanted - frames.keys())
    if missing:
        raise UnreadableVideoError(f"PyAV decoded only {len(frames)} of the wanted frames of {path}; "
                                   f"the stream ends before frame {missing[0]}")
    return np.stack([frames[i] for i in indices])


def read_clip(path: str | Path, pick: PickFn, backend: str = "auto", threads: int = 1) -> np.ndarray:
    """Decode the frames `pick(num_frames)` of `path` as uint8 RGB [T, H, W, 3].

    Raises UnreadableVideoError when the file cannot be read (with "auto": by either library).
    """
    path = Path(path)
    check_backend(backend)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = library default), got {threads}")
    if backend == "decord":
        return _read_decord(path, pick, threads)
    if backend == "av":
        return _read_av(path, pick, threads)
    errors = []
    for name, reader in (("decord", _read_decord), ("av", _read_av)):
        if not _installed(name):
            continue
        try:
            return reader(path, pick, threads)
        except UnreadableVideoError as exc:
            errors.append(str(exc))
    raise UnreadableVideoError("; ".join(errors))
