"""P-DARTS baseline: progressive search, full channels (K=1), no edge normalisation.

  python -m pcp_jax.main --config=configs/p_darts.py --workdir=runs/p_darts

Stages of 5/11/17 cells, 8 -> 5 -> 3 ops, 25 epochs each (10 warm-up), batch 96, lr 0.025,
architecture gradient clipped at 5, skip dropout 0.1/0.4/0.7. Published: 2.50 % (paper's rerun
2.71 %), 3.4 M params, 0.3 GPU-days.
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.search_config()
  config.method = 'P-DARTS'
  config.search.partial_k = 1
  config.search.use_betas = False
  config.search.batch_size = 96
  for stage in config.search.stages:
    stage.warmup_epochs = 10
  config = defaults.apply_args(config, arg)
  config.search.partial_k = 1
  return config
