"""Test set-up. Without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; the
variable must be set before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Device on which the Triton kernels run in tests: the GPU when there is one, else the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster on localhost (tests/slurm_cluster.py), started once per
    session. Where SLURM is missing: installed with apt-get only with VSA_TEST_INSTALL_SLURM=1
    (as root; .ci/run sets it), skipped with the reason otherwise."""
    from slurm_cluster import ensure_slurm, start_cluster

    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture
def write_clip():
    """Write a small H.264 mp4 of `frames` flat frames (grey level 40 * i) with PyAV; returns its path."""
    av = pytest.importorskip("av")
    import numpy as np

    def write(path, frames: int = 4, size: int = 16):
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path

    return write
