"""Checkpoint files that are either complete or absent: write beside, fsync, rename.

Lightning's `TorchCheckpointIO` (2.6) saves through an fsspec transaction: for a local path the
bytes go to a temporary file from `tempfile.mkstemp()` (the system temp folder) and are then
`shutil.move`d over the target. When the system temp folder and the run folder are on different
file systems (node-local /tmp, run folder on a shared file system: the usual cluster set-up) that
move is a copy followed by a delete, so a job killed mid-copy leaves a truncated `last.ckpt`; and
nothing is fsynced, so a node crash can lose a checkpoint that was already "renamed".

`AtomicCheckpointIO` writes to a hidden temporary file in the checkpoint's own folder, fsyncs it,
`os.replace`s it over the target (atomic on POSIX within one file system) and fsyncs the folder.
Remote paths (s3://, gs://, ...) keep Lightning's behaviour, where the object store's upload is
the atomic step.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vsa.config import RunStopped


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` such that `path` is never seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise RunStopped(f"no space left to write {path} ({exc.strerror}); {kept}. Free some space (or "
                         "move the run folder: paths.log_dir=...) and relaunch the same command to "
                         "resume") from exc
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)
    remove_partial_writes(path)
    return path


def remove_partial_writes(path: Path) -> list[Path]:
    """Delete the temporary files of writes of `path` whose process is gone (killed mid-write,
    e.g. by SIGKILL or a lost node); returns them. A live writer's file is left alone."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".")[0])
            os.kill(pid, 0)  # raises when no such process
            continue
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):  # not our name pattern / another user's process
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with same-folder temp file + fsync + rename for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)
