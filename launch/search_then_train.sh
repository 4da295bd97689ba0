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
# --config.num_devices=2) to both. Rerunning resumes whichever part was interrupted; a
# finished search is only checked against its config (a changed one is refused, naming the
# fields) and its results rewritten.
set -euo pipefail
usage="usage: $0 SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [flags]"
search_config="${1:?$usage}"
run_dir="${2:?$usage}"
train_config="${3:-configs/train_cifar10.py}"
shift $(( $# < 3 ? $# : 3 ))
search_flags=()
train_flags=()
for flag in "$@"; do
  case "$flag" in
    --config.search.*|--config.method=*) search_flags+=("$flag") ;;
    --config.train.*|--config.fgsm.*|--config.genotype=*) train_flags+=("$flag") ;;
    *) search_flags+=("$flag"); train_flags+=("$flag") ;;
  esac
done
cd "$(dirname "$0")/.."
python -m pcp_jax.main --config="$search_config" --workdir="$run_dir/search" \
  ${search_flags[@]+"${search_flags[@]}"}
python -m pcp_jax.main --config="$train_config" --workdir="$run_dir/train" \
  --config.genotype="$run_dir/search" ${train_flags[@]+"${train_flags[@]}"}
