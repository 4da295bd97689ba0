"""PC-DARTS baseline: one 8-cell stage with partial channels (K=4) and edge normalisation.

  python -m pcp_jax.main --config=configs/pc_darts.py --workdir=runs/pc_darts

50 epochs (architecture frozen for 15), batch 256, lr 0.1, all 8 ops, no skip-connect limit,
the released code's channel selection (the first C/K channels, then a channel shuffle), as the
paper's PC-DARTS row was produced with the authors' code.
Published: 2.57 % test error, 3.6 M params, 0.1 GPU-days (paper's rerun 0.162).
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.search_config()
  config.method = 'PC-DARTS'
  s = config.search
  s.stages = [defaults.stage(layers=8, num_keep=1, epochs=50, warmup_epochs=15,
                            skip_dropout=0.0)]
  s.max_skip_normal = -1
  s.batch_size = 256
  s.optim.weights.lr = 0.1
  s.optim.arch.grad_clip = 0.0
  s.channel_mode = 'shuffle'
  return defaults.apply_args(config, arg)
