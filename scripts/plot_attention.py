"""Plot of attention speedup over dense cuDNN SDPA from `bench_attention.py --sweep` results:
vs sequence length (87.5% sparse) and vs sparsity (32K tokens), forward and forward+backward, for
our VSA and FlexAttention (forward: its backward does not compile at 64-wide key blocks on torch 2.11).

    python scripts/plot_attention.py docs/results/attention_sweep_h100.json [--out PNG]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results: dict, out: Path) -> None:
    meta, rows = results["meta"], results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("length", "S", "sequence length (tokens), 87.5% sparse", True),
              ("sparsity", "sparsity", "sparsity (32,768 tokens)", False)]
    series = [("vsa_speedup_fwd", "VSA (ours) forward", "C0", "-o"),
              ("vsa_speedup_fwd_bwd", "VSA (ours) forward+backward", "C0", "--s"),
              ("flex_speedup_fwd", "FlexAttention, same blocks, forward", "C1", "-o")]
    for ax, (axis, key, label, log_x) in zip(axes, panels):
        points = sorted((r for r in rows if r["axis"] == axis), key=lambda r: r[key])
        for field, name, color, style in series:
            xs = [r[key] for r in points if field in r]
            ys = [r[field] for r in points if field in r]
            if xs:
                ax.plot(xs, ys, style, color=color, label=name)
        ideal = [1 / (r["topk"] / r["n_tiles"]) for r in points]
        ax.plot([r[key] for r in points], ideal, ":", color="gray", label="ideal (1 / kept fraction)")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("speedup over dense cuDNN SDPA")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bf16, "
                 f"H12 D128 B1 ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/attention_speedup.png"))
    args = ap.parse_args()
    plot(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
