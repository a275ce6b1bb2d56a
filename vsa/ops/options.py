"""The kernels' tuning knobs in one object: `KernelOptions`, read when a kernel is launched.

    from vsa.ops import kernel_options
    with kernel_options(tma=False, dq_blocks=(128, 64)):   # pointer loads, 128-row dQ programs
        out = video_sparse_attention(q, k, v, layout, sparsity=0.875)
        out.backward(grad)                                  # the backward launches in the block too

The defaults are the kernels' shipped choices; benchmarks and tests change them only through
`kernel_options(...)` (a context manager) or `set_kernel_options(...)` (for a whole script). The
options in force are process-wide, like `torch.backends` flags, not per thread: autograd runs the
backward of CUDA ops on its own threads, and they must see the same options as the forward. The
launch wrappers pass every choice to the Triton kernels as constexprs or launch parameters, so
each choice compiles (and autotunes) once, as it did when these were module constants.

`autotune` None reads the environment variable VSA_AUTOTUNE ("full" when unset) each time the
options are resolved, so it can be set after import (tests do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

AUTOTUNE_SPACES = ("full", "quick")
SELECT_PRECISIONS = ("tf32x3", "ieee")


def _power_of_two(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and not value & (value - 1)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Tuning knobs of the Triton kernels (none changes the maths, only speed and rounding).

    Fine stage (`block_sparse.py`):
        tma: load the walked tiles through TMA tensor descriptors. None: on GPUs of compute
            capability >= 9 (Hopper), never in the interpreter; True / False force it (the CPU
            tests force it on: the interpreter runs the same kernel code).
        fwd_blocks, dq_blocks, dkv_blocks: row caps (rows per program, rows per walked unit) of the
            forward, dQ and dK/dV kernels; powers of two >= 16. `scripts/bench_blocks.py` measures
            them (docs/history/kernel_notes.md, v6 and "Backward block shapes").
        interpreter_units: tile chunks per loop step (1 or 2) when the interpreter runs the kernels
            (on a GPU the autotuner picks); the tests run both.
        gluon_fwd: run the forward with the Gluon kernel for Hopper (`gluon_hopper.py`: warp-specialised
            TMA producer, wgmma consumer) where it applies (compute capability 9.x, bf16/fp16,
            D 64/128, tiles of exactly 64 tokens; `gluon_hopper.why_not`), `block_sparse.py`'s
            kernel elsewhere. Off by default until its GPU checks and timings are in
            (docs/history/kernel_notes.md, "Gluon").
        gluon_bwd: the same for the backward (dQ and dK/dV kernels; the delta and the transposed
            lists as before).
        gluon_stages: the Gluon kernels' walked-tile buffers in flight (1-4); None: 3 at D 64, 2 at
            D 128.
        gluon_overlap: in the Gluon forward, issue the next tile's Q K^T before this tile's softmax
            (FlashAttention-3's intra-warpgroup overlap).
        autotune: the autotuner's search space, "full" (benchmarks, training) or "quick" (GPU test
            runs: UNITS 1 and 2 at 4 warps / 2 stages plus the 1-stage fallback). None: the
            environment variable VSA_AUTOTUNE, "full" when unset.
    Coarse stage (`coarse.py`):
        select_precision: precision of the select kernel's fp32 products, "tf32x3" (three tf32
            tensor-core products, ~fp32) or "ieee" (exact fp32 on the CUDA cores);
            docs/results/coarse_h100.json compares them.
        select_block_q, select_block_k, select_d_chunk, select_warps: the select kernel's query
            tiles per program (at most), key tiles and head dims per product, and warps.
        means_block, means_warps: rows per chunk and warps of the tile-means kernel
            (docs/results/coarse_knobs_h100.json).
    """

    tma: bool | None = None
    fwd_blocks: tuple[int, int] = (128, 64)
    dq_blocks: tuple[int, int] = (64, 64)
    dkv_blocks: tuple[int, int] = (64, 64)
    interpreter_units: int = 2
    gluon_fwd: bool = False
    gluon_bwd: bool = False
    gluon_stages: int | None = None
    gluon_overlap: bool = False
    autotune: str | None = None
    select_precision: str = "tf32x3"
    select_block_q: int = 32
    select_block_k: int = 32
    select_d_chunk: int = 32
    select_warps: int = 4
    means_block: int = 32
    means_warps: int = 2

    def __post_init__(self) -> None:
        if self.tma not in (None, True, False):
            raise TypeError(f"tma must be None (auto), True or False, got {self.tma!r}")
        for name in ("fwd_blocks", "dq_blocks", "dkv_blocks"):
            value = getattr(self, name)
            try:
                pair = tuple(value)
            except TypeError:
                pair = ()
            if len(pair) != 2 or not all(_power_of_two(v) and v >= 16 for v in pair):
                raise ValueError(f"{name} must be 2 powers of two >= 16 (rows per program, rows per "
                                 f"unit), got {value!r}")
            object.__setattr__(self, name, pair)  # lists (e.g. from a config) become hashable
        if self.interpreter_units not in (1, 2) or isinstance(self.interpreter_units, bool):
            raise ValueError(f"interpreter_units must be 1 or 2, got {self.interpreter_units!r}")
        for name in ("gluon_fwd", "gluon_bwd", "gluon_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.gluon_stages is not None and (isinstance(self.gluon_stages, bool)
                                              or self.gluon_stages not in (1, 2, 3, 4)):
            raise ValueError(f"gluon_stages must be None (by head dim) or 1-4, got {self.gluon_stages!r}")
        if self.gluon_overlap and self.gluon_stages == 1:  # the next tile's buffer is this tile's
            raise ValueError("gluon_overlap needs gluon_stages >= 2 (or None): it reads the next tile before "
                             "this one's buffer is free")
        if self.autotune is not None and self.autotune not in AUTOTUNE_SPACES:
            raise ValueError(f"autotune must be None (VSA_AUTOTUNE, else 'full') or one of "
                             f"{AUTOTUNE_SPACES}, got {self.autotune!r}")
        if self.select_precision not in SELECT_PRECISIONS:
            raise ValueError(f"select_precision must be one of {SELECT_PRECISIONS}, got "
                             f"{self.select_precision!r}")
        for name in ("select_block_q", "select_block_k", "select_d_chunk", "select_warps",
                     "means_block", "means_warps"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)!r}")
        if self.select_block_k < 16 or self.select_d_chunk < 16:
            raise ValueError("select_block_k and select_d_chunk must be >= 16 (tl.dot), got "
                             f"{self.select_block_k} and {self.select_d_chunk}")

    def search_space(self) -> str:
        """The autotuner's search space: `autotune`, else VSA_AUTOTUNE (read now), else "full"."""
        if self.autotune is not None:
            return self.autotune
        space = os.environ.get("VSA_AUTOTUNE", "full")
        if space not in AUTOTUNE_SPACES:
            raise ValueError(f"VSA_AUTOTUNE={space!r} is not a search space: unset it or use 'full' "
                             "(benchmarks, training) or 'quick' (GPU test runs)")
        return space


_current = KernelOptions()


def current_kernel_options() -> KernelOptions:
    """The options the next kernel launch uses."""
    return _current


def set_kernel_options(options: KernelOptions | None = None, **changes) -> KernelOptions:
    """Make `options` (default: the current ones) with `changes` applied the options in force from
    now on; returns the previous options (pass them back to restore). For scripts; code that
    changes options for a while uses `kernel_options`."""
    global _current
    previous = _current
    options = options if options is not None else _current
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a KernelOptions, got {type(options).__name__}")
    _current = dataclasses.replace(options, **changes) if changes else options
    return previous


@contextlib.contextmanager
def kernel_options(options: KernelOptions | None = None, **changes) -> Iterator[KernelOptions]:
    """Within the block, launch the kernels with `options` (default: the current ones) with
    `changes` applied, e.g. `kernel_options(tma=False)`; the previous options come back on exit.
    Yields the options in force."""
    previous = set_kernel_options(options, **changes)
    try:
        yield _current
    finally:
        set_kernel_options(previous)
