"""Datasets as NumPy arrays: official CIFAR/Fashion-MNIST files, TFDS or shipped subset.

Everything here runs on the host and returns uint8 NHWC images with int32 labels;
augmentation and normalisation happen on the device (see `augment.py`).
"""

import dataclasses
import gzip
import importlib
import os
import struct
import tarfile
import zlib
from typing import NamedTuple, Optional, Tuple

import numpy as np

from pcp_jax import downloads

SOURCES = ('files', 'tfds', 'subset')
SUBSET_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'assets', 'cifar10_subset.npz')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset that models and normalisation need."""
  name: str
  num_classes: int
  image_size: int
  channels: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  test_size: int = 10_000  # images in the official test split
  train_size: int = 50_000  # images in the official training split


# Class names by label, for figures (CIFAR-100's hundred are shown as numbers).
CLASS_NAMES = {
    'cifar10': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                'truck'],
    'fashion_mnist': ['T-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                      'sneaker', 'bag', 'ankle boot'],
}

DATASETS = {
    'cifar10': DatasetInfo('cifar10', 10, 32, 3, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616)),
    'cifar100': DatasetInfo('cifar100', 100, 32, 3, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    'fashion_mnist': DatasetInfo('fashion_mnist', 10, 28, 1, (0.2860,),
                                 (0.3530,), train_size=60_000),
}


class Dataset(NamedTuple):
  """Train and test arrays: images uint8 NHWC, labels int32."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  info: DatasetInfo


class _CifarLayout(NamedTuple):
  archive: str
  folder: str
  train_files: Tuple[str, ...]
  test_files: Tuple[str, ...]
  label_bytes: int  # the label used is the last one (CIFAR-100's fine label)


_CIFAR_LAYOUTS = {
    'cifar10': _CifarLayout(
        'cifar-10-binary.tar.gz', 'cifar-10-batches-bin',
        tuple(f'data_batch_{i}.bin' for i in range(1, 6)), ('test_batch.bin',),
        label_bytes=1),
    'cifar100': _CifarLayout(
        'cifar-100-binary.tar.gz', 'cifar-100-binary', ('train.bin',),
        ('test.bin',), label_bytes=2),
}

_TFDS_MANUAL_FILES = {
    'cifar10': ('cifar-10-binary.tar.gz',),
    'cifar100': ('cifar-100-binary.tar.gz',),
    'fashion_mnist': tuple(downloads.FASHION_FILES),
}


def default_data_dir() -> str:
  """Where datasets live unless the config says otherwise: $PCP_JAX_DATA or ~/.cache."""
  return os.path.expanduser(
      os.environ.get('PCP_JAX_DATA', '~/.cache/pcp_jax/data'))


def load_dataset(name: str,
                 source: str = 'files',
                 data_dir: Optional[str] = None,
                 download: bool = False,
                 pad_to_32: bool = False) -> Dataset:
  """Loads a whole dataset into host memory.

  Args:
    name: 'cifar10', 'cifar100' or 'fashion_mnist'.
    source: 'files' (official binary files in data_dir), 'tfds' (TensorFlow
      Datasets, optional install) or 'subset' (the small CIFAR-10 subset shipped
      with the package).
    data_dir: folder holding the files or the TFDS data; defaults to
      `default_data_dir()`.
    download: fetch missing files from the official hosts (checksums verified).
    pad_to_32: zero-pad smaller images (Fashion-MNIST) to 32x32 so that
      CIFAR-sized networks apply unchanged.

  Returns:
    A `Dataset` with uint8 NHWC images and int32 labels.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown data.dataset {name!r}; expected one of '
                     f'{sorted(DATASETS)}.')
  if source not in SOURCES:
    raise ValueError(f'Unknown data.source {source!r}; expected one of '
                     f'{list(SOURCES)}.')
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if source == 'files':
    arrays = _load_files(name, data_dir, download)
  elif source == 'tfds':
    arrays = _load_tfds(name, data_dir, download)
  else:
    arrays = _load_subset(name)
  info = DATASETS[name]
  for split, labels in (('training', arrays[1]), ('test', arrays[3])):
    if labels.size and not 0 <= labels.min() <= labels.max() < info.num_classes:
      raise ValueError(f'The {split} labels of {name} ({source} in {data_dir}) must be in '
                       f'0..{info.num_classes - 1}, found {labels.min()}..{labels.max()}: '
                       'the files are damaged or of another dataset.')
  if pad_to_32 and info.image_size < 32:
    arrays = tuple(_pad_to(a, 32) if a.ndim == 4 else a for a in arrays)
    info = dataclasses.replace(info, image_size=32)
  return Dataset(*arrays, info=info)


def search_split(images: np.ndarray, labels: np.ndarray,
                 train_portion: float = 0.5):
  """Splits a training set PC-DARTS style: weights on the head, architecture on the tail.

  Returns ((weight_images, weight_labels), (arch_images, arch_labels)).
  """
  if not 0 < train_portion < 1:
    raise ValueError(
        f'data.train_portion must be in (0, 1), got {train_portion}.')
  split = int(train_portion * len(images))
  if split == 0 or split == len(images):
    raise ValueError(f'data.train_portion={train_portion} leaves one part of '
                     f'the {len(images)} training examples empty.')
  return (images[:split], labels[:split]), (images[split:], labels[split:])


def load(config) -> Dataset:
  """The dataset of `config.data`, its training and test sets cut to `data.max_train` /
  `data.max_test` images (0 keeps all)."""
  d = config.data
  dataset = load_dataset(d.dataset, d.source, d.dir or None, d.download, d.pad_to_32)
  cap = lambda x, n: x[:n] if n else x  # pylint: disable=unnecessary-lambda-assignment
  return dataset._replace(
      train_images=cap(dataset.train_images, d.max_train),
      train_labels=cap(dataset.train_labels, d.max_train),
      test_images=cap(dataset.test_images, d.max_test),
      test_labels=cap(dataset.test_labels, d.max_test))


def search_splits(config):
  """((weight images, labels), (architecture images, labels), info) of a search config."""
  dataset = load(config)
  weights, arch = search_split(dataset.train_images, dataset.train_labels,
                               config.data.train_portion)
  return weights, arch, dataset.info


class Splits(NamedTuple):
  """Host arrays (uint8 NHWC images, int32 labels) of the three splits a training run uses."""
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  info: DatasetInfo


def parse_val_split(value) -> Optional[float]:
  """None for 'test' (validate on the test set), else the held-out fraction of the train set."""
  if str(value).strip().lower() == 'test':
    return None
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0.0 < fraction < 1.0:
    raise ValueError(
        f"train.val_split must be 'test' or a fraction in (0, 1) such as '0.1', got {value!r}.")
  return fraction


def train_splits(config) -> Splits:
  """The training, validation (`train.val_split`) and test splits of a train config."""
  dataset = load(config)
  train_images, train_labels = dataset.train_images, dataset.train_labels
  fraction = parse_val_split(config.train.val_split)
  if fraction is None:
    val_images, val_labels = dataset.test_images, dataset.test_labels
  else:
    split = len(train_images) - int(round(fraction * len(train_images)))
    if split in (0, len(train_images)):
      raise ValueError(f'train.val_split={config.train.val_split} leaves no training or no '
                       f'validation images out of {len(train_images)}.')
    val_images, val_labels = train_images[split:], train_labels[split:]
    train_images, train_labels = train_images[:split], train_labels[:split]
  return Splits(train_images, train_labels, val_images, val_labels, dataset.test_images,
                dataset.test_labels, dataset.info)


def _load_files(name, data_dir, download):
  """Reads the official on-disk format, downloading it first if asked to; archives present
  are checked against their official checksums (`downloads.verify`)."""
  for remote in downloads.FILES[name]:
    path = os.path.join(data_dir, remote.filename)
    if os.path.isfile(path):
      downloads.verify(remote, path)
  read = _read_cifar if name in _CIFAR_LAYOUTS else _read_fashion_mnist
  arrays = read(name, data_dir)
  if arrays is None and download:
    for remote in downloads.FILES[name]:
      if not os.path.exists(os.path.join(data_dir, remote.filename)):
        downloads.fetch(remote, data_dir)
    arrays = read(name, data_dir)
  if arrays is None:
    raise FileNotFoundError(_missing_files_message(name, data_dir))
  return arrays


def _missing_files_message(name, data_dir):
  if name in _CIFAR_LAYOUTS:
    layout = _CIFAR_LAYOUTS[name]
    expected = (f'{layout.archive} or the folder {layout.folder}/ with '
                f'{", ".join(layout.train_files + layout.test_files)}')
  else:
    expected = (f'{", ".join(downloads.FASHION_FILES)} (in the folder itself or in '
                f'{downloads.FASHION_DIR}/)')
  return (f'Dataset {name!r} not found in data.dir={data_dir!r}: expected '
          f'{expected}. Pass --config.data.download=True to fetch them, or '
          'point --config.data.dir (or $PCP_JAX_DATA) at a folder holding them.')


def _read_cifar(name, data_dir):
  """Reads CIFAR from its extracted folder or straight from its tar.gz; None if absent."""
  layout = _CIFAR_LAYOUTS[name]
  wanted = layout.train_files + layout.test_files
  folder = os.path.join(data_dir, layout.folder)
  archive = os.path.join(data_dir, layout.archive)
  if all(os.path.isfile(os.path.join(folder, f)) for f in wanted):
    contents = {}
    for f in wanted:
      with open(os.path.join(folder, f), 'rb') as fh:
        contents[f] = fh.read()
  elif os.path.isfile(archive):
    contents = _read_tar_members(archive, wanted)
  else:
    return None

  def parse(files):
    parts = [_parse_cifar_records(contents[f], layout.label_bytes, f)
             for f in files]
    return (np.concatenate([images for images, _ in parts]),
            np.concatenate([labels for _, labels in parts]))

  return parse(layout.train_files) + parse(layout.test_files)


def _read_tar_members(archive, wanted):
  """Returns {basename: bytes} of the wanted members, read in one pass over the stream."""
  contents = {}
  try:
    with tarfile.open(archive, 'r:gz') as tar:
      for member in tar:
        base = os.path.basename(member.name)
        if member.isfile() and base in wanted:
          contents[base] = tar.extractfile(member).read()
  except (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile) as e:
    raise IOError(f'{archive} is damaged ({type(e).__name__}: {e}); delete it and download '
                  'it again (data.download=True).') from None
  missing = [f for f in wanted if f not in contents]
  if missing:
    raise IOError(f'{archive} lacks {missing}; it is not the official archive.')
  return contents


def _parse_cifar_records(raw, label_bytes, filename):
  """Splits records of label byte(s) + 3072 channel-major pixels into NHWC + labels."""
  record = label_bytes + 3 * 32 * 32
  if len(raw) % record:
    raise IOError(f'{filename}: {len(raw)} bytes is not a whole number of '
                  f'{record}-byte CIFAR records.')
  records = np.frombuffer(raw, np.uint8).reshape(-1, record)
  labels = records[:, label_bytes - 1].astype(np.int32)
  images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def _read_fashion_mnist(name, data_dir):
  """Reads the IDX gz files from data_dir or data_dir/fashion-mnist; None if absent."""
  del name
  for folder in (data_dir, os.path.join(data_dir, downloads.FASHION_DIR)):
    paths = [os.path.join(folder, f) for f in downloads.FASHION_FILES]
    if all(os.path.isfile(p) for p in paths):
      train_images, train_labels, test_images, test_labels = map(
          _read_idx, paths)
      for images, labels in ((train_images, train_labels),
                             (test_images, test_labels)):
        if len(images) != len(labels):
          raise IOError(f'{folder}: {len(images)} images but {len(labels)} '
                        'labels.')
      return (train_images[..., None], train_labels.astype(np.int32),
              test_images[..., None], test_labels.astype(np.int32))
  return None


def _read_idx(path):
  """Parses a gzipped IDX file of unsigned bytes (the MNIST format)."""
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read()
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise IOError(f'{path} is damaged ({type(e).__name__}: {e}); delete it and download it '
                  'again (data.download=True).') from None
  if len(raw) < 4 or raw[:3] != b'\x00\x00\x08':
    raise IOError(f'{path} is not an IDX file of unsigned bytes.')
  ndim = raw[3]
  shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != np.prod(shape):
    raise IOError(f'{path}: header says shape {shape} but holds {data.size} '
                  'values.')
  return data.reshape(shape)


def _load_tfds(name, data_dir, download):
  """Loads through TensorFlow Datasets, failing fast where it would retry offline."""
  try:
    tfds = importlib.import_module('tensorflow_datasets')
    importlib.import_module('tensorflow')
  except ImportError as e:
    raise ImportError(
        "data.source='tfds' needs TensorFlow Datasets and TensorFlow, which "
        f'are optional ({e}). Run `pip install tensorflow-cpu '
        "tensorflow-datasets`, or use data.source='files' (no TensorFlow "
        'needed).') from e
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.data_path.exists():
    manual_dir = os.path.join(data_dir, 'downloads', 'manual')
    have_manual = all(os.path.isfile(os.path.join(manual_dir, f))
                      for f in _TFDS_MANUAL_FILES[name])
    if not (have_manual or download):
      raise FileNotFoundError(
          f'TFDS has no prepared {name!r} in data.dir={data_dir!r} and the '
          f'source files {list(_TFDS_MANUAL_FILES[name])} are not in '
          f'{manual_dir}. Pass --config.data.download=True to let TFDS fetch '
          "them, or use data.source='files'.")
    config = (tfds.download.DownloadConfig(manual_dir=manual_dir)
              if have_manual else None)
    builder.download_and_prepare(download_config=config)
  arrays = []
  for split in ('train', 'test'):
    examples = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    arrays += [np.asarray(examples['image'], np.uint8),
               np.asarray(examples['label'], np.int32)]
  return tuple(arrays)


def _load_subset(name):
  """Loads the balanced CIFAR-10 subset shipped with the package."""
  if name != 'cifar10':
    raise ValueError(f"data.source='subset' only holds cifar10, not "
                     f'data.dataset={name!r}.')
  with np.load(SUBSET_PATH) as subset:
    return (subset['train_images'], subset['train_labels'].astype(np.int32),
            subset['test_images'], subset['test_labels'].astype(np.int32))


def _pad_to(images, size):
  """Zero-pads NHWC images symmetrically to size x size."""
  pad_h, pad_w = size - images.shape[1], size - images.shape[2]
  return np.pad(images, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                         (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
