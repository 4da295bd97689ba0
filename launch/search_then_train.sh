#!/usr/bin/env bash
# The paper's pipeline on one machine: search, then train the found genotype from scratch,
# test it and run the FGSM analysis.
#
#   launch/search_then_train.sh configs/ss_pcp.py:ssf=0.75 runs/ss_pcp_075 [train config]
#
# The search writes RUN/search/genotype.json; training reads it from there and writes
# RUN/train/results.json, fgsm.json and fgsm_*.png. Extra arguments after the third are passed
# to both commands (e.g. --config.seed=1). Rerunning skips a finished search and resumes an
# interrupted training from its latest checkpoint.
set -euo pipefail
search_config="${1:?usage: $0 SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [extra flags]}"
run_dir="${2:?usage: $0 SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [extra flags]}"
train_config="${3:-configs/train_cifar10.py}"
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
if [[ ! -f "$run_dir/search/genotype.json" ]]; then
  python -m pcp_jax.main --config="$search_config" --workdir="$run_dir/search" "$@"
fi
python -m pcp_jax.main --config="$train_config" --workdir="$run_dir/train" \
  --config.genotype="$run_dir/search" "$@"
