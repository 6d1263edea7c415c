# Shared steps of the fetch scripts (scripts/fidelity/fetch.sh, scripts/fidelity/mamlpp/fetch.sh): clone a
# repository at a pinned commit into DEST and apply a folder of patches, idempotently. Sourced, not run. The caller
# sets NAME, URL, COMMIT and PATCHES (a folder), then calls:
#   pinned_args "$@"            DEST [--mirror PATH_OR_URL] -> $dest, $src
#   pinned_clone [SPARSE...]    clone $src at $COMMIT into $dest (or accept an existing one at $COMMIT); SPARSE
#                               patterns make the checkout sparse (git sparse-checkout set --no-cone)
#   pinned_need FILE...         stop unless every FILE exists in $dest
#   pinned_patch                apply $PATCHES/*.patch (skipping those already applied), record $COMMIT
pinned_args() {
  dest=${1:?usage: fetch.sh DEST [--mirror PATH_OR_URL]}; shift
  src=$URL
  while [ $# -gt 0 ]; do
    case $1 in
      --mirror) src=${2:?--mirror needs a path or URL}; shift 2 ;;
      *) echo "fetch.sh: unknown argument $1" >&2; exit 2 ;;
    esac
  done
}

pinned_clone() {
  if [ -e "$dest" ]; then
    if [ "$(git -C "$dest" rev-parse HEAD 2>/dev/null)" != "$COMMIT" ]; then
      echo "fetch.sh: $dest exists and is not $NAME at $COMMIT; remove it or choose another DEST" >&2; exit 1
    fi
    echo "fetch.sh: $dest already holds $COMMIT" >&2
    return
  fi
  git clone --quiet --no-checkout "$src" "$dest"
  if [ $# -gt 0 ]; then git -C "$dest" sparse-checkout set --no-cone "$@"; fi
  # A mirror may lack a few large blobs (images, unused data lists): a checkout that stops on them still
  # checks out the rest; pinned_need verifies the files the patches and the runs need.
  git -C "$dest" -c advice.detachedHead=false checkout --quiet "$COMMIT" \
    || echo "fetch.sh: checkout reported missing objects (see above); checking the needed files" >&2
  [ "$(git -C "$dest" rev-parse HEAD)" = "$COMMIT" ] || { echo "fetch.sh: could not check out $COMMIT" >&2; exit 1; }
}

pinned_need() {
  for f in "$@"; do
    [ -f "$dest/$f" ] || { echo "fetch.sh: $dest/$f is missing" >&2; exit 1; }
  done
}

pinned_patch() {
  for p in "$PATCHES"/*.patch; do
    if git -C "$dest" apply --reverse --check "$p" 2>/dev/null; then
      echo "fetch.sh: $(basename "$p") already applied" >&2
    else
      git -C "$dest" apply "$p"
      echo "fetch.sh: applied $(basename "$p")" >&2
    fi
  done
  echo "$COMMIT" > "$dest/.fidelity_commit"
  echo "$dest: $NAME $COMMIT, patched: $(cd "$PATCHES" && ls *.patch | tr '\n' ' ')"
}
