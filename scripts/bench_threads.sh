#!/usr/bin/env bash
# Wall time of a 10-iteration glyph job with torch's default CPU threads (threads=0) and with
# threads=1, next to 0..3 busy processes (each `while True: pass`), to show oversubscription.
#
#   scripts/bench_threads.sh            # from the repository root, after `make install`
#   BUSY_COUNTS="0 2" scripts/bench_threads.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter itself, not a shim: $! must be the busy process, so that it can be killed.
PY=$(python3 -c 'import sys; print(sys.executable)')
OUT=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$OUT"' EXIT
echo "hardware: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
for busy in ${BUSY_COUNTS:-0 1 2 3}; do
  pids=()
  for _ in $(seq 1 "$busy"); do "$PY" -c 'while True: pass' & pids+=($!); done
  sleep 1
  for threads in 0 1; do
    start=$(date +%s.%N)
    .venv/bin/metarun threads="$threads" iterations=10 eval_every=10 eval.val_tasks=20 eval.tasks=20 \
      wandb.mode=disabled console=false hydra.run.dir="$OUT/busy$busy-threads$threads" >/dev/null 2>&1
    rc=$?
    end=$(date +%s.%N)
    echo "busy processes $busy, threads=$threads: $("$PY" -c "print(f'{$end - $start:.1f}')") s (exit $rc)"
  done
  kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
done
