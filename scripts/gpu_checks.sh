#!/usr/bin/env bash
# The GPU measurements of docs/results.md (and the multi-GPU scaling of one run), as one script for a machine with CUDA (run from the repository root,
# metarun installed: `make install`). Each part prints what docs/results.md records; ~10 minutes in all, the
# 60 000-iteration preset run excepted (its own line at the end, hours on a CPU, about 1 h expected on a GPU).
#   scripts/gpu_checks.sh OMNIGLOT_ROOT OUT_DIR [--full]
set -euo pipefail
root=$1 out=$2 full=${3:-}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 1. The GPU-marked tests (the device run, MAML++ on CUDA, the benchmark printing both paths).
"$py" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
# 2. Meta-it/s of the learn2learn loop and metarun's paths, meta-batch 32, 5-way 1-shot, one query per class.
for order in "" "--first-order"; do
  for steps in 1 5; do
    "$py" scripts/bench_maml.py --device cuda --meta-batch-size 32 --inner-steps "$steps" $order --rounds 5 \
        --seconds 2 | tee -a "$out/bench_cuda.txt"
  done
done
"$py" scripts/bench_maml.py --device cuda --sampling | tee "$out/sampling_cuda.txt"
# 3. One run on 1, 2, 4, 8 GPUs (those the machine has): MAML 5-way 1-shot, meta-batch 32, second order, vectorised,
#    torchrun with one rank per GPU, as ratios against one process on one GPU (docs/results.md, "One run on two ranks").
gpus=$(nvidia-smi --list-gpus | wc -l)
ranks=$(for w in 2 4 8; do [ "$w" -le "$gpus" ] && printf '%s ' "$w"; done)
if [ -n "$ranks" ]; then
  # shellcheck disable=SC2086  # the world sizes are separate arguments
  "$py" scripts/bench_distributed.py --device cuda --ranks $ranks --iterations 200 --rounds 3 \
      --omniglot "$root" | tee "$out/scaling_cuda.txt"
else
  echo "one GPU: no scaling run" | tee "$out/scaling_cuda.txt"
fi
# 4. The paper-length MAML Omniglot 5-way 1-shot run (60 000 iterations), only with --full.
if [ "$full" = "--full" ]; then
  METARUN_CACHE="$out/cache" .venv/bin/metarun experiment=maml_omniglot_5w1s dataset.root="$root" device=cuda \
      wandb.mode=offline console=false hydra.run.dir="$out/maml_omniglot_5w1s_60k" | tee "$out/maml_60k.txt"
fi
