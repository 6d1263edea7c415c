#!/usr/bin/env bash
# Fetch the reference code for scripts/fidelity/run_pair.py: learn2learn's repository at a pinned commit, with
# scripts/fidelity/patches/*.patch applied (command-line arguments, local data, fixed validation/test tasks, a
# results JSON). The reference stays in DEST; nothing of it enters metarun's src/.
#
# Usage: scripts/fidelity/fetch.sh DEST [--mirror PATH_OR_URL]
#   DEST      folder to create (the clone itself; an existing fetch at the same commit is re-used)
#   --mirror  clone from this path or URL instead of https://github.com/learnables/learn2learn
#             (e.g. a local mirror, bare or not, that holds the commit)
set -euo pipefail
NAME=learn2learn
COMMIT=db5cee3795490071282bbdfa81179ef732349196   # "Fix MetaEnv initialization (#412)", 2023-07-03; v0.2.0 + 3 commits
URL=https://github.com/learnables/learn2learn
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES=$here/patches
source "$here/pinned.sh"
pinned_args "$@"
pinned_clone
pinned_need examples/vision/maml_omniglot.py examples/vision/protonet_miniimagenet.py examples/vision/reptile_miniimagenet.py
pinned_patch
