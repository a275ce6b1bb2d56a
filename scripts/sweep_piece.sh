#!/usr/bin/env bash
# Run a piece of a scaling sweep within a time limit, on a machine that may not keep its files
# (a lent GPU, a preemptible node), keeping every finished run:
#   scripts/sweep_piece.sh SWEEP SECONDS [train.py overrides...]
#   scripts/sweep_piece.sh iso_shapes 500 scaling.attentions=[full,vsa] scaling.multiples=[1,2]
# (ROWS=... and LOG_DIR=... move the rows folder and the logs.)
# Runs `python -m vsa.scaling.piece SWEEP --seconds SECONDS ...`: restores the committed rows
# docs/results/SWEEP/rows (finished runs are skipped), launches one at a time each point left whose
# estimated time (measured step times of the committed rows) fits the time still left, copies
# every finished row back into docs/results/SWEEP/rows, and says what was left for the next piece
# (`python -m vsa.scaling.piece SWEEP --seconds S --dry-run` lists what would launch).
# Then it prints every row.
set -uo pipefail
cd "$(dirname "$0")/.."
sweep=${1:?usage: scripts/sweep_piece.sh SWEEP SECONDS [overrides...]}
seconds=${2:?usage: scripts/sweep_piece.sh SWEEP SECONDS [overrides...]}
shift 2
python=${PYTHON:-python}
rows=${ROWS:-docs/results/$sweep/rows}          # where the finished rows are kept
log_dir=${LOG_DIR:-logs}
$python -m vsa.scaling.piece "$sweep" --seconds "$seconds" --rows "$rows" --log-dir "$log_dir" "$@" || exit 1
$python - "$rows" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/*.json")]
for r in sorted(rows, key=lambda r: (r["attention"], str(r.get("sparsity")), r["params"], r["budget"], r.get("seed", 0))):
    step = r.get("step_time_s")
    print(f"{r['preset']:>4} {r['attention']:>4} {r.get('sparsity') or '':>5} {r['budget']:.2e} seed {r.get('seed', 0)} "
          f"steps {r['steps']:5d} val {r['val_loss']:.4f} +- {r.get('val_loss_se') or 0:.4f} "
          f"step {'-' if step is None else f'{1e3 * step:.0f}ms'} {r.get('compile', 'eager')}")
PY
exit 0
