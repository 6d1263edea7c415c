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
COMMIT=db5cee3795490071282bbdfa81179ef732349196   # "Fix MetaEnv initialization (#412)", 2023-07-03; v0.2.0 + 3 commits
URL=https://github.com/learnables/learn2learn
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${1:?usage: fetch.sh DEST [--mirror PATH_OR_URL]}; shift
src=$URL
while [ $# -gt 0 ]; do
  case $1 in
    --mirror) src=${2:?--mirror needs a path or URL}; shift 2 ;;
    *) echo "fetch.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
patches=("$here"/patches/*.patch)

if [ -e "$dest" ]; then
  if [ "$(git -C "$dest" rev-parse HEAD 2>/dev/null)" != "$COMMIT" ]; then
    echo "fetch.sh: $dest exists and is not learn2learn at $COMMIT; remove it or choose another DEST" >&2; exit 1
  fi
  echo "fetch.sh: $dest already holds $COMMIT" >&2
else
  git clone --quiet --no-checkout "$src" "$dest"
  # A mirror may lack a few large blobs (images under docs/): a checkout that stops on them still
  # checks out the rest; the files the patches and the runs need are verified below.
  git -C "$dest" -c advice.detachedHead=false checkout --quiet "$COMMIT" \
    || echo "fetch.sh: checkout reported missing objects (see above); checking the needed files" >&2
  [ "$(git -C "$dest" rev-parse HEAD)" = "$COMMIT" ] || { echo "fetch.sh: could not check out $COMMIT" >&2; exit 1; }
fi
for f in examples/vision/maml_omniglot.py examples/vision/protonet_miniimagenet.py; do
  [ -f "$dest/$f" ] || { echo "fetch.sh: $dest/$f is missing" >&2; exit 1; }
done
for p in "${patches[@]}"; do
  if git -C "$dest" apply --reverse --check "$p" 2>/dev/null; then
    echo "fetch.sh: $(basename "$p") already applied" >&2
  else
    git -C "$dest" apply "$p"
    echo "fetch.sh: applied $(basename "$p")" >&2
  fi
done
echo "$COMMIT" > "$dest/.fidelity_commit"
echo "$dest: learn2learn $COMMIT, patched: $(cd "$here/patches" && ls *.patch | tr '\n' ' ')"
