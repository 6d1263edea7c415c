#!/usr/bin/env bash
# One short Omniglot run per family (gradient, metric, memory, optimisation), to check that a change
# of code leaves the numbers as they were: run it on two checkouts and compare their results.json.
#
#   scripts/family_smoke_runs.sh SRC_DIR OMNIGLOT_ROOT OUT_DIR
#
# SRC_DIR is the checkout's src/ (PYTHONPATH), so an older commit's worktree runs with this venv:
#   git worktree add /tmp/old <commit>
#   scripts/family_smoke_runs.sh /tmp/old/src /tmp/omni_data /tmp/smoke/old
#   scripts/family_smoke_runs.sh "$PWD/src" /tmp/omni_data /tmp/smoke/new
#   .venv/bin/python scripts/compare_results.py /tmp/smoke/old /tmp/smoke/new
set -euo pipefail
src=$1 root=$2 out=$3
py=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
common="iterations=100 eval_every=50 checkpoint_every=50 eval.tasks=100 eval.val_tasks=20 threads=1 device=cpu
        dataset.root=$root wandb.mode=disabled console=false"
for preset in maml_omniglot_5w1s protonet_omniglot_5w1s mann_omniglot_5w reptile_omniglot_5w1s; do
    echo "== $preset"
    # shellcheck disable=SC2086
    PYTHONPATH=$src METARUN_CACHE=${METARUN_CACHE:-/tmp/mrcache} "$py" -m metarun experiment=$preset $common \
        hydra.run.dir="$out/$preset"
done
