#!/usr/bin/env bash
# Delete the TPU VM or pod slice (its local disks go with it; gs:// results stay).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-h|--help]

Delete the TPU VM or pod slice \$TPU_NAME without asking:
  gcloud compute tpus tpu-vm delete \$TPU_NAME --quiet --zone=...
Copy worker logs to the run's MODEL_DIR first (fetch.sh) if you want them.

Settings (environment variables, current values):
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (settings are environment variables; see --help)"
tpu_vm delete "$TPU_NAME" --quiet
