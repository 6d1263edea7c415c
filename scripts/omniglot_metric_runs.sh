#!/usr/bin/env bash
# The Omniglot runs behind docs/results.md's metric-based table: one short CPU run per method.
# Usage: scripts/omniglot_metric_runs.sh OMNIGLOT_ROOT OUT_DIR [ITERATION_SCALE]
# Each run uses its experiment preset with fewer iterations (the presets hold the papers' counts);
# ITERATION_SCALE (default 1) multiplies the counts below. Prints one line per run: method, test accuracy, CI.
set -euo pipefail
root=$1 out=$2 scale=${3:-1}
metarun=${METARUN:-.venv/bin/metarun}
common=(dataset.root="$root" threads=1 wandb.mode=offline console=false eval.val_tasks=100 eval_every=250
        checkpoint_every=250)
run() {  # name, iterations, overrides...
  local name=$1 iterations=$(( $2 * scale )); shift 2
  echo "+ $metarun $* iterations=$iterations ${common[*]} hydra.run.dir=$out/$name" >&2
  /usr/bin/time -f "$name wall %e s" "$metarun" "$@" iterations="$iterations" "${common[@]}" hydra.run.dir="$out/$name" \
    > "$out/$name.log" 2>&1
  python3 -c "import json,sys; r=json.load(open('$out/$name/results.json')); \
print(f\"$name: test {100*r['test/acc_mean']:.2f} ± {100*r['test/acc_ci95']:.2f}% ({r['eval_tasks']} tasks), \
best val {100*r['best_val_acc']:.1f}% at {r['best_iteration']}, train {r['train_seconds']:.0f} s\")"
}
mkdir -p "$out"
run protonet_5w1s 3000 experiment=protonet_omniglot_5w1s
run matching_5w1s 3000 experiment=matching_omniglot_5w1s
run matching_fce_5w1s 3000 experiment=matching_omniglot_5w1s algorithm=matching_fce
run relation_5w1s 5000 experiment=relation_omniglot_5w1s
run siamese_5w1s 3000 experiment=siamese_omniglot_5w1s
run siamese_koch_20w1s 3000 experiment=siamese_omniglot_koch
