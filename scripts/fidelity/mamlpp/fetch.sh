#!/usr/bin/env bash
# Fetch the reference code for scripts/fidelity/mamlpp/run_pair_mamlpp.py: the MAML++ authors' PyTorch code
# (AntreasAntoniou/HowToTrainYourMAMLPytorch) at a pinned commit, with scripts/fidelity/mamlpp/patches/*.patch
# applied (CPU / today's torch, no archive unpacking or deletion, a fidelity driver that writes a results JSON).
# The reference stays in DEST; nothing of it enters metarun's src/.
#
# Usage: scripts/fidelity/mamlpp/fetch.sh DEST [--mirror PATH_OR_URL]
#   DEST      folder to create (the clone itself; an existing fetch at the same commit is re-used, patches
#             already applied are skipped)
#   --mirror  clone from this path or URL instead of https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch
#             (e.g. the bare mirror /work/.mirror/AntreasAntoniou+HowToTrainYourMAMLPytorch/repo)
#
# The checkout is sparse: datasets/ holds only the *.json files (the authors' class -> image-path lists, which fix
# their class order and so their split); the repository's own copy of Omniglot (datasets/omniglot_dataset/, the
# standard 105x105 PNGs, identical blobs to the official images_background/ + images_evaluation/) and the
# mini-ImageNet list are not checked out. fidelity_run.py links datasets/omniglot_dataset to --data-root.
set -euo pipefail
NAME=HowToTrainYourMAMLPytorch
COMMIT=86964701651c06e490271365fedb8789a72ef3f0   # "Update data.py", 2021-11-15 (the newest commit)
URL=https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES=$here/patches
source "$here/../pinned.sh"
pinned_args "$@"
pinned_clone '/*' '!/datasets/*' '/datasets/*.json' '!/datasets/mini_imagenet_full_size.json'
pinned_need data.py few_shot_learning_system.py meta_neural_network_architectures.py inner_loop_optimizers.py \
  utils/parser_utils.py experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json \
  datasets/omniglot_dataset.json datasets/label_name_to_map_omniglot_dataset.json \
  datasets/map_to_label_name_omniglot_dataset.json
# (a bare mirror may lack the blob of datasets/mini_imagenet_full_size.json: git then prints "invalid object"
#  errors while patching; they concern that unused file only)
pinned_patch
