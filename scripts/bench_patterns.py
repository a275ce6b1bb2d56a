"""Static-pattern benchmark on a GPU: GRAT-B and GRAT-X on our block-sparse kernel, against
FlexAttention with the same mask and dense SDPA (cuDNN, flash), at 32x48x80 = 122,880 tokens, H24 D128,
tiles (groups) of 4x8x8 = 256 tokens, bf16, forward and forward+backward.

Protocol (docs/benchmarks.md): CUDA-event timing via triton.testing.do_bench (median) after
warm-up, fresh random inputs, every method on the same inputs in the same process; speedup =
time(dense cuDNN SDPA) / time(method); effective TFLOP/s = FLOPs the method must do / time (sparse:
dense FLOPs x kept fraction; forward 4*B*H*S*S*D, forward+backward 3.5x forward). "ours" is the whole
backend call (cached map lookup + kernel); building the map is timed separately (cold, after clearing
the caches), next to building FlexAttention's BlockMask from the same map.

    python scripts/bench_patterns.py --out docs/results/patterns_h100.json
    python scripts/bench_patterns.py --patterns grat_b,grat_x,grat_x_lines,sta --flex-block 256

Prints a markdown table last; writes the same rows (plus device, versions, date) as JSON to --out.
The helpers that build FlexAttention's mask are CPU-only and unit-tested (tests/test_patterns.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from vsa import TileLayout
from vsa.attention import AttentionContext, build_backend
from vsa.benchmark import bench, rel_err, run_meta, sdpa, write_results
from vsa.ops import patterns

GRID = (32, 48, 80)
TILE = (4, 8, 8)
BATCH, HEADS, HEAD_DIM = 1, 24, 128

# name in the table -> (backend / pattern name, options)
PATTERNS = {
    "grat_b": ("GRAT-B 3x3x3", "grat_b", {"radius": (1, 1, 1)}),
    "grat_x": ("GRAT-X planes", "grat_x", {"lines": False}),
    "grat_x_lines": ("GRAT-X lines", "grat_x", {"lines": True}),
    "sta": ("STA 3x3x3", "sta", {"window": (3, 3, 3)}),
}


# --------------------------------------------------------------------------------------------------
# FlexAttention with the same mask (CPU-testable helpers)
# --------------------------------------------------------------------------------------------------


def flex_kv_blocks(keep: torch.Tensor, tile_tokens: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our tile map as FlexAttention key blocks. `keep` [n_tiles, n_tiles] bool is the tile map of a
    layout with full tiles of `tile_tokens` tokens each (tile-major order: tile i = tokens
    i*tile_tokens ...); `block` must divide `tile_tokens` (each tile = tile_tokens / block blocks).

    Returns (num [1, 1, n_blocks] int32, idx [1, 1, n_blocks, n_blocks] int32): per query block the
    kept key blocks first (ascending), then the rest, as BlockMask.from_kv_blocks wants (it reads the
    number of key blocks off the index width)."""
    if tile_tokens % block:
        raise ValueError(f"FlexAttention block {block} must divide the tile's {tile_tokens} tokens")
    per_tile = tile_tokens // block
    blocks = keep.repeat_interleave(per_tile, dim=0).repeat_interleave(per_tile, dim=1)
    num = blocks.sum(dim=-1, dtype=torch.int32)
    idx = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return num[None, None], idx[None, None]


def flex_block_mask(keep: torch.Tensor, tile_tokens: int, block: int, seq_len: int):
    """A BlockMask computing exactly our tile map: every kept block is a FULL block (the compiled
    kernel skips mask_mod there), and mask_mod states the same mask token by token (what FlexAttention's
    eager reference path applies; it ignores the block structure)."""
    from torch.nn.attention.flex_attention import BlockMask

    if keep.shape[0] * tile_tokens != seq_len:
        raise ValueError(f"{keep.shape[0]} tiles of {tile_tokens} tokens != {seq_len} tokens: "
                         "FlexAttention's mask here needs full tiles")
    num, idx = flex_kv_blocks(keep, tile_tokens, block)

    def same_tiles(b, h, q_idx, kv_idx):
        return keep[q_idx // tile_tokens, kv_idx // tile_tokens]

    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=block,
                                    mask_mod=same_tiles, seq_lengths=(seq_len, seq_len))


# FlexAttention's backward sometimes fails to compile with its default tiles on a given stack:
# main() moves on to the next option set ({} = defaults) when one fails.
FLEX_OPTIONS = [{}, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64,
                     "BLOCK_N2": 32}]


def flex_runner(mask):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):  # [B, S, H, D] -> flex's [B, H, S, D] and back
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                     kernel_options=run.kernel_options or None)
        return o.transpose(1, 2)

    run.kernel_options = {}
    return run


# --------------------------------------------------------------------------------------------------
# Map building
# --------------------------------------------------------------------------------------------------


def time_map_build(name: str, options: dict, layout: TileLayout, keep_block: int, reps: int = 5) -> dict:
    """Cold build of our map (incl. the [B, H, n, K] copy the kernel reads) and, for comparison, of
    FlexAttention's BlockMask from it; plus the warm (cached) lookup a backend call pays."""
    def synced(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3

    cold = []
    for _ in range(reps):
        patterns.clear_cache()  # the maps and their [B, H, n, K] copies
        _, ms = synced(lambda: patterns.batched_map(name, layout, BATCH, HEADS, **options))
        cold.append(ms)
    warm = []
    for _ in range(20):
        _, ms = synced(lambda: patterns.batched_map(name, layout, BATCH, HEADS, **options))
        warm.append(ms)
    idx, cnt = patterns.build_map(name, layout, **options)
    flex_ms = []
    for _ in range(reps):
        _, ms = synced(lambda: flex_block_mask(patterns.tile_mask(idx, cnt, layout.n_tiles),
                                               layout.tile_volume, keep_block, layout.seq_len))
        flex_ms.append(ms)
    return dict(map_build_ms=statistics.median(cold), map_lookup_us=1e3 * statistics.median(warm),
                flex_block_mask_ms=statistics.median(flex_ms), K_max=int(idx.shape[1]))


def alternate(ours, flex, inputs, rounds: int) -> dict:
    """Time ours and FlexAttention alternately, forward then forward+backward, `rounds` times: clock
    and thermal drift during a run then hit both alike (single runs of the same code spread ~5%).
    The ratio reported is the median of the per-round ratios FlexAttention time / ours."""
    pairs = {"fwd": [], "fwd_bwd": []}
    for _ in range(rounds):
        for key, grads in (("fwd", None), ("fwd_bwd", list(inputs))):
            pairs[key].append([bench(lambda fn=fn: fn(*inputs), grad_inputs=grads) for fn in (ours, flex)])
    row = {}
    for key, times in pairs.items():
        ratios = sorted(theirs / mine for mine, theirs in times)
        row.update({f"rounds_{key}_ms": times, f"ratio_{key}_median": statistics.median(ratios),
                    f"ratio_{key}_min": ratios[0], f"ratio_{key}_max": ratios[-1]})
        print(f"  round ratios {key}: " + ", ".join(f"{r:.3f}" for r in ratios), flush=True)
    return row


def accuracy_row(label, name, options, layout, dev) -> dict:
    """bf16 forward + gradients of our pattern at H=1 vs the float64 reference (chunked)."""
    from vsa.ops.reference import block_sparse_attention_reference_grads

    backend = build_backend(name, HEAD_DIM, 1, HEAD_DIM, **options)
    q, k, v = (torch.randn(1, layout.seq_len, 1, HEAD_DIM, device=dev).bfloat16() for _ in range(3))
    do = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = backend(*leaves, AttentionContext(layout))
    out.backward(do)
    idx, cnt = patterns.build_map(name, layout, **options)
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx[None, None],
                                                 cnt[None, None], do.double())
    errs = [rel_err(x, r) for x, r in zip([out, *(x.grad for x in leaves)], ref)]
    print(f"{label:16s} bf16 vs float64 (H1) rel err o/dq/dk/dv: " + " / ".join(f"{e:.2e}" for e in errs),
          flush=True)
    return dict(pattern=label, method="accuracy: ours bf16 vs float64 (B1 H1)", rel_err_out=errs[0],
                rel_err_dq=errs[1], rel_err_dk=errs[2], rel_err_dv=errs[3])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main():
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--patterns", default="grat_b,grat_x", help=f"comma-separated, from {list(PATTERNS)}")
    ap.add_argument("--flex-block", type=int, default=128, help="FlexAttention block size (divides 256)")
    ap.add_argument("--no-flash", action="store_true", help="skip the dense flash SDPA baseline")
    ap.add_argument("--no-check", action="store_true", help="skip the bf16-vs-float64 accuracy rows")
    ap.add_argument("--device", default="cuda", help="CUDA device (e.g. cuda:1)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating ours/FlexAttention timing rounds for the ratio (1: the single run)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    chosen = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in chosen:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r}; choose from {list(PATTERNS)}")

    dev = torch.device(args.device)
    torch.manual_seed(0)
    layout = TileLayout(GRID, TILE, device=dev)
    S, n = layout.seq_len, layout.n_tiles
    q, k, v = (torch.randn(BATCH, S, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    dense_fwd = 4 * BATCH * HEADS * S * S * HEAD_DIM
    shape = f"{BATCH}x{HEADS}x{S}x{HEAD_DIM} grid {'x'.join(map(str, GRID))} tile {'x'.join(map(str, TILE))}"
    rows, base = [], {}

    def timed(label, method, fn, kept):
        row = dict(pattern=label, method=method, B=BATCH, H=HEADS, S=S, D=HEAD_DIM, kept_fraction=kept)
        try:
            fwd = row["fwd_ms"] = bench(lambda: fn(q, k, v))
            options = getattr(fn, "options_to_try", [None])
            for i, attempt in enumerate(options):
                if attempt is not None:
                    fn.kernel_options = attempt
                    row["kernel_options"] = attempt
                try:
                    fb = bench(lambda: fn(q, k, v), grad_inputs=[q, k, v])
                    break
                except Exception as e:  # noqa: BLE001 - next kernel options
                    if i == len(options) - 1:
                        raise
                    print(f"{label} {method}: retrying backward with other kernel options "
                          f"({type(e).__name__})", flush=True)
        except Exception as e:  # noqa: BLE001 - a baseline that fails on this stack is reported
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{label:16s} {method:40s} ERROR {row['error']}", flush=True)
            rows.append(row)
            return row
        if method.startswith("SDPA cuDNN"):
            base.update(fwd=fwd, fb=fb)
        row.update(fwd_ms=fwd, fwd_bwd_ms=fb, fwd_tflops=dense_fwd * kept / fwd / 1e9,
                   fwd_bwd_tflops=3.5 * dense_fwd * kept / fb / 1e9,
                   speedup_fwd=base.get("fwd", math.nan) / fwd,
                   speedup_fwd_bwd=base.get("fb", math.nan) / fb)
        rows.append(row)
        print(f"{label:16s} {method:40s} fwd {fwd:9.3f} ms  fwd+bwd {fb:9.3f} ms  "
              f"x{row['speedup_fwd']:.2f} / x{row['speedup_fwd_bwd']:.2f} vs cuDNN", flush=True)
        return row

    timed("dense", "SDPA cuDNN (dense)", sdpa(SDPBackend.CUDNN_ATTENTION), 1.0)
    if not args.no_flash:
        timed("dense", "SDPA flash (dense)", sdpa(SDPBackend.FLASH_ATTENTION), 1.0)

    for key in chosen:
        label, name, options = PATTERNS[key]
        idx, cnt = patterns.build_map(name, layout, **options)
        kept = patterns.kept_fraction(idx, cnt, n)
        build = time_map_build(name, options, layout, args.flex_block)
        rows.append(dict(pattern=label, method="map build", kept_fraction=kept, **build))
        print(f"{label:16s} kept {100 * kept:.2f}% (K_max {build['K_max']}): map build "
              f"{build['map_build_ms']:.2f} ms cold, {build['map_lookup_us']:.1f} us cached; FlexAttention "
              f"BlockMask {build['flex_block_mask_ms']:.2f} ms", flush=True)

        backend = build_backend(name, HEADS * HEAD_DIM, HEADS, HEAD_DIM, **options)
        ctx = AttentionContext(layout)
        ours = timed(label, "ours (map lookup + kernel)", lambda q, k, v: backend(q, k, v, ctx), kept)

        mask = flex_block_mask(patterns.tile_mask(idx, cnt, n), layout.tile_volume, args.flex_block, S)
        flex = flex_runner(mask)
        flex.options_to_try = FLEX_OPTIONS
        method = f"FlexAttention, same mask ({args.flex_block}x{args.flex_block} blocks)"
        theirs = timed(label, method, flex, kept)
        for key in ("fwd", "fwd_bwd"):  # how much faster ours is, where both ran
            if f"{key}_ms" in ours and f"{key}_ms" in theirs:
                ours[f"vs_flex_{key}"] = theirs[f"{key}_ms"] / ours[f"{key}_ms"]
        if args.rounds > 1 and "fwd_bwd_ms" in ours and "fwd_bwd_ms" in theirs:
            rounds = alternate(lambda q, k, v: backend(q, k, v, ctx), flex, (q, k, v), args.rounds)
            rounds.update(pattern=label, method=f"ours / FlexAttention, {args.rounds} alternating rounds")
            rows.append(rounds)
            for key in ("fwd", "fwd_bwd"):
                ours[f"vs_flex_{key}"] = rounds[f"ratio_{key}_median"]
        if "fwd_ms" in theirs:  # FlexAttention's forward ran: both must compute the same
            with torch.no_grad():
                diff = rel_err(backend(q, k, v, ctx), flex(q, k, v))
            rows.append(dict(pattern=label, method="check: ours vs FlexAttention output (bf16)", rel_diff=diff))
            faster = ", ".join(f"x{ours[f'vs_flex_{key}']:.2f} {key.replace('_', '+')}"
                               for key in ("fwd", "fwd_bwd") if f"vs_flex_{key}" in ours)
            print(f"{label:16s} ours vs FlexAttention: rel diff {diff:.2e}; ours faster by {faster}", flush=True)
        if not args.no_check:
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
            rows.append(accuracy_row(label, name, options, layout, dev))
            torch.cuda.empty_cache()

    meta = run_meta(dev, cudnn=torch.backends.cudnn.version(), dtype="bfloat16", shape=shape,
                    grid=list(GRID), tile=list(TILE), B=BATCH, H=HEADS, D=HEAD_DIM,
                    flex_block=args.flex_block)
    write_results(args.out, meta, rows)
    print("\n" + markdown_table(rows, meta))


def markdown_table(rows, meta) -> str:
    """The rows as a markdown table (timings, map builds, checks)."""
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, "
             f"{meta['dtype']}, {meta['shape']}",
             "",
             "| pattern | method | kept | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd "
             "| speedup vs cuDNN fwd / fwd+bwd | vs FlexAttention fwd / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{100 * r['kept_fraction']:.1f}%" if "kept_fraction" in r else ""
        if "ratio_fwd_median" in r:
            spread = " / ".join(f"{r[f'ratio_{k}_median']:.2f}x (range {r[f'ratio_{k}_min']:.2f}-"
                                f"{r[f'ratio_{k}_max']:.2f})" for k in ("fwd", "fwd_bwd"))
            lines.append(f"| {r['pattern']} | {r['method']} | | | | | | {spread} |")
        elif "fwd_bwd_ms" in r:
            flex = " / ".join(f"{r[key]:.2f}x" if key in r else "-" for key in ("vs_flex_fwd", "vs_flex_fwd_bwd"))
            flex = "" if flex == "- / -" else flex
            lines.append(f"| {r['pattern']} | {r['method']} | {kept} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} "
                         f"| {r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f} "
                         f"| {r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x | {flex} |")
        elif "map_build_ms" in r:
            lines.append(f"| {r['pattern']} | map build (cold) / cached lookup; FlexAttention BlockMask "
                         f"| {kept} | {r['map_build_ms']:.2f} ms / {r['map_lookup_us']:.1f} us; "
                         f"{r['flex_block_mask_ms']:.2f} ms | | | | |")
        elif "rel_err_out" in r:
            lines.append(f"| {r['pattern']} | {r['method']} | | rel err o {r['rel_err_out']:.1e} | dq "
                         f"{r['rel_err_dq']:.1e}, dk {r['rel_err_dk']:.1e}, dv {r['rel_err_dv']:.1e} | | | |")
        elif "rel_diff" in r:
            lines.append(f"| {r['pattern']} | {r['method']} | | rel diff {r['rel_diff']:.1e} | | | | |")
        else:  # a method that failed (possibly after its forward ran)
            fwd = f"{r['fwd_ms']:.2f}" if "fwd_ms" in r else "-"
            lines.append(f"| {r['pattern']} | {r['method']} | {kept} | {fwd} | error: {r.get('error', '')[:80]} "
                         "| | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
