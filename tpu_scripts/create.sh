#!/usr/bin/env bash
# Create a TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CREATE_FLAGS="${CREATE_FLAGS:-}"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-h|--help]

Create the TPU VM or pod slice \$TPU_NAME (one VM per host of the slice):
  gcloud compute tpus tpu-vm create \$TPU_NAME --accelerator-type=... --version=... --zone=...

Settings (environment variables, current values):
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE (v4-8: one host; v4-32: four hosts; v3-32, v5litepod-16, ...)
  TPU_VERSION=$TPU_VERSION (the TPU software image)
  CREATE_FLAGS=${CREATE_FLAGS:-<none>} (extra flags, e.g. "--spot" or "--preemptible")
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (settings are environment variables; see --help)"
read -ra extra <<<"$CREATE_FLAGS"
tpu_vm create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$TPU_VERSION" \
  "${extra[@]}"
