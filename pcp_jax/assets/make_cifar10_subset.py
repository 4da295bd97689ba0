"""Regenerates cifar10_subset.npz, the real CIFAR-10 subset shipped with pcp_jax.

It keeps, in their original order, the first 250 training images of each class
(2,500) and the first 50 test images of each class (500), read from the official
binary archive:

  python -m pcp_jax.assets.make_cifar10_subset --data_dir=../shared/data

The source folder must hold cifar-10-binary.tar.gz or cifar-10-batches-bin/.
"""

import argparse
import os

import numpy as np

from pcp_jax import data

TRAIN_PER_CLASS = 250
TEST_PER_CLASS = 50


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of every class, in dataset order."""
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                         for c in np.unique(labels)])
  return np.sort(keep)


def make_subset(data_dir: str, output: str) -> None:
  """Cuts the subset from the CIFAR-10 files in data_dir and writes it to output."""
  dataset = data.load_dataset('cifar10', source='files', data_dir=data_dir)
  train = first_per_class(dataset.train_labels, TRAIN_PER_CLASS)
  test = first_per_class(dataset.test_labels, TEST_PER_CLASS)
  np.savez_compressed(
      output,
      train_images=dataset.train_images[train],
      train_labels=dataset.train_labels[train].astype(np.uint8),
      test_images=dataset.test_images[test],
      test_labels=dataset.test_labels[test].astype(np.uint8))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=data.default_data_dir())
  parser.add_argument('--output', default=data.SUBSET_PATH)
  args = parser.parse_args()
  make_subset(args.data_dir, args.output)
  print(f'Wrote {args.output} ({os.path.getsize(args.output):,} bytes).')


if __name__ == '__main__':
  main()
