#!/usr/bin/env bash
# Search, then train, test and FGSM the found genotype, on every GPU of this machine.
#
#   launch/single_host.sh SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [extra flags]
#   launch/single_host.sh configs/ss_pcp.py runs/ss_pcp_075
#   CUDA_VISIBLE_DEVICES=0,1 launch/single_host.sh configs/pcp.py runs/pcp configs/train_cifar10.py \
#       --config.seed=1
#
# One process drives every GPU it can see (JAX uses all local devices; the steps split each batch
# across them), so no launcher and no --distributed are needed. CUDA_VISIBLE_DEVICES chooses the
# GPUs (default: all). The arguments are those of launch/search_then_train.sh: flags after the
# third argument go to both the search and the training command.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 SEARCH_CONFIG RUN_DIR [TRAIN_CONFIG] [extra flags]" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "GPUs used (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-all}):"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader \
    ${CUDA_VISIBLE_DEVICES:+-i "$CUDA_VISIBLE_DEVICES"}
fi
exec "$(dirname "$0")/search_then_train.sh" "$@"
