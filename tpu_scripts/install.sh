#!/usr/bin/env bash
# Put softprompt-jax on every worker and install it with jax[tpu] in a virtual environment.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
JAX_PACKAGE="${JAX_PACKAGE:-jax[tpu]}"
ARCHIVE_NAME="softprompt-jax.tar.gz"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-h|--help]

On every worker of \$TPU_NAME (gcloud compute tpus tpu-vm ssh --worker=all):
  1. get the code into ~/\$REMOTE_DIR: clone \$REPO_URL, or, when it is empty, copy this
     checkout (tracked and untracked, not ignored files) with tpu-vm scp --worker=all;
  2. install \$PYTHON (apt) if missing, make the venv ~/\$VENV and
     pip install -e ~/\$REMOTE_DIR "\$JAX_PACKAGE".

Settings (environment variables, current values):
  REPO_URL=${REPO_URL:-<none: copy this checkout>}  REPO_REF=${REPO_REF:-<default branch>}
  JAX_PACKAGE=$JAX_PACKAGE  PYTHON=$PYTHON
  REMOTE_DIR=$REMOTE_DIR  VENV=$VENV (both relative to the workers' home directory)
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (settings are environment variables; see --help)"
for path in "$REMOTE_DIR" "$VENV"; do
  [[ -n "$path" && "$path" != /* && "$path" != "." && "/$path/" != */../* ]] ||
    die "REMOTE_DIR and VENV must be relative paths inside the home directory, got '$path'"
done

# Write this checkout's files (tracked and untracked, not ignored) to a gzipped tarball.
pack_checkout() {
  local root file
  root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)" ||
    die "not inside a git checkout; set REPO_URL to clone one on the workers instead"
  while IFS= read -r -d '' file; do
    if [[ -e "$root/$file" || -L "$root/$file" ]]; then
      printf '%s\0' "$file"
    fi
  done < <(git -C "$root" ls-files -z --cached --others --exclude-standard) |
    tar -C "$root" --null -T - -czf "$1"
}

if [[ -n "$REPO_URL" ]]; then
  get_code="rm -rf $(quote "$REMOTE_DIR") && git clone -q $(quote "$REPO_URL" "$REMOTE_DIR")"
  if [[ -n "$REPO_REF" ]]; then
    get_code+=" && git -C $(quote "$REMOTE_DIR") checkout -q $(quote "$REPO_REF")"
  fi
else
  workdir="$(mktemp -d)"
  trap 'rm -rf "$workdir"' EXIT
  pack_checkout "$workdir/$ARCHIVE_NAME"
  tpu_vm scp "$workdir/$ARCHIVE_NAME" "$TPU_NAME:$ARCHIVE_NAME" --worker=all
  get_code="rm -rf $(quote "$REMOTE_DIR") && mkdir -p $(quote "$REMOTE_DIR")"
  get_code+=" && tar -xzf $ARCHIVE_NAME -C $(quote "$REMOTE_DIR") && rm $ARCHIVE_NAME"
fi

py="$(quote "$PYTHON")"
bin="$(quote "$VENV")/bin"
on_all_workers "set -e; $get_code
if ! command -v $py >/dev/null; then
  sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv
fi
$py -m venv $(quote "$VENV")
$bin/pip install -q --upgrade pip
$bin/pip install -q -e $(quote "$REMOTE_DIR" "$JAX_PACKAGE")
$bin/softprompt-jax --help >/dev/null && echo \"\$(hostname): softprompt-jax installed\""
