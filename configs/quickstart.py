"""Quick start: a small SS PCP-DARTS search on the CIFAR-10 subset shipped with the package.

  python -m pcp_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Works offline. Two progressive stages (3 then 4 cells; 5 candidate ops per edge, 3 kept, then
the final genotype), C=8, K=4, ssf 0.75, 3 epochs per stage (1 warm-up) on 1,000 subset images
(500 train the weights, 500 the architecture), batch 32. Measured on a quiet 2-core CPU: 3 min
14 s (about 70 s per stage to compile, then 6-7 s per epoch), validation CE 2.09 / accuracy
0.214 after stage 1 and 1.99 / 0.244 after stage 2 (4 to 20 minutes on a busy machine). The
genotype is a smoke test of the pipeline, not a result.
"""

from configs import search_common


def get_config(arg=None):
  config = search_common.base_search_config()
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
  s.stages = [search_common.stage(3, 3, 3, 1, 0.1), search_common.stage(4, 1, 3, 1, 0.4)]
  return search_common.apply_args(config, arg)
