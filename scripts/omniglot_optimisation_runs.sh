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
# The baseline of the family: MAML as in Finn et al. (inner lr 0.4, 1 step in training, 3 at test).
run maml algorithm=maml
# The MAML++ ablation (Antoniou et al. 2019): each switch alone on top of MAML with 3 inner steps in training
# and at test (the paper ablates at 5; 3 to fit the CPU budget), then all of them (maml_plus_plus).
ablation=(algorithm=maml algorithm.inner_steps=3 algorithm.eval_inner_steps=3 algorithm.msl_anneal_iterations=200)
run maml3 "${ablation[@]}"
run maml3_msl "${ablation[@]}" algorithm.multi_step_loss=true
run maml3_bnrs "${ablation[@]}" algorithm.per_step_bn_statistics=true
run maml3_bnwb "${ablation[@]}" algorithm.per_step_bn_weights=true
run maml3_lslr "${ablation[@]}" algorithm.per_step_inner_lrs=true
run maml3_da "${ablation[@]}" algorithm.first_order_iterations=200
run maml3_cosine "${ablation[@]}" scheduler=cosine
run maml3_top3 "${ablation[@]}" eval.top_k=3
run maml3_plus_plus algorithm=maml_plus_plus algorithm.inner_lr=0.4 algorithm.inner_steps=3 \
    algorithm.eval_inner_steps=3 algorithm.msl_anneal_iterations=200 algorithm.first_order_iterations=200 \
    scheduler=cosine eval.top_k=3
# The other methods of the family, at the same budget.
run reptile algorithm=reptile train_shots=10 algorithm.eval_inner_steps=50  # the authors: 10 training shots, 50 test steps
run meta_lstm algorithm=meta_lstm backbone.hidden=16  # 64 filters: ~50x the CPU of MAML per task
run synaptic algorithm=synaptic optimizer.lr=0.03
