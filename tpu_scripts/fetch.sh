#!/usr/bin/env bash
# Copy a run's results (MODEL_DIR on gs://, plus every worker's log) to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_DIR="${MODEL_DIR:-}"
RUN_NAME="${RUN_NAME:-$(basename "${MODEL_DIR:-run}")}"
DEST="${DEST:-results}"
FETCH_LOGS="${FETCH_LOGS:-1}"
STORAGE_CP="${STORAGE_CP:-gcloud storage cp}"

usage() {
  cat <<USAGE
Usage: MODEL_DIR=gs://BUCKET/PATH $(basename "$0") [-h|--help]

1. (FETCH_LOGS=1) every worker of \$TPU_NAME copies ~/\$LOG_DIR/\$RUN_NAME.*.log
   to \$MODEL_DIR/logs/ (tpu-vm ssh --worker=all);
2. \$STORAGE_CP -r \$MODEL_DIR \$DEST/ copies the run (metrics.jsonl, prompt checkpoints,
   TensorBoard events, logs) here. Export the prompt afterwards with
   softprompt-jax export --model_dir=\$DEST/\$RUN_NAME --output=prompt.npy

Settings (environment variables, current values):
  MODEL_DIR=${MODEL_DIR:-<required: the gs:// folder of the run>}
  DEST=$DEST  RUN_NAME=$RUN_NAME  LOG_DIR=$LOG_DIR
  FETCH_LOGS=$FETCH_LOGS  STORAGE_CP=$STORAGE_CP (or "gsutil -m cp")
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (settings are environment variables; see --help)"
[[ -n "$MODEL_DIR" ]] || die "set MODEL_DIR to the run's gs:// folder (see --help)"
[[ "$MODEL_DIR" == gs://* ]] || die "MODEL_DIR=$MODEL_DIR must be a gs:// folder"
MODEL_DIR="${MODEL_DIR%/}"

if [[ "$FETCH_LOGS" == 1 ]]; then
  on_all_workers "gcloud storage cp $(quote "$LOG_DIR/$RUN_NAME").*.log $(quote "$MODEL_DIR/logs/") ||
  echo \"\$(hostname): no logs to copy\" >&2"
fi
read -ra copy <<<"$STORAGE_CP"
run mkdir -p "$DEST"
run "${copy[@]}" -r "$MODEL_DIR" "$DEST/"
