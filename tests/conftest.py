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
