#!/usr/bin/env bash
# Start one `softprompt-jax train` process per worker, in the background, logging to a file.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_DIR="${MODEL_DIR:-}"
GIN_FILES="${GIN_FILES:-models/t5_1_1_xxl.gin prompts/class_labels.gin runs/prompt_finetune.gin}"
RUN_NAME="${RUN_NAME:-$(basename "${MODEL_DIR:-run}")}"
MULTIHOST="${MULTIHOST:-1}"
REMOTE_ENV="${REMOTE_ENV:-}"

usage() {
  cat <<USAGE
Usage: MODEL_DIR=gs://BUCKET/PATH $(basename "$0") [-h|--help] [FLAG...]

On every worker of \$TPU_NAME at once, in the background (nohup), run
  ~/\$VENV/bin/softprompt-jax train --multihost --gin_file=F... \\
      --gin.MODEL_DIR="'\$MODEL_DIR'" FLAG...  > ~/\$LOG_DIR/\$RUN_NAME.<hostname>.log
FLAGs go to softprompt-jax unchanged, e.g. --gin.MESH_MODEL=8 --gin.BATCH_SIZE=32
--gin.MIXTURE_OR_TASK_NAME="'taskless_super_glue_boolq_v102'". A worker where a process
holds the TPU refuses to start (stop.sh ends such processes). Follow worker 0 with
  gcloud compute tpus tpu-vm ssh \$TPU_NAME --worker=0 --command='tail -f ~/\$LOG_DIR/*.log'

Settings (environment variables, current values):
  MODEL_DIR=${MODEL_DIR:-<required: a gs:// folder every worker can reach>}
  GIN_FILES=$GIN_FILES
  RUN_NAME=$RUN_NAME (log file name)  LOG_DIR=$LOG_DIR  VENV=$VENV
  MULTIHOST=$MULTIHOST (1: --multihost, jax.distributed from the pod's environment)
  REMOTE_ENV=${REMOTE_ENV:-<none>} (NAME=VALUE words set for the run on the workers)
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ -n "$MODEL_DIR" ]] || die "set MODEL_DIR to a gs:// folder (see --help)"
[[ "$MODEL_DIR" == gs://* ]] ||
  die "MODEL_DIR=$MODEL_DIR must be a gs:// folder: every worker reads it and host 0 writes it"

read -ra gin_files <<<"$GIN_FILES"
read -ra remote_env <<<"$REMOTE_ENV"
[[ ${#gin_files[@]} -gt 0 ]] || die "GIN_FILES is empty"
train=(env "${remote_env[@]}" "$VENV/bin/softprompt-jax" train)
if [[ "$MULTIHOST" == 1 ]]; then
  train+=(--multihost)
fi
for file in "${gin_files[@]}"; do
  train+=("--gin_file=$file")
done
train+=("--gin.MODEL_DIR='$MODEL_DIR'" "$@")

log="$(quote "$LOG_DIR/$RUN_NAME").\$(hostname).log"
# Refuse to start on a worker where some process already holds the TPUs.
on_all_workers "holders=\$(sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs)
if [ -n \"\$holders\" ]; then
  echo \"\$(hostname): processes \$holders hold the TPU; stop.sh ends them\" >&2; exit 1
fi
mkdir -p $(quote "$LOG_DIR")
nohup $(quote "${train[@]}") >$log 2>&1 </dev/null &
echo \"\$(hostname): started, log ~/$log\""
