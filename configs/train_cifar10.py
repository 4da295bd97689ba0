"""Train a genotype from scratch on CIFAR-10, then test it and attack it with FGSM.

  python -m pcp_jax.main --config=configs/train_cifar10.py --workdir=runs/train_pc_darts \
      --config.genotype=PC_DARTS_cifar

`--config.genotype` takes a reference name or a search's genotype.json / workdir. The
paper's recipe: 20 cells, C=36, auxiliary tower (0.4), drop-path 0.3, cutout 16, batch 96, Adam
lr 6e-4 for 600 epochs, keeping the checkpoint of lowest validation loss. Published: PC-DARTS
2.57 % test error with 3.6 M parameters (3,634,678 here). The full recipe needs a GPU
(`python -m pcp_jax.bench --what=train` measures a step). Append `:sgd` for the DARTS SGD
recipe and `:tiny` for a CPU smoke run on the shipped subset (a few minutes, mostly
compilation). `--config.modes=test --config.weights=model.pt` tests published PyTorch weights
of the genotype instead (README, "Published PyTorch weights").
"""

from pcp_jax import defaults


def get_config(arg=None):
  config = defaults.train_config()
  config.data.dataset = 'cifar10'
  return defaults.apply_args(config, arg)
