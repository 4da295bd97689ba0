"""Quick start: a small SS PCP-DARTS search on the CIFAR-10 subset shipped with the package.

  python -m pcp_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Works offline. Two progressive stages (3 then 4 cells; 5 candidate ops per edge, 3 kept, then
the final genotype), C=8, K=4, ssf 0.75, 3 epochs per stage (1 warm-up) on 1,000 subset images
(500 train the weights, 500 the architecture), batch 32: a few minutes on a CPU, most of it
compiling each stage (docs/performance.md has measured times), validation accuracy about 0.2
after each stage. The genotype is a smoke test of the pipeline, not a result.
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.search_config()
  config.method = 'SS PCP-DARTS (quick start)'
  config.data.source = 'subset'
  config.data.max_train = 1000
  s = config.search
  s.ss_factor = 0.75
  s.channels = 8
  s.batch_size = 32
  s.eval_batch_size = 250
  s.initial_ops = ('max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
                   'dil_conv_3x3')
  s.projector_sizes = (128, 128)
  s.bt_lambda = 0.0051 * 8192 / 128
  s.stages = [defaults.stage(layers=3, num_keep=3, epochs=3, warmup_epochs=1, skip_dropout=0.1),
              defaults.stage(layers=4, num_keep=1, epochs=3, warmup_epochs=1, skip_dropout=0.4)]
  return defaults.apply_args(config, arg)
