#!/usr/bin/env bash
# The Omniglot 5-way 1-shot runs behind docs/results.md's optimisation-family table and MAML++ ablation:
# every method at one equal, CPU-sized budget, on MAML's split (rotations), tested on 600 fixed tasks.
# Usage: scripts/omniglot_optimisation_runs.sh OMNIGLOT_ROOT OUT_DIR [NAME ...]
# With names, only those runs (see the list at the bottom). Prints one line per run.
set -euo pipefail
root=$1 out=$2; shift 2
only=("$@")
metarun=${METARUN:-.venv/bin/metarun}
budget=(iterations=${ITERATIONS:-400} meta_batch_size=${META_BATCH:-8} eval_every=100 checkpoint_every=100)
common=(dataset=omniglot dataset.root="$root" ways=5 shots=1 query_shots=1 threads=1 wandb.mode=offline
        console=false eval.tasks=600 eval.val_tasks=100)
run() {  # name, overrides...
  local name=$1; shift
  if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " =~ " $name " ]]; then return; fi
  echo "+ $metarun ${common[*]} ${budget[*]} $* hydra.run.dir=$out/$name" >&2
  "$metarun" "${common[@]}" "${budget[@]}" "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
  python3 -c "import json; r=json.load(open('$out/$name/results.json')); \
print(f\"$name: test {100*r['test/acc_mean']:.2f} ± {100*r['test/acc_ci95']:.2f}% ({r['eval_tasks']} tasks, \
{r['eval_inner_steps']} steps), best val {100*r['best_val_acc']:.1f}% at {r['best_iteration']}, \
train {r['train_seconds']:.0f} s\")"
}
mkdir -p "$out"
# The baseline: MAML as in Finn et al. (inner lr 0.4, 1 step train, 3 test).
run maml algorithm=maml
# MAML++ (Antoniou et al. 2019): each switch alone on top of that MAML, then all of them.
run maml_msl algorithm=maml algorithm.msl=true algorithm.inner_steps=3
run maml_msl_baseline3 algorithm=maml algorithm.inner_steps=3
run maml_bnrs algorithm=maml algorithm.per_step_bn_statistics=true
run maml_bnwb algorithm=maml algorithm.per_step_bn_weights=true
run maml_lslr algorithm=maml algorithm.lslr=true
run maml_da algorithm=maml algorithm.first_order_iterations=200
run maml_cosine algorithm=maml scheduler=cosine
run maml_top5 algorithm=maml eval.top_k=3
run maml_plus_plus algorithm=maml_plus_plus algorithm.inner_steps=3 algorithm.eval_inner_steps=3 scheduler=cosine eval.top_k=3
# The other methods of the family.
run reptile algorithm=reptile train_shots=5
run meta_lstm algorithm=meta_lstm
run synaptic algorithm=synaptic
