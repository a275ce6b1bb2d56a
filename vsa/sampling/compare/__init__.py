"""Comparing attention patterns on one checkpoint (`scripts/compare_patterns.py`).

A checkpoint trained with full attention is sampled with each pattern (full, grat_b, grat_x, sta,
vsa at a sparsity; options and tile per pattern) from the same noise and labels. Per pattern:

- attention time per model evaluation: CUDA events (on the CPU: the wall clock, the backends run
  synchronously) around every block's attention backend, summed over the blocks, averaged over
  `forwards` evaluations of the sampler's velocity (one model call on the CFG batch of 2N videos)
  at t = 0.5, after `warmup` evaluations (Triton autotuning, map building and caching). For full
  attention that is SDPA; for a static pattern the cached map lookup + the block-sparse kernel;
  for VSA the coarse stage, the top-k choice and the fine stage. The whole evaluation is timed in
  a separate loop without the events.
- sampling time: `generate` (every step, guidance included) + decoding to pixels, synchronised,
  the median of `repeats` runs after the warm-up (as `sample.py` times it).
- drift against the reference (the first `full` pattern): relative L2 of the decoded video
  ||x - x_ref|| / ||x_ref||, and PSNR over all videos with pixels clamped to [-1, 1]
  (peak-to-peak 2: PSNR = 10 log10(4 / MSE)); identical videos have relative L2 0 and PSNR inf.
- validation loss: the fixed flow-matching protocol of training (`vsa.diffusion.validation`: the
  checkpoint's n_t and seed, seed + batch index per batch, mean weighted by batch size, as
  `val/loss`) on the validation split of the data the checkpoint was trained on.

Each pattern runs on a freshly loaded copy of the weights, so a backend swapped in for one
pattern never leaks into the next. Everything runs under the precision of `sample.py` (bf16
autocast on CUDA, fp32 on the CPU, unless `precision` says otherwise).

The package, by job: `patterns` (applying pattern specs to a model; the specs themselves are
`vsa.attention.spec`), `timing` (attention and evaluation times), `quality` (validation loss,
video drift), `report` (markdown) and `run` (`compare_patterns`, the whole comparison). The
validation batches come from `vsa.training.validation_data`.
"""

from vsa.attention.spec import PatternSpec, parse_pattern, parse_tile
from vsa.checkpoint import find_data_config
from vsa.sampling.compare.patterns import backend_options, check_patterns, configure, kept_fraction
from vsa.sampling.compare.quality import protocol_loss, video_drift
from vsa.sampling.compare.report import markdown_report
from vsa.sampling.compare.run import compare_patterns
from vsa.sampling.compare.timing import AttentionTimer, Clock, time_evaluations
from vsa.training.validation_data import validation_batches

__all__ = ["AttentionTimer", "Clock", "PatternSpec", "backend_options", "check_patterns",
           "compare_patterns", "configure", "find_data_config", "kept_fraction", "markdown_report",
           "parse_pattern", "parse_tile", "protocol_loss", "time_evaluations", "validation_batches",
           "video_drift"]
