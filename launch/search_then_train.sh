#!/usr/bin/env bash
# The paper's pipeline on one machine: search, then train the found genotype from scratch,
# test it and run the FGSM analysis.
#
#   launch/search_then_train.sh configs/ss_pcp.py:ssf=0.75 runs/ss_pcp_075 [train config] [flags]
#
# The search writes RUN/search/genotype.json; training reads it from there and writes
# RUN/train/results.json, fgsm.json and fgsm_*.png. Flags after the third argument go where
# they belong: --config.search.* and --config.method to the search, --config.train.*,
# --config.fgsm.* and --config.genotype to the training, any other flag (e.g. --config.seed=1,
# --config.num_devices=2) to both, in the --flag=value or the --flag value form. A third
# argument starting with - is a flag (the train config is then configs/train_cifar10.py of
# this checkout). Paths are relative to the directory you run it from. Rerunning resumes
# whichever part was interrupted; a finished search is only checked against its config (a
# changed one is refused, naming the fields) and its results rewritten.
set -euo pipefail
usage="usage: $0 SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [flags]"
root="$(cd "$(dirname "$0")/.." && pwd)"
search_config="${1:?$usage}"
run_dir="${2:?$usage}"
shift 2
train_config="$root/configs/train_cifar10.py"
if (( $# )) && [[ "$1" != -* ]]; then
  train_config="$1"
  shift
fi
search_flags=()
train_flags=()
while (( $# )); do
  flag="$1"
  shift
  pair=("$flag")
  if [[ "$flag" == --* && "$flag" != *=* ]] && (( $# )) && [[ "$1" != --* ]]; then
    pair+=("$1")  # --flag value: the value goes where its flag goes
    shift
  fi
  case "$flag" in
    --config.search.*|--config.method|--config.method=*) search_flags+=("${pair[@]}") ;;
    --config.train.*|--config.fgsm.*|--config.genotype|--config.genotype=*)
      train_flags+=("${pair[@]}") ;;
    *) search_flags+=("${pair[@]}"); train_flags+=("${pair[@]}") ;;
  esac
done
# The checkout importable without changing directory: relative paths stay the caller's.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python -m pcp_jax.main --config="$search_config" --workdir="$run_dir/search" \
  ${search_flags[@]+"${search_flags[@]}"}
python -m pcp_jax.main --config="$train_config" --workdir="$run_dir/train" \
  --config.genotype="$run_dir/search" ${train_flags[@]+"${train_flags[@]}"}
