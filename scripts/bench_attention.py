"""Attention benchmark on a GPU: dense cuDNN / flash SDPA, FlexAttention, our fine stage, our VSA.

Protocol (../shared/BENCHMARKS.md): CUDA-event timing via triton.testing.do_bench (median) after
warm-up, fresh random bf16 inputs, every method on the same inputs in the same process; speedup =
time(dense cuDNN SDPA) / time(method); effective TFLOP/s = FLOPs the method must do / time (sparse:
dense FLOPs x kept fraction; forward 4*B*H*S*S_kv*D, forward+backward 3.5x forward).

    python scripts/bench_attention.py --out docs/results/attention_h100.json

Prints a markdown table last; writes the same rows (plus device, versions, date) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from vsa import TileLayout, block_sparse_attention, video_sparse_attention
from vsa.ops import coarse_stage, transpose_block_lists

SHAPES = [
    # name, B, H, grid (T, H, W), D
    ("1x12x32768x128", 1, 12, (8, 64, 64), 128),
    ("1x24x65536x128", 1, 24, (16, 64, 64), 128),
    ("2x16x16384x64", 2, 16, (16, 32, 32), 64),
    ("ragged 21x30x52 (32760) H12 D128", 1, 12, (21, 30, 52), 128),
]


def bench(fn, grad_inputs=None) -> float:
    """Median ms of fn (forward) or of fn + backward when grad_inputs is given."""
    if grad_inputs is None:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    out = fn()
    g = torch.randn_like(out)

    def step():
        fn().backward(g)

    return triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=grad_inputs, return_mode="median")


def sdpa(backend):
    def run(q, k, v):  # [B, S, H, D] -> SDPA's [B, H, S, D]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return run


def pairwise_selection(B, H, n_tiles, K, device, gen):
    """Random K key tiles per pair of query tiles (one 128-row FlexAttention block = 2 of our tiles),
    so FlexAttention with 128-row query blocks and our 64-row tiles compute exactly the same mask."""
    n_pairs = n_tiles // 2
    scores = torch.rand(B, H, n_pairs, n_tiles, generator=gen, device="cpu").to(device)
    idx = scores.topk(K, dim=-1).indices.sort(-1).values.to(torch.int32)
    return idx, idx.repeat_interleave(2, dim=2).contiguous()


def flex_runner(idx_pairs, S, B, H):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    K = idx_pairs.shape[-1]
    cnt = torch.full(idx_pairs.shape[:3], K, dtype=torch.int32, device=idx_pairs.device)
    empty = torch.zeros_like(cnt)
    mask = BlockMask.from_kv_blocks(empty, torch.zeros_like(idx_pairs[..., :1]), cnt, idx_pairs,
                                    BLOCK_SIZE=(128, 64), seq_lengths=(S, S))
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--sparsity", type=float, default=0.875)
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = []
    for name, B, H, grid, D in shapes:
        layout = TileLayout(grid, device=dev)
        S, n = layout.seq_len, layout.n_tiles
        K = max(1, min(n, math.ceil((1 - args.sparsity) * n)))
        kept = K / n
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        dense_fwd = 4 * B * H * S * S * D
        methods = {
            "SDPA cuDNN (dense)": (sdpa(SDPBackend.CUDNN_ATTENTION), 1.0),
            "SDPA flash (dense)": (sdpa(SDPBackend.FLASH_ATTENTION), 1.0),
        }
        if not layout.is_ragged and n % 2 == 0:
            idx_pairs, idx_tiles = pairwise_selection(B, H, n, K, dev, gen)
            cnt = torch.full(idx_tiles.shape[:3], K, dtype=torch.int32, device=dev)
            methods["FlexAttention, same blocks (q128/kv64)"] = (flex_runner(idx_pairs, S, B, H), kept)
            methods["ours: fine stage, same blocks"] = (
                lambda q, k, v, i=idx_tiles, c=cnt: block_sparse_attention(q, k, v, layout, i, c), kept)
        methods["ours: VSA (coarse + top-k + fine + combine)"] = (
            lambda q, k, v: video_sparse_attention(q, k, v, layout, topk=K), kept)
        base = {}
        for mname, (fn, frac) in methods.items():
            row = dict(shape=name, B=B, H=H, S=S, D=D, grid=list(grid), n_tiles=n, topk=K, method=mname,
                       kept_fraction=frac)
            try:
                fwd = bench(lambda: fn(q, k, v))
                fb = bench(lambda: fn(q, k, v), grad_inputs=[q, k, v])
            except Exception as e:  # a baseline that does not run on this stack is reported, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(name, mname, "ERROR", row["error"], flush=True)
                continue
            if mname.startswith("SDPA cuDNN"):
                base = dict(fwd=fwd, fb=fb)
            row.update(fwd_ms=fwd, fwd_bwd_ms=fb,
                       fwd_tflops=dense_fwd * frac / fwd / 1e9, fwd_bwd_tflops=3.5 * dense_fwd * frac / fb / 1e9,
                       speedup_fwd=base.get("fwd", float("nan")) / fwd,
                       speedup_fwd_bwd=base.get("fb", float("nan")) / fb)
            rows.append(row)
            print(f"{name:36s} {mname:46s} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                  f"x{row['speedup_fwd']:.2f} / x{row['speedup_fwd_bwd']:.2f}", flush=True)
        # Coarse stage alone (pool + scores + top-k) and the transposed lists of the backward.
        with torch.no_grad():
            coarse = bench(lambda: coarse_stage(q, k, v, layout, K, True))
            _, sel = coarse_stage(q, k, v, layout, K, True)
            cnt = torch.full(sel.shape[:3], K, dtype=torch.int32, device=dev)
            transpose = bench(lambda: transpose_block_lists(sel, cnt, n))
        vsa_fwd = next(r["fwd_ms"] for r in rows if r["shape"] == name and r["method"].startswith("ours: VSA"))
        rows.append(dict(shape=name, method="coarse stage (pool + scores + top-k)", fwd_ms=coarse,
                         share_of_vsa_fwd=coarse / vsa_fwd, transpose_lists_ms=transpose))
        print(f"{name:36s} coarse stage {coarse:.3f} ms = {100 * coarse / vsa_fwd:.1f}% of VSA fwd; "
              f"transposed lists {transpose:.3f} ms", flush=True)
        del q, k, v
        torch.cuda.empty_cache()

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.date.today().isoformat(), sparsity=args.sparsity, dtype="bfloat16")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n" + markdown_table(rows, meta))


def markdown_table(rows, meta) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, bf16, "
             f"sparsity {meta['sparsity']}",
             "", "| shape | method | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | speedup vs cuDNN fwd / fwd+bwd |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "fwd_bwd_ms" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f} | "
                         f"{r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x |")
        elif "share_of_vsa_fwd" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['fwd_ms']:.3f} | - | "
                         f"{100 * r['share_of_vsa_fwd']:.1f}% of VSA fwd | transposed lists "
                         f"{r['transpose_lists_ms']:.3f} ms |")
        else:
            lines.append(f"| {r['shape']} | {r['method']} | error: {r['error'][:80]} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
