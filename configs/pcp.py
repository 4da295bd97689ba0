"""PCP-DARTS: progressive (P-DARTS) search with partial channels and edge normalisation.

  python -m pcp_jax.main --config=configs/pcp.py --workdir=runs/pcp

Three stages of 5/11/17 cells with 8 -> 5 -> 3 candidate ops per edge, K=4, betas, 25 epochs
per stage (15 warm-up), batch 256 with lr 0.025 (the paper), on CIFAR-10. The paper's Vanilla
PCP-DARTS: 3.12 % test error, 4.5 M params, 0.163 GPU-days on a V100. `:tiny` for a CPU smoke
run of a few minutes; `:warmup=10`, `:cells8` and `:dataset=cifar100` for the paper's other
readings (pcp_jax/defaults.py).
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.search_config()
  config.method = 'PCP-DARTS'
  return defaults.apply_args(config, arg)
