"""A folder of video files as a dataset of fixed-size clips, with optional labels and captions.

    ds = VideoFolderDataset("data/clips", frames=16, height=64, width=64, stride=2)
    ds[0]   # dict(video=float32 [3, 16, 64, 64] in [-1, 1], label=int64, caption=str if any)

- Files: every .mp4/.avi/.mkv/.webm/.mov under `root` (recursively), sorted by relative path.
- Metadata (optional): `root/metadata.csv` or `root/metadata.jsonl` with a `file_name` column
  (relative to root) and a `label` and/or `caption` column. When present, it defines the dataset:
  only listed files that exist are used. Integer labels are kept; other labels are mapped to their
  index in the sorted list `classes`. A file without a label gets -1 (also when there are no labels).
- Clip: `frames` frames `stride` apart. Training mode (`train=True`) picks a random start (torch's
  RNG, seeded per DataLoader worker); eval mode takes the centred clip, so it is deterministic.
  A video shorter than the clip repeats its last frame.
- Resize: scale so the frame covers (height, width) (the shorter side relative to the target), then
  centre-crop; bilinear with antialiasing through torch.nn.functional.interpolate.
- Unreadable files: `ds[i]` returns the next readable sample instead, records the file in a log
  shared by all processes (DataLoader workers included), and warns once per file and process with an
  `UnreadableVideoWarning` naming it. `ds.num_skipped` / `ds.skipped_files` read that log.
"""

from __future__ import annotations

import csv
import json
import operator
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vsa.data.decode import UnreadableVideoError, check_backend, read_clip

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")


class UnreadableVideoWarning(UserWarning):
    """A video file was skipped because it could not be decoded."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _remove_dir_if_owner(path: str, owner_pid: int) -> None:
    # Forked DataLoader workers hold copies of the dataset; only the creating process cleans up.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class SkipLog:
    """Append-only text file of unreadable files ("name<TAB>reason" lines), shared across processes.

    Small appends to a file opened in append mode are atomic on local POSIX file systems, so
    DataLoader workers and DDP ranks can all write to the same file. With `path=None` the file lives
    in a temporary folder that the creating process removes when the log is garbage-collected.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            folder = tempfile.mkdtemp(prefix="vsa-skipped-")
            weakref.finalize(self, _remove_dir_if_owner, folder, os.getpid())
            path = Path(folder) / "skipped.tsv"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def add(self, name: str, reason: str) -> None:
        line = name.replace("\t", " ").replace("\n", " ") + "\t" + " ".join(reason.split()) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def entries(self) -> dict[str, str]:
        """Distinct skipped files -> the last reason recorded for each."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        out: dict[str, str] = {}
        for line in text.splitlines():
            name, _, reason = line.partition("\t")
            if name:
                out[name] = reason
        return out


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C, T, h, w] float -> [C, T, height, width]: scale to cover the target, then centre-crop."""
    _, _, h, w = video.shape
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        if (new_h, new_w) != (h, w):
            frames = video.permute(1, 0, 2, 3)  # interpolate works on [N, C, h, w]
            frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear",
                                   align_corners=False, antialias=True)
            video = frames.permute(1, 0, 2, 3)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        video = video[:, :, top:top + height, left:left + width]
    return video.contiguous()


def clip_indices(num_frames: int, frames: int, stride: int, start: int) -> list[int]:
    """`frames` indices `stride` apart from `start`, clamped to the last frame of the video."""
    return [min(start + i * stride, num_frames - 1) for i in range(frames)]


def _find_videos(root: Path) -> list[str]:
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
    return sorted(names)


def _read_metadata(path: Path) -> list[dict]:
    """Rows of a metadata.csv / metadata.jsonl file; each must have a `file_name`."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        first_line = 2  # line 1 is the header
    elif path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    example = '{"file_name": "a.mp4", "label": 3}'
                    raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg}); write one JSON "
                                     f"object per line, e.g. {example}") from None
        first_line = 1
    else:
        raise ValueError(f"metadata file {path} must end in .csv or .jsonl")
    for n, row in enumerate(rows, start=first_line):
        if not isinstance(row, dict) or not row.get("file_name"):
            raise ValueError(f"{path}, row {n}: missing `file_name`; every row needs the video's path "
                             f"relative to {path.parent}")
    return rows


def _parse_labels(values: list) -> tuple[list[int], list[str] | None]:
    """Integer labels stay integers; any other values become indices into the sorted class names."""
    present = [v for v in values if v is not None and str(v).strip() != ""]

    def is_int(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, int):
            return True
        return isinstance(v, str) and v.strip().lstrip("-").isdigit()

    if all(is_int(v) for v in present):
        labels = [int(v) if v is not None and str(v).strip() != "" else -1 for v in values]
        if min(labels) < -1:
            raise ValueError(f"integer labels must be >= 0 (or empty / -1 for none), got {min(labels)}")
        return labels, None
    classes = sorted({str(v).strip() for v in present})
    lookup = {name: i for i, name in enumerate(classes)}
    return [lookup[str(v).strip()] if v is not None and str(v).strip() != "" else -1
            for v in values], classes


class VideoFolderDataset(Dataset):
    """Fixed-size clips from a folder of videos (see the module docstring for every rule).

    Args:
        root: folder with the video files (searched recursively).
        frames, height, width: clip size returned for every item.
        stride: distance between sampled frames (1 = contiguous frames).
        backend: "decord", "av" or "auto" (decord, with PyAV for files decord cannot read).
        train: random clip start when True, centred start when False (can be changed later).
        metadata: path of a metadata .csv/.jsonl; default: root/metadata.csv or root/metadata.jsonl.
        skip_log: file recording unreadable videos (default: a temporary file).
        threads: decoder threads per read (1 suits DataLoader workers; 0 = library default).
    """

    def __init__(
        self,
        root: str | Path,
        frames: int,
        height: int,
        width: int,
        stride: int = 1,
        backend: str = "auto",
        train: bool = True,
        metadata: str | Path | None = None,
        skip_log: str | Path | None = None,
        threads: int = 1,
    ) -> None:
        self.frames = _positive_int("frames", frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        self.stride = _positive_int("stride", stride)
        self.backend = check_backend(backend)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0 = the decoder's default), got {threads!r}")
        self.threads = threads
        self.train = bool(train)
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"video folder {self.root} does not exist; create it and put video "
                                    f"files ({', '.join(VIDEO_EXTENSIONS)}) in it, or point `root` at "
                                    f"the folder that holds them")
        if not self.root.is_dir():
            raise NotADirectoryError(f"video folder {self.root} is a file, not a folder; pass the "
                                     f"folder that holds the videos")
        on_disk = _find_videos(self.root)
        if not on_disk:
            raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {self.root}; "
                                    f"put videos there or point `root` at the folder that holds them")
        self.metadata_path = self._locate_metadata(metadata)
        self.classes: list[str] | None = None
        self.has_labels = False
        self.has_captions = False
        if self.metadata_path is None:
            self.files = on_disk
            self.labels = [-1] * len(on_disk)
            self.captions: list[str] | None = None
        else:
            self._load_metadata(set(on_disk))
        self.num_classes = len(self.classes) if self.classes else max(self.labels) + 1
        self._log = SkipLog(skip_log)
        self._known_bad: set[int] = set()  # per process: files this process already failed on

    def _locate_metadata(self, metadata: str | Path | None) -> Path | None:
        if metadata is not None:
            path = Path(metadata).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"metadata file {path} does not exist; pass an existing "
                                        f"metadata.csv/.jsonl or metadata=None to use {self.root}'s own")
            return path
        found = [self.root / name for name in METADATA_FILES if (self.root / name).is_file()]
        if len(found) > 1:
            raise ValueError(f"both {found[0]} and {found[1]} exist; keep one, or choose one with "
                             f"`metadata=`")
        return found[0] if found else None

    def _load_metadata(self, on_disk: set[str]) -> None:
        rows = _read_metadata(self.metadata_path)
        kept = [r for r in rows if Path(str(r["file_name"])).as_posix() in on_disk]
        missing = len(rows) - len(kept)
        if missing:
            example = next(str(r["file_name"]) for r in rows if Path(str(r["file_name"])).as_posix()
                           not in on_disk)
            warnings.warn(f"{missing} of {len(rows)} files listed in {self.metadata_path} are not video "
                          f"files under {self.root} (e.g. {example!r}); they are left out", stacklevel=3)
        if not kept:
            raise FileNotFoundError(f"none of the files listed in {self.metadata_path} exist under "
                                    f"{self.root}; `file_name` must be the path relative to that folder")
        self.files = [Path(str(r["file_name"])).as_posix() for r in kept]
        self.has_labels = any("label" in r for r in kept)
        self.has_captions = any("caption" in r for r in kept)
        self.labels, self.classes = _parse_labels([r.get("label") for r in kept])
        self.captions = ([str(r.get("caption") or "") for r in kept] if self.has_captions else None)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far, by any process using this dataset."""
        return len(self._log.entries())

    @property
    def skipped_files(self) -> dict[str, str]:
        """Unreadable files met so far (relative path -> reason), by any process."""
        return self._log.entries()

    @property
    def skip_log_path(self) -> Path:
        return self._log.path

    def _pick(self, num_frames: int) -> list[int]:
        span = (self.frames - 1) * self.stride + 1
        max_start = max(num_frames - span, 0)
        if self.train:
            start = int(torch.randint(max_start + 1, (1,)))
        else:
            start = max_start // 2
        return clip_indices(num_frames, self.frames, self.stride, start)

    def load(self, index: int) -> dict:
        """Item `index` without skipping; raises UnreadableVideoError if its file cannot be read."""
        path = self.root / self.files[index]
        frames = read_clip(path, self._pick, backend=self.backend, threads=self.threads)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # [3, T, h, w], 0..255
        video = resize_center_crop(video, self.height, self.width)
        video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0)
        item = {"video": video, "label": torch.tensor(self.labels[index], dtype=torch.int64)}
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item

    def try_load(self, index: int) -> dict | None:
        """Item `index`, or None if its file is unreadable (then logged and warned about once)."""
        if index in self._known_bad:
            return None
        try:
            return self.load(index)
        except UnreadableVideoError as exc:
            self._known_bad.add(index)
            self._log.add(self.files[index], str(exc))
            warnings.warn(f"skipping unreadable video {self.root / self.files[index]}: {exc} "
                          f"({self.num_skipped} unreadable so far; list in {self._log.path})",
                          UnreadableVideoWarning, stacklevel=2)
            return None

    def __getitem__(self, index: int) -> dict:
        """Item `index`, or the next readable one (wrapping around) if its file is unreadable."""
        n = len(self.files)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} videos")
        for offset in range(n):
            item = self.try_load((index + offset) % n)
            if item is not None:
                return item
        raise UnreadableVideoError(f"none of the {n} videos under {self.root} can be decoded (list in "
                                   f"{self._log.path}); check the files and that decord2/av are installed")

    def __repr__(self) -> str:
        return (f"VideoFolderDataset(root={str(self.root)!r}, videos={len(self)}, frames={self.frames}, "
                f"height={self.height}, width={self.width}, stride={self.stride}, "
                f"backend={self.backend!r}, train={self.train})")
