"""First run of the Gluon kernels on a Hopper GPU, each case in its own process with a time limit:
a wrong mbarrier phase hangs a kernel instead of failing it, and this says which one hung instead
of losing the whole call.

    python scripts/check_gluon.py                       # every case, 120 s each
    python scripts/check_gluon.py --cases fwd64 bwd128 --timeout 60 --out /tmp/gluon_check.json

Per case: the Gluon kernel(s) and block_sparse.py's Triton kernels on the same bf16 inputs (2 x 3
heads of 32 full tiles, lists of 0 to 6 tiles, outputs poisoned with NaN), the relative error of
each output against the float64 reference and against the Triton kernels, and the median time of
both (triton.testing.do_bench). A table last; rows as JSON with --out. The pytest equivalents are
in tests/test_ops_gpu.py (-k gluon).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vsa.benchmark import run_meta, write_results  # noqa: E402

# name: (head dim, forward only?, overlapped forward?)
CASES = {
    "fwd64": (64, True, False), "fwd128": (128, True, False),
    "fwd64_overlap": (64, True, True), "fwd128_overlap": (128, True, True),
    "bwd64": (64, False, False), "bwd128": (128, False, False),
}


def run_case(name: str) -> dict:
    """Run one case here (the child process) and return its row."""
    import triton

    from vsa import TileLayout
    from vsa.benchmark import rel_err
    from vsa.ops import gluon_hopper, kernel_options
    from vsa.ops.block_sparse import bsa_backward, bsa_forward
    from vsa.ops.reference import block_sparse_attention_reference_grads

    D, forward_only, overlap = CASES[name]
    if not torch.cuda.is_available():
        return {"case": name, "status": "no GPU", "why_not": "not on a CUDA GPU"}
    layout = TileLayout((8, 16, 16), device="cuda")
    B, H, n, K = 2, 3, layout.n_tiles, 6
    gen = torch.Generator(device="cuda").manual_seed(D)
    q, k, v, do = (torch.randn(B, layout.seq_len, H, D, device="cuda", generator=gen).bfloat16() for _ in range(4))
    idx = torch.rand(B, H, n, n, device="cuda", generator=gen).topk(K, dim=-1).indices.int()
    cnt = torch.randint(0, K + 1, (B, H, n), device="cuda", dtype=torch.int32, generator=gen)
    args = (q, k, v, layout.offsets, layout.offsets, idx, cnt, layout.max_tile_size, layout.max_tile_size)
    why = gluon_hopper.why_not(*args[:5], *args[7:], do=do)
    if why:
        return {"case": name, "status": "not taken", "why_not": why}
    row = {"case": name, "head_dim": D, "device": torch.cuda.get_device_name()}
    options = dict(gluon_fwd=True, gluon_bwd=not forward_only, gluon_overlap=overlap)

    def poison():
        blob = torch.empty(256 << 20, dtype=torch.float32, device="cuda")
        blob.fill_(float("nan"))
        del blob

    o_t, lse_t, _ = bsa_forward(*args)
    grads_t = bsa_backward(do, *args[:3], o_t, lse_t, *args[3:])
    poison()
    with kernel_options(**options):
        o_g, lse_g, _ = bsa_forward(*args)
        grads_g = bsa_backward(do, *args[:3], o_g, lse_g, *args[3:])
    torch.cuda.synchronize()
    ref = block_sparse_attention_reference_grads(*(x.double() for x in (q, k, v)), layout, idx, cnt, do.double())
    names = ["o", "dq", "dk", "dv"]
    outs_g, outs_t = [o_g, *grads_g], [o_t, *grads_t]
    for key, g, t, r in zip(names, outs_g, outs_t, ref):
        if forward_only and key != "o":
            continue
        row[f"{key}_vs_reference"] = rel_err(g, r)
        row[f"{key}_vs_triton"] = rel_err(g, t.double())
    finite = torch.isfinite(lse_t)
    row["lse_max_abs_diff"] = float((lse_g[finite] - lse_t[finite]).abs().max())
    row["lse_empty_rows_match"] = bool(torch.equal(torch.isneginf(lse_g), torch.isneginf(lse_t)))

    def time_it(gluon: bool) -> float:
        def step():
            o, lse, _ = bsa_forward(*args)
            if not forward_only:
                bsa_backward(do, *args[:3], o, lse, *args[3:])
        with kernel_options(**(options if gluon else {})):
            return triton.testing.do_bench(step, warmup=20, rep=100, return_mode="median")

    row["triton_ms"], row["gluon_ms"] = time_it(False), time_it(True)
    errors = [v for key, v in row.items() if key.endswith("_vs_reference")]
    row["status"] = "ok" if max(errors) < 1e-2 and row["lse_empty_rows_match"] else "wrong"
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case (compilation included)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child process's one case
    args = ap.parse_args(argv)
    if args.case:
        print("ROW " + json.dumps(run_case(args.case)), flush=True)
        return []
    rows = []
    for name in args.cases:
        try:
            child = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                                   timeout=args.timeout)
            lines = [x for x in child.stdout.splitlines() if x.startswith("ROW ")]
            row = json.loads(lines[-1][4:]) if lines else {
                "case": name, "status": "error", "error": (child.stderr or child.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"case": name, "status": "hang", "error": f"no result within {args.timeout:.0f} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| case | status | o / dq / dk / dv vs float64 | vs Triton | Triton ms | Gluon ms |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        ref = " / ".join(f"{r[k]:.1e}" for k in ("o_vs_reference", "dq_vs_reference", "dk_vs_reference",
                                                   "dv_vs_reference") if k in r)
        tri = " / ".join(f"{r[k]:.1e}" for k in ("o_vs_triton", "dq_vs_triton", "dk_vs_triton", "dv_vs_triton")
                         if k in r)
        times = (f"{r['triton_ms']:.3f} | {r['gluon_ms']:.3f}" if "gluon_ms" in r else " | ")
        print(f"| {r['case']} | {r['status']} | {ref} | {tri} | {times} |")
    if args.out:
        meta = run_meta(cases=args.cases) if torch.cuda.is_available() else {
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "cases": args.cases}
        write_results(str(args.out), meta, rows)
    return rows


if __name__ == "__main__":
    main()
