"""PC-DARTS baseline: one 8-cell stage with partial channels (K=4) and edge normalisation.

  python -m pcp_jax.main --config=configs/pc_darts.py --workdir=runs/pc_darts

50 epochs (architecture frozen for 15), batch 256, lr 0.1, all 8 ops, no skip-connect limit,
the released code's channel selection (the first C/K channels, then a channel shuffle), as the
paper's PC-DARTS row was produced with the authors' code.
Published: 2.57 % test error, 3.6 M params, 0.1 GPU-days (paper's rerun 0.162).
"""

from configs import search_common


def get_config(arg=None):
  config = search_common.base_search_config()
  config.method = 'PC-DARTS'
  s = config.search
  s.stages = [search_common.stage(8, 1, 50, 15, 0.0)]
  s.max_skip_normal = -1
  s.batch_size = 256
  s.lr = 0.1
  s.arch_grad_clip = 0.0
  s.channel_mode = 'shuffle'
  return search_common.apply_args(config, arg)
