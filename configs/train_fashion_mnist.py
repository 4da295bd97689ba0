"""The transfer experiment: a cell searched on CIFAR-10 trained from scratch on Fashion-MNIST.

  python -m pcp_jax.main --config=configs/train_fashion_mnist.py --workdir=runs/fmnist_pcp \
      --config.genotype=runs/search_cifar10/genotype.json --config.data.dir=/path/to/data

The network takes the 1-channel 28x28 images as they are (set data.pad_to_32=True to pad them
to 32x32). Same recipe as CIFAR-10. The paper reports 95.97 % test accuracy (Vanilla PCP-DARTS),
96.06 % (SS PCP-DARTS, ssf=1) and 95.65 % (PC-DARTS).
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.train_config()
  config.data.dataset = 'fashion_mnist'
  config.data.source = 'files'
  return defaults.apply_args(config, arg)
