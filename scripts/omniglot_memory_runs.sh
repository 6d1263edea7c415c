#!/usr/bin/env bash
# The Omniglot runs behind docs/results.md's memory- and model-based table: MANN, SNAIL and Meta Networks from
# their presets (conf/experiment/), shortened to CPU-sized budgets, on MAML's split, tested on 600 fixed tasks.
# Usage: scripts/omniglot_memory_runs.sh OMNIGLOT_ROOT OUT_DIR [NAME ...]
# With names, only those runs (see the list at the bottom). Prints one line per run.
set -euo pipefail
root=$1 out=$2; shift 2
only=("$@")
metarun=${METARUN:-.venv/bin/metarun}
common=(dataset.root="$root" threads=1 wandb.mode=offline console=false eval.tasks=600 eval.val_tasks=100)
run() {  # name, overrides...
  local name=$1; shift
  if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " =~ " $name " ]]; then return; fi
  echo "+ $metarun ${common[*]} $* hydra.run.dir=$out/$name" >&2
  "$metarun" "${common[@]}" "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
  python3 -c "import json; r=json.load(open('$out/$name/results.json')); \
inst=r['curves']['test'].get('instance'); \
print(f\"$name: test {100*r['test/acc_mean']:.2f} ± {100*r['test/acc_ci95']:.2f}% ({r['eval_tasks']} tasks), \
best val {100*r['best_val_acc']:.1f}% at {r['best_iteration']}, train {r['train_seconds']:.0f} s\" \
+ (' instances ' + ' '.join(f'{p}:{100*m:.1f}±{100*c:.1f}' for p, m, c in zip(inst['position'], inst['acc_mean'], inst['acc_ci95'])) if inst else ''))"
}
mkdir -p "$out"
# MANN (Santoro et al. 2016): 5-way episodes of 10 instances per class (shots 1 + 9 queries), labels one step late;
# the paper trains 100 000 episodes.
run mann experiment=mann_omniglot_5w iterations=${MANN_ITERATIONS:-2000} eval_every=250 checkpoint_every=250
# SNAIL (Mishra et al. 2018): the paper's Omniglot architecture, 5-way 1-shot; meta-batch 32 in the preset.
run snail experiment=snail_omniglot_5w1s iterations=${SNAIL_ITERATIONS:-600} meta_batch_size=16 eval_every=100 \
    checkpoint_every=100
# Meta Networks (Munkhdalai & Yu 2017): one task per update, as in the authors' code.
run metanet experiment=metanet_omniglot_5w1s iterations=${METANET_ITERATIONS:-1500} eval_every=250 checkpoint_every=250
