#!/usr/bin/env bash
# Settings and helpers shared by the tpu_scripts/*.sh commands (sourced, not run).
# Every setting is an environment variable with a default; none names a project.
# shellcheck disable=SC2034  # the settings are read by the scripts that source this file

TPU_NAME="${TPU_NAME:-softprompt-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"                        # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"  # e.g. v4-32 (4 hosts), v3-32, v5litepod-16
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
# Paths on the workers, relative to the remote home directory.
REMOTE_DIR="${REMOTE_DIR:-softprompt-jax}"
VENV="${VENV:-softprompt-venv}"
LOG_DIR="${LOG_DIR:-softprompt-logs}"
PYTHON="${PYTHON:-python3.11}"                # jax needs Python >= 3.11
DRY_RUN="${DRY_RUN:-0}"                       # 1: print the gcloud commands, run nothing

# The settings every script honours, for the usage texts.
COMMON_SETTINGS="  TPU_NAME=$TPU_NAME  ZONE=$ZONE  PROJECT=${PROJECT:-<gcloud default>}
  DRY_RUN=$DRY_RUN (1 prints the gcloud commands instead of running them)"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Print the usage text (from the script's `usage` function) and exit on -h/--help.
handle_help() {
  case "${1:-}" in
    -h | --help)
      usage
      exit 0
      ;;
  esac
}

# Run a command, or only print it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm SUBCOMMAND ARGS...` in $ZONE (and $PROJECT when set).
tpu_vm() {
  local subcommand="$1"
  shift
  local where=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    where+=("--project=$PROJECT")
  fi
  run gcloud compute tpus tpu-vm "$subcommand" "$@" "${where[@]}"
}

# Run a shell command line on every worker of $TPU_NAME at once.
on_all_workers() {
  tpu_vm ssh "$TPU_NAME" --worker=all "--command=$1"
}

# Quote arguments for a remote shell command line.
quote() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}
