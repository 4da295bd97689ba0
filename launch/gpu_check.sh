#!/usr/bin/env bash
# The GPU check: one command, under 10 minutes on one GPU, one JSON + one markdown table out.
#
#   launch/gpu_check.sh [OUT_DIR] [--tiny]     # OUT_DIR defaults to gpu_check
#
# 1. Times each case in a process of its own (`python -m pcp_jax.gpu_check case`, built on
#    pcp_jax.bench; the list: `python -m pcp_jax.gpu_check cases`): the search step of each
#    stage of configs/pcp.py and configs/ss_pcp.py at the paper's batch (256), the PC-DARTS
#    step at 64 and 256, the train step at 96; float32, then bfloat16. Per case: img/s, s/step,
#    compile s, peak device memory, the stage's share of the projected search.
# 2. The determinism check: two short PC-DARTS searches (pcp_jax.main) with
#    XLA_FLAGS=--xla_gpu_deterministic_ops=true, each compiling on its own (own compilation
#    cache; both at once on a GPU); genotype.json and the arrays of arch.npz compared bitwise.
# 3. `python -m pcp_jax.gpu_check summarize OUT_DIR`: OUT_DIR/gpu_check.json and gpu_check.md.
#
# A failing case (out of memory, a crash, a timeout) is a row of the table, not the end of the
# script. Time budget: GPU_CHECK_BUDGET_S seconds in all (default 570); cases start only while
# GPU_CHECK_RESERVE_S (default 180) are left for the determinism runs, later ones are recorded
# as skipped. The exit status is 0 only if every case ran with finite losses and the two runs
# agree. `--tiny` is the CPU form (CI): PC-DARTS's `:tiny` form at batch 8, float32 and
# bfloat16, no time budget by default, the determinism runs one after the other in the
# environment's compilation cache.
# PYTHON (default python) runs the Python steps.
set -u -o pipefail

OUT=gpu_check
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "Error: unknown option $arg (usage: $0 [OUT_DIR] [--tiny])" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
TINY_FLAG=()
if (( TINY )); then TINY_FLAG=(--tiny); fi
if (( TINY )); then DEFAULT_BUDGET=0; else DEFAULT_BUDGET=570; fi
BUDGET=${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}  # 0: none
RESERVE=${GPU_CHECK_RESERVE_S:-180}
MIN_CASE_S=20  # a case needs at least this long to start
START=$SECONDS

# Only what this script writes is replaced.
rm -rf "$OUT/cases" "$OUT/determinism" "$OUT/gpu_check.json" "$OUT/gpu_check.md"
mkdir -p "$OUT/cases" "$OUT/determinism"
if (( TINY )); then echo tiny > "$OUT/mode.txt"; else echo full > "$OUT/mode.txt"; fi
if (( BUDGET > 0 )); then
  echo "${BUDGET} s (determinism reserve ${RESERVE} s)" > "$OUT/budget.txt"
else
  : > "$OUT/budget.txt"
fi

log() { echo "[gpu_check $(( SECONDS - START )) s] $*" >&2; }

"$PY" -m pcp_jax.gpu_check device > "$OUT/device.json" 2> "$OUT/device.log" \
  || log "could not read the device (see $OUT/device.log)"
PLATFORM=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["platform"])' \
  "$OUT/device.json" 2> /dev/null || echo unknown)
log "device: $(cat "$OUT/device.json" 2> /dev/null)"
"$PY" -m pcp_jax.gpu_check cases "${TINY_FLAG[@]}" > "$OUT/cases.txt" || exit 2
"$PY" -m pcp_jax.gpu_check determinism "${TINY_FLAG[@]}" > "$OUT/determinism/args.txt" \
  || exit 2

# 1. The cases, one process each.
while read -r -u 3 name flags; do
  [[ -n "$name" ]] || continue
  timeout_args=()
  if (( BUDGET > 0 )); then
    left=$(( BUDGET - RESERVE - (SECONDS - START) ))
    if (( left < MIN_CASE_S )); then
      echo "skipped: time budget (${BUDGET} s) spent" > "$OUT/cases/$name.skipped"
      log "$name: skipped (time budget)"
      continue
    fi
    timeout_args=(timeout --kill-after=10 "$left")
  fi
  log "$name: $flags"
  # shellcheck disable=SC2086  # flags: words without spaces, as `cases` printed them
  "${timeout_args[@]}" "$PY" -m pcp_jax.gpu_check case $flags --out="$OUT/cases/$name.json" \
    < /dev/null > "$OUT/cases/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$OUT/cases/$name.rc"
  (( rc == 0 )) || log "$name: failed (exit $rc; $OUT/cases/$name.log)"
done 3< "$OUT/cases.txt"

# 2. Determinism: two short searches with deterministic GPU ops (a flag XLA:CPU accepts too).
read -r -a DET_ARGS < "$OUT/determinism/args.txt"
det_run() {  # $1: run_a or run_b; $2: memory fraction of the GPU ('' for XLA's default)
  local dir="$OUT/determinism/$1" env_args=()
  env_args+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_deterministic_ops=true")
  # Each run compiles for itself (GPU autotuning included), unless in the CPU form.
  (( TINY )) || env_args+=("JAX_COMPILATION_CACHE_DIR=$dir.xla_cache")
  [[ -z "$2" ]] || env_args+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$2")
  local timeout_args=()
  if (( BUDGET > 0 )); then
    local left=$(( BUDGET - (SECONDS - START) ))
    (( left > MIN_CASE_S )) || left=$MIN_CASE_S
    timeout_args=(timeout --kill-after=10 "$left")
  fi
  env "${env_args[@]}" "${timeout_args[@]}" "$PY" -m pcp_jax.main "${DET_ARGS[@]}" \
    --workdir="$dir" < /dev/null > "$dir.log" 2>&1
  echo $? > "$dir.rc"
}
log "determinism: python -m pcp_jax.main ${DET_ARGS[*]}, twice"
if [[ "$PLATFORM" == gpu && $TINY == 0 ]]; then
  det_run run_a 0.45 & det_run run_b 0.45 & wait  # the GPU has room for both; compiling is CPU work
else
  det_run run_a ''; det_run run_b ''
fi

# 3. The report.
"$PY" -m pcp_jax.gpu_check summarize "$OUT"
rc=$?
log "done (exit $rc): $OUT/gpu_check.json, $OUT/gpu_check.md"
exit $rc
