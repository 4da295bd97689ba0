"""SS PCP-DARTS: PCP-DARTS whose architecture loss mixes Barlow Twins and cross-entropy.

  python -m pcp_jax.main --config=configs/ss_pcp.py:ssf=0.75 --workdir=runs/ss_pcp_075

The architecture step minimises ssf * L_BT + (1 - ssf) * L_CE on two augmented views of the
validation batch (network weights always train on CE). `ssf` defaults to 0.75, the paper's best
(2.99 % test error, 3.7 M params, 0.199 GPU-days); the paper also reports 0.25/0.5/1.
`:ssf=0.5,tiny` for a CPU smoke run of a few minutes.

The paper's mix is unscaled (`search.bt_scale='none'`): at D = 512 the BT term's gradient is
orders of magnitude larger than the CE term's, so the architecture update is nearly pure BT at
any ssf in (0, 1); `bt_scale`
'balance' or 'dim' make ssf a dial (docs/self_supervision.md). The views share the step's
channel sample (`search.shared_channels`) and are asymmetric (`search.bt_views`).
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.search_config()
  config.method = 'SS PCP-DARTS'
  config.search.ss_factor = 0.75
  return defaults.apply_args(config, arg)
