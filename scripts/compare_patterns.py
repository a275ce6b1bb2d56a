"""Sample one checkpoint (trained with full attention) with several attention patterns from the
same noise and labels; report per pattern the attention time per model evaluation, the whole
sampling time, their speedups over full attention, the drift of the decoded videos (relative L2,
PSNR) against the full-attention videos, and the training validation loss with the pattern.

    python scripts/compare_patterns.py CKPT --patterns full grat_b grat_x sta vsa@0.875 \\
        --tile 4x8x8 --out logs/compare/run1

Pattern specs: name[@sparsity][:key=value]..., e.g. grat_b:radius=2x1x1, grat_x:lines=true,
sta:window=3x5x5, vsa@0.875, vsa:topk=8, grat_b:tile=4x4x4 (a per-pattern tile wins over --tile).
The first `full` spec is the reference (added first when none is listed). Validation data: the
run's .hydra/config.yaml beside <run>/checkpoints/ (or --data-config FILE; --no-val skips it).
What is measured, and how: docs/patterns.md and vsa/sampling/compare/. Writes
compare_patterns.json, compare_patterns.md (the table) and one PNG grid per pattern to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vsa.sampling.compare import compare_patterns


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint of a train.py run (<run>/checkpoints/last.ckpt)")
    parser.add_argument("--patterns", nargs="+", default=["full", "grat_b", "grat_x", "sta"],
                        help="pattern specs (default: full grat_b grat_x sta)")
    parser.add_argument("--tile", default=None,
                        help="tile = group size of every pattern without its own tile=, e.g. 4x8x8 "
                             "(default: the checkpoint's)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-videos", type=int, default=4)
    parser.add_argument("--labels", type=int, nargs="+", default=None, help="class ids, one per video")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--method", default="euler", choices=["euler", "heun"])
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--shift", type=float, default=None, help="default: the checkpoint's recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"],
                        help="auto = bf16 autocast on CUDA, fp32 on the CPU (as sample.py)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed model evaluations first")
    parser.add_argument("--forwards", type=int, default=10, help="timed model evaluations")
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling runs (median)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--data-config", default="auto",
                     help="train config (or its data section) with the validation data "
                          "(default: <run>/.hydra/config.yaml)")
    val.add_argument("--no-val", action="store_true", help="skip the validation loss")
    parser.add_argument("--val-batches", type=int, default=None, help="at most this many batches")
    parser.add_argument("--val-chunk", type=int, default=None,
                        help="split validation batches into chunks of this size (memory only)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        compare_patterns(
            args.ckpt, args.patterns, tile=args.tile, num_videos=args.num_videos, labels=args.labels,
            steps=args.steps, method=args.method, cfg_scale=args.cfg_scale, shift=args.shift,
            seed=args.seed, ema=not args.raw, device=args.device, precision=args.precision,
            warmup=args.warmup, forwards=args.forwards, repeats=args.repeats,
            data_config=None if args.no_val else args.data_config, val_batches=args.val_batches,
            val_chunk=args.val_chunk, out=args.out)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"compare_patterns.py: error: {err}", file=sys.stderr)
        return 2
    print((Path(args.out) / "compare_patterns.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
