"""Block shapes and tile-load paths on a GPU: time the fine stage's kernels for several (rows per
program, rows per walked unit) caps of the dQ and dK/dV kernels (`dq_blocks`, `dkv_blocks` of
`vsa.ops.KernelOptions`; optionally the forward's `fwd_blocks`) and load paths (`tma`), then
check each choice's bf16 output and gradients against the float64 reference.

    python scripts/bench_blocks.py --out docs/results/blocks_h100.json
    python scripts/bench_blocks.py --variants 64x64/64x64,128x64/128x32 --shapes grat_b
    python scripts/bench_blocks.py --per-config fwd,dkv --shapes grat_b --out configs.json
    python scripts/bench_blocks.py --variants 64x64/64x64 --loads tma,pointer --out loads.json

A variant "AxB/CxD" sets dq_blocks = (A, B) (query rows per program, key rows per unit) and
dkv_blocks = (C, D) (key rows per program, query rows per unit); "AxB/CxD/ExF" also fwd_blocks =
(E, F) (the forward's query rows per program, key rows per unit); caps above a tile's size (rounded
up to a power of two) have no effect. `--loads` runs every variant with each way of loading the
walked tiles (`tma`: tma, pointer, or auto). Timings first (the autotuner's
key has no sequence length, so the first call of a key picks its config: it must be the benchmark
shape), then accuracy. Times are CUDA-event medians of forward+backward (triton.testing.do_bench);
with one load mode and forward cap the forward is the same in every variant.

--per-config KERNELS times every autotuner configuration (UNITS x warps x stages) of the named
kernels (fwd, dq, dkv) one at a time at the default block caps, the other kernels keeping the
autotuner's pick: the forward alone for fwd, forward+backward for dq and dkv. It shows how far the
autotuner's pick is from the best configuration and what the others cost.
"""

from __future__ import annotations

import argparse

import torch

from vsa import TileLayout, block_sparse_attention
from vsa.benchmark import bench, rel_err, run_meta, write_results
from vsa.ops import KernelOptions, kernel_options, patterns, resolve_topk
from vsa.ops import block_sparse as bs
from vsa.ops.reference import block_sparse_attention_reference_grads

# name -> (B, H, grid, tile, D, pattern or sparsity)
SHAPES = {
    "grat_b": (1, 24, (32, 48, 80), (4, 8, 8), 128, "grat_b"),
    "vsa_d128": (1, 12, (8, 64, 64), (4, 4, 4), 128, 0.875),
    "vsa_d64": (2, 16, (16, 32, 32), (4, 4, 4), 64, 0.875),
}
# Small layouts with the same tile shape for the accuracy check, in full tiles: their kernels share
# the benchmark's autotuner keys (ragged grids would tune every variant again; the CPU tests in
# tests/test_ops.py cover ragged tiles with these block caps).
CHECK_GRIDS = {(4, 8, 8): [(8, 16, 16)], (4, 4, 4): [(8, 16, 16)]}


def parse_variant(text: str) -> tuple[tuple[int, int], ...]:
    """'AxB/CxD[/ExF]' -> (dq_blocks, dkv_blocks, fwd_blocks); without /ExF the forward keeps its
    default caps."""
    try:
        parts = [tuple(int(x) for x in part.split("x")) for part in text.split("/")]
        if len(parts) not in (2, 3) or any(len(p) != 2 for p in parts):
            raise ValueError
    except ValueError:
        raise SystemExit(f"bad variant {text!r}: expected e.g. 128x64/64x32 or 64x64/64x64/128x128") from None
    return (*parts, KernelOptions().fwd_blocks) if len(parts) == 2 else tuple(parts)


def selection(layout, H, B, how, gen):
    n = layout.n_tiles
    if isinstance(how, str):
        idx, cnt = patterns.build_map(how, layout)
        return (idx.expand(B, H, *idx.shape).contiguous(), cnt.expand(B, H, n).contiguous())
    K = resolve_topk(n, sparsity=how)  # as the VSA op and bench_attention.py: ceil((1 - s) * n)
    idx = torch.rand(B, H, n, n, generator=gen, device=layout.device).topk(K, dim=-1).indices
    return idx.sort(-1).values.int(), torch.full((B, H, n), K, dtype=torch.int32, device=layout.device)


def shape_call(name):
    """The fine stage at benchmark shape `name` on fresh bf16 inputs: (fn, [q, k, v]), fn() -> O."""
    B, H, grid, tile, D, how = SHAPES[name]
    layout = TileLayout(grid, tile, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", generator=gen).bfloat16()
               .requires_grad_() for _ in range(3))
    idx, cnt = selection(layout, H, B, how, gen)
    return (lambda: block_sparse_attention(q, k, v, layout, idx, cnt)), [q, k, v]


LOADS = {"auto": None, "tma": True, "pointer": False}


def variant_options(variant):
    """The kernel options of a variant ((dq, dkv, fwd) caps, load path), as a context manager."""
    (dq, dkv, fwd), load = variant
    return kernel_options(dq_blocks=dq, dkv_blocks=dkv, fwd_blocks=fwd, tma=LOADS[load])


def time_shape(name, variants) -> list[dict]:
    fn, (q, k, v) = shape_call(name)
    rows = []
    for text, variant in variants:
        with variant_options(variant):
            fwd = bench(fn)
            fb = bench(fn, grad_inputs=[q, k, v])
        rows.append(dict(shape=name, variant=text, fwd_ms=fwd, fwd_bwd_ms=fb, bwd_ms=fb - fwd))
        print(f"{name:9s} {text:14s} fwd {fwd:7.3f} ms  fwd+bwd {fb:7.3f} ms  bwd {fb - fwd:7.3f} ms",
              flush=True)
    return rows


def check_shape(name, variants) -> list[dict]:
    _, _, _, tile, D, how = SHAPES[name]
    rows = []
    for grid in CHECK_GRIDS[tile]:
        layout = TileLayout(grid, tile, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(1)
        B, H = 2, 2
        q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", generator=gen) * s
                   for s in (8.0, 8.0, 1.0))
        q, k, v = (x.bfloat16() for x in (q, k, v))
        do = torch.randn_like(q)
        idx, cnt = selection(layout, H, B, how if isinstance(how, str) else 0.75, gen)
        ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx,
                                                     cnt, do.double())
        for text, variant in variants:
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            with variant_options(variant):
                out = block_sparse_attention(qg, kg, vg, layout, idx, cnt)
                out.backward(do)
            errs = [rel_err(x, r) for x, r in zip((out, qg.grad, kg.grad, vg.grad), ref)]
            rows.append(dict(shape=name, grid=list(grid), variant=text,
                             **{f"rel_err_{n}": e for n, e in zip(("out", "dq", "dk", "dv"), errs)}))
            print(f"check {name:9s} {str(grid):14s} {text:14s} rel err o/dq/dk/dv "
                  + " / ".join(f"{e:.2e}" for e in errs), flush=True)
    return rows


KERNELS = {"fwd": "_fwd_kernel", "dq": "_dq_kernel", "dkv": "_dkv_kernel"}


def per_config(name, kernels) -> list[dict]:
    """Every configuration of each kernel in `kernels`, pinned one at a time (see the docstring)."""
    fn, (q, k, v) = shape_call(name)
    fn().backward(torch.randn_like(q))  # every kernel autotunes at this shape
    rows = []
    for kname in kernels:
        kernel = getattr(bs, KERNELS[kname]).tuner("full")  # bench() refuses other search spaces
        configs, cache = kernel.configs, dict(kernel.cache)
        picked = {str(c) for c in cache.values()}
        for cfg in configs:
            kernel.configs, kernel.cache = [cfg], {}
            row = dict(shape=name, kernel=kname, config=str(cfg), autotuned=str(cfg) in picked)
            try:
                row["ms"] = bench(fn) if kname == "fwd" else bench(fn, grad_inputs=[q, k, v])
            except Exception as e:  # out of shared memory or registers: reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(f"{name:9s} {kname:4s} {str(cfg):70s} {row.get('ms', float('nan')):8.3f} ms"
                  + ("  <- autotuned" if row["autotuned"] else ""), flush=True)
        kernel.configs, kernel.cache = configs, cache
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="64x64/64x64,128x64/64x64,64x64/128x64,"
                                               "128x64/128x64,128x32/128x32,64x32/64x32")
    parser.add_argument("--shapes", default="grat_b,vsa_d128")
    parser.add_argument("--out", default=None)
    parser.add_argument("--per-config", default=None,
                        help="comma-separated kernels (fwd, dq, dkv): time each autotuner config")
    parser.add_argument("--loads", default="auto", help=f"comma-separated, from {list(LOADS)}")
    args = parser.parse_args()
    loads = args.loads.split(",")
    if any(load not in LOADS for load in loads):
        raise SystemExit(f"--loads takes {list(LOADS)}, got {loads}")
    variants = [(f"{t}/{load}" if len(loads) > 1 else t, (parse_variant(t), load))
                for load in loads for t in args.variants.split(",")]
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if args.per_config:
        kernels = args.per_config.split(",")
        if any(kn not in KERNELS for kn in kernels):
            raise SystemExit(f"--per-config takes kernels from {list(KERNELS)}, got {kernels}")
        rows = [r for n in names for r in per_config(n, kernels)]
        write_results(args.out, run_meta(dtype="bfloat16", kind="per-config"), rows)
        print("\n| shape | kernel | config | ms (fwd: forward; dq/dkv: forward+backward) |\n|---|---|---|---|")
        for r in rows:
            mark = " (autotuned)" if r["autotuned"] else ""
            print(f"| {r['shape']} | {r['kernel']} | {r['config']}{mark} | {r.get('ms', float('nan')):.3f} |")
        return
    rows = [r for n in names for r in time_shape(n, variants)]
    rows += [r for n in names for r in check_shape(n, variants)]
    write_results(args.out, run_meta(dtype="bfloat16"), rows)
    print("\n| shape | variant (dQ rows x unit / dKV rows x unit[/loads]) | fwd ms | fwd+bwd ms | bwd ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "bwd_ms" in r:
            print(f"| {r['shape']} | {r['variant']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                  f"{r['bwd_ms']:.2f} |")
    worst = max(max(r[f"rel_err_{n}"] for n in ("out", "dq", "dk", "dv")) for r in rows if "grid" in r)
    print(f"\nworst bf16 relative error over all checks: {worst:.2e}")


if __name__ == "__main__":
    main()
