"""Train a genotype from scratch on CIFAR-100 (100 classes), then test it and run FGSM.

  python -m pcp_jax.main --config=configs/train_cifar100.py --workdir=runs/train_c100 \
      --config.genotype=runs/search_cifar10/genotype.json

Same recipe as train_cifar10.py; needs cifar-100-binary.tar.gz in data.dir (no offline copy
here: --config.data.download=True fetches it). PC-DARTS reports about 17 % test error with a
CIFAR-10-searched cell; cost as for CIFAR-10.
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.train_config()
  config.data.dataset = 'cifar100'
  return defaults.apply_args(config, arg)
