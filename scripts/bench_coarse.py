"""The coarse stage's pieces on a GPU: tile means, the fused coarse-attention + top-K kernel in
several configurations, the transposed lists, and the same maths in plain torch (cuBLAS fp32 GEMMs,
softmax, topk, sort) for comparison.

    python scripts/bench_coarse.py --out docs/results/coarse_h100.json

A variant "precision/block_q/warps/d_chunk[/block_k]" sets the knobs of `_coarse_select_kernel`
(`vsa.ops.KernelOptions`: select_precision, select_block_q, select_warps, select_d_chunk,
select_block_k); a means variant "warps/block" those of `_tile_means_kernel` (means_warps,
means_block). Each variant's output is
checked against the default's: probabilities and O_c (max relative difference) and the selection
(fraction of listed tiles that differ; close scores may swap places at a different rounding).
Times are CUDA-event medians (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import math

import torch

from vsa import TileLayout
from vsa.benchmark import run_meta, write_results
from vsa.ops import KernelOptions, coarse, kernel_options, transpose_block_lists

# name -> (B, H, grid, D); 87.5% sparse (K = n / 8)
SHAPES = {
    "1x12x32768x128": (1, 12, (8, 64, 64), 128),
    "2x16x16384x64": (2, 16, (16, 32, 32), 64),
    "1x12x131072x128": (1, 12, (32, 64, 64), 128),
}
DEFAULT_VARIANTS = ("ieee/32/8/32,tf32x3/32/8/32,tf32x3/32/4/32,tf32x3/16/4/32,tf32x3/8/4/32,"
                    "tf32x3/32/8/64,ieee/16/4/32,ieee/8/4/32")  # the first session's set (coarse_h100.json)


def parse_variant(text: str) -> dict:
    try:
        prec, block_q, warps, d_chunk, *block_k = text.split("/")
        if len(block_k) > 1:
            raise ValueError
        return dict(select_precision=prec, select_block_q=int(block_q), select_warps=int(warps),
                    select_d_chunk=int(d_chunk), select_block_k=int(block_k[0]) if block_k else 32)
    except ValueError:
        raise SystemExit(f"bad variant {text!r}: expected precision/block_q/warps/d_chunk[/block_k]") from None


def parse_means_variant(text: str) -> dict:
    try:
        warps, block = text.split("/")
        return dict(means_warps=int(warps), means_block=int(block))
    except ValueError:
        raise SystemExit(f"bad means variant {text!r}: expected warps/block") from None


def do_bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def torch_coarse(qc, kc, vc, scale, K):
    """The same maths in torch: fp32 cuBLAS GEMMs (TF32 off), softmax, topk, sorted indices."""
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    p = torch.softmax(s, dim=-1)
    o_c = torch.einsum("bhqk,bkhd->bqhd", p, vc)
    idx = s.topk(K, dim=-1, sorted=False).indices.sort(dim=-1).values.int()
    return p, o_c, idx


def run_shape(name, variants, means_variants) -> list[dict]:
    B, H, grid, D = SHAPES[name]
    layout = TileLayout(grid, device="cuda")
    n = layout.n_tiles
    K = max(1, math.ceil(n / 8))
    scale = 1.0 / math.sqrt(D)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device="cuda", generator=gen).bfloat16()
               for _ in range(3))
    rows = []
    means = lambda: coarse.tile_means(q, k, v, layout.offsets, layout.max_tile_size)
    ref_means = None
    for text in means_variants:
        with kernel_options(**parse_means_variant(text)):
            got = means()
            t = do_bench(means)
        ref_means = ref_means or got
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref_means))
        rows.append(dict(shape=name, piece="tile means (q, k, v)", variant=text, ms=t, n_tiles=n,
                         topk=K, max_rel_diff=diff))
        print(f"{name:16s} tile means {text:8s}        {t:7.3f} ms  vs first: {diff:.1e}", flush=True)
    qc, kc, vc = ref_means

    torch.backends.cuda.matmul.allow_tf32 = False
    t = do_bench(lambda: torch_coarse(qc, kc, vc, scale, K))
    rows.append(dict(shape=name, piece="torch: fp32 GEMMs + softmax + topk + sort", ms=t))
    print(f"{name:16s} torch coarse (cuBLAS fp32) {t:7.3f} ms", flush=True)

    ref = None
    for text in variants:
        fn = lambda: coarse.coarse_attention_topk(qc, kc, vc, scale, K)
        try:
            with kernel_options(**parse_variant(text)):
                probs, o_c, idx = fn()
                t = do_bench(fn)
        except Exception as e:  # a configuration that does not compile is reported, not fatal
            rows.append(dict(shape=name, piece="select kernel", variant=text,
                             error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"{name:16s} select {text:18s} failed: {type(e).__name__}", flush=True)
            continue
        if ref is None:
            ref = (probs, o_c, idx)
        row = dict(shape=name, piece="select kernel", variant=text, ms=t,
                   max_rel_diff_probs=((probs - ref[0]).abs().max() / ref[0].abs().max()).item(),
                   max_rel_diff_oc=((o_c - ref[1]).abs().max() / ref[1].abs().max()).item(),
                   selection_diff=(idx != ref[2]).float().mean().item())
        rows.append(row)
        print(f"{name:16s} select {text:18s} {t:7.3f} ms  vs first: probs {row['max_rel_diff_probs']:.1e}"
              f" o_c {row['max_rel_diff_oc']:.1e} selection {row['selection_diff']:.1e}", flush=True)

    idx = ref[2]
    t = do_bench(lambda: transpose_block_lists(idx, None, n))
    rows.append(dict(shape=name, piece="transposed lists", ms=t))
    print(f"{name:16s} transposed lists           {t:7.3f} ms", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated precision/block_q/warps/d_chunk[/block_k] (the first is "
                         "the reference)")
    ap.add_argument("--means-variants", default="4/64",
                    help="comma-separated warps/block of the tile-means kernel (the first is the reference)")
    args = ap.parse_args()
    variants, means_variants = args.variants.split(","), args.means_variants.split(",")
    for text in variants:
        parse_variant(text)
    for text in means_variants:
        try:
            KernelOptions(**parse_means_variant(text))
        except ValueError as e:
            raise SystemExit(f"bad means variant {text!r}: {e}") from None
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, variants, means_variants)
    write_results(args.out, run_meta(kind="coarse stage pieces"), rows)
    print("\n| shape | piece | variant | ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['piece']} | {r.get('variant', '')} | {r.get('ms', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
