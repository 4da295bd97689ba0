"""Train a genotype from scratch on CIFAR-10, then test it and attack it with FGSM.

  python -m pcp_jax.main --config=configs/train_cifar10.py --workdir=runs/train_pc_darts \
      --config.genotype=PC_DARTS_cifar

`--config.genotype` takes a reference name or a search's genotype.json / workdir. The
paper's recipe: 20 cells, C=36, auxiliary tower (0.4), drop-path 0.3, cutout 16, batch 96, Adam
lr 6e-4 for 600 epochs, keeping the checkpoint of lowest validation loss. Published: PC-DARTS
2.57 % test error with 3.6 M parameters (3,634,678 here). GPU cost not measured yet; on a busy
2-core CPU a reduced network (8 cells, C=16) takes about 16-19 s per batch-64 step, so the full
recipe needs a GPU. Append `:sgd` for the DARTS SGD recipe and `:tiny` for a CPU smoke run on
the shipped subset (about 2-3 minutes on a busy 2-core CPU, mostly compilation).
"""

from configs import train_common


def get_config(arg=None):
  config = train_common.base_train_config()
  config.data.dataset = 'cifar10'
  return train_common.apply_args(config, arg)
