#!/usr/bin/env bash
# The GPU benchmark: bench/vs_peft.py --mode gpu (bf16, batch 32, 412 input + 100 prompt
# tokens, 8 targets) for base, large, xl and xxl against PEFT, on one H200 in at most 8 minutes.
#
#   bash bench/device.sh [OUTPUT_DIR]      # default: $OUT, else ./bench-results
#
# Each size runs in its own process under a hard time limit (its share of BUDGET_S, default
# 460 s), and every measurement inside under a soft one, so a slow size cannot eat the budget.
# Results land in OUTPUT_DIR as they are measured: results.jsonl (one JSON line per
# measurement and implementation, flushed at once), log.txt, and table.md at the end.
# ATTENTION_IMPL=cudnn (or fused) picks our attention path (T5Config.attention_impl).
set -uo pipefail

out="${1:-${OUT:-bench-results}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # JAX and torch share the one GPU
export TF_CPP_MIN_LOG_LEVEL=3
budget="${BUDGET_S:-460}"
python="${PYTHON:-python}"
results="$out/results.jsonl"

# run SIZE SECONDS [vs_peft.py flags...]: one size, at most SECONDS (less if the budget is short).
run() {
  local size="$1" limit="$2" left status
  shift 2
  left=$((budget - SECONDS))
  if ((left < 30)); then
    printf '{"size": "%s", "measure": "build", "error": "skipped: budget spent"}\n' "$size" >>"$results"
    return
  fi
  ((limit > left)) && limit="$left"
  echo "== $size: at most $limit s ($((budget - SECONDS)) s of the budget left)" | tee -a "$out/log.txt"
  timeout -k 10 "$limit" "$python" bench/vs_peft.py --mode gpu --sizes "$size" \
    --limit-s $((limit * 2 / 5)) --rounds 5 --attention-impl "${ATTENTION_IMPL:-einsum}" \
    --out "$results" "$@" >>"$out/log.txt" 2>&1
  status=$?
  if ((status == 124 || status == 137)); then
    printf '{"size": "%s", "measure": "all", "error": "killed at the %s s limit"}\n' \
      "$size" "$limit" >>"$results"
  fi
}

run base 110 --peft-compile
run large 70
run xl 110
run xxl 160
"$python" bench/vs_peft.py --table "$results" >"$out/table.md"
cat "$out/table.md"
