"""Shared pieces of the GPU benchmark scripts (scripts/bench_*.py), per docs/benchmarks.md:
CUDA-event medians after warm-up, dense SDPA baselines in our [B, S, H, D] layout, relative error,
and the device/version header every results file carries."""

from __future__ import annotations

import datetime
import json
import platform

import torch
import torch.nn.functional as F


def full_autotune() -> str:
    """The kernels' autotuning search space (`KernelOptions.autotune`, else VSA_AUTOTUNE), refusing
    the reduced one of test runs ("quick"): timings taken with it are not the kernels' speed."""
    from vsa.ops import current_kernel_options

    options = current_kernel_options()
    space = options.search_space()
    if space != "full":
        source = f"autotune={options.autotune!r}" if options.autotune else f"VSA_AUTOTUNE={space!r}"
        raise RuntimeError(f"{source} narrows the autotuner to test configurations: unset it for "
                           "benchmarks")
    return space


def bench(fn, grad_inputs=None) -> float:
    """Median ms of fn() (forward, no grad) or of fn() + backward when grad_inputs is given."""
    import triton

    full_autotune()

    if grad_inputs is None:
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    g = torch.randn_like(fn())

    def step():
        fn().backward(g)

    return triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=grad_inputs,
                                   return_mode="median")


def sdpa(backend):
    """Dense SDPA pinned to one backend (e.g. SDPBackend.CUDNN_ATTENTION) on [B, S, H, D] tensors."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)
    return run


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN when x holds a NaN."""
    x, ref = x.double(), ref.double()
    return float("nan") if torch.isnan(x).any() else ((x - ref).norm() / ref.norm()).item()


def autotuned_configs() -> dict:
    """The autotuner's picks so far in the search space in force, per fine-stage kernel and key
    (tiles per step, warps, stages). In the interpreter (no autotuning) only kernels with an
    autotuner are listed."""
    from vsa.ops import block_sparse as bs
    from vsa.ops import current_kernel_options

    space = current_kernel_options().search_space()
    tuners = {name: getattr(bs, name).tuners.get(space)
              for name in ("_fwd_kernel", "_dq_kernel", "_dkv_kernel")}
    return {name: {str(key): str(cfg) for key, cfg in tuner.cache.items()} if tuner is not None else {}
            for name, tuner in tuners.items() if tuner is not None or not bs.interpreting()}


def run_meta(device=None, **extra) -> dict:
    """Device, versions and date of a benchmark run, the autotuner's picks so far (call it after
    the timings), plus the run's own settings."""
    import triton

    return dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.date.today().isoformat(), autotune=full_autotune(),
                autotuned=autotuned_configs(), **extra)


def write_results(path: str | None, meta: dict, rows: list[dict]) -> None:
    """The rows and their header as JSON (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
