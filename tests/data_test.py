"""Tests for pcp_jax.data on small files written in each official format."""

import gzip
import hashlib
import io
import os
import struct
import sys
import tarfile

import numpy as np
import pytest

from pcp_jax import data
from pcp_jax import downloads

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    'PCP_JAX_SHARED_DATA', os.path.join(_REPO_ROOT, '..', 'shared', 'data'))
CIFAR10_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6)) + (
    'test_batch.bin',)


def _random_cifar(rng, count, num_classes):
  images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, count).astype(np.int32)
  return images, labels


def _cifar_records(images, label_columns):
  """Encodes NHWC images as records of the given label bytes + channel-major pixels."""
  pixels = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  labels = np.stack(label_columns, axis=1).astype(np.uint8)
  return np.concatenate([labels, pixels], axis=1).tobytes()


def _write(path, payload):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(payload)


def _write_tar_gz(path, members):
  with tarfile.open(path, 'w:gz') as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def _write_cifar10(directory, as_archive, seed=0):
  """Writes 2 records per training batch and 3 test records; returns the arrays."""
  rng = np.random.default_rng(seed)
  files, train = {}, []
  for name in CIFAR10_FILES:
    images, labels = _random_cifar(rng, 3 if name == 'test_batch.bin' else 2,
                                   10)
    files[f'cifar-10-batches-bin/{name}'] = _cifar_records(images, [labels])
    train.append((images, labels))
  files['cifar-10-batches-bin/batches.meta.txt'] = b'airplane\n'
  if as_archive:
    _write_tar_gz(os.path.join(directory, 'cifar-10-binary.tar.gz'), files)
  else:
    for name, payload in files.items():
      _write(os.path.join(directory, name), payload)
  test = train.pop()
  return (np.concatenate([i for i, _ in train]),
          np.concatenate([labels for _, labels in train]), *test)


def _write_idx(path, array):
  header = struct.pack(f'>BBBB{array.ndim}I', 0, 0, 8, array.ndim, *array.shape)
  _write(path, gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.parametrize('as_archive', [False, True])
def test_cifar10_returns_written_pixels_and_labels(tmp_path, as_archive):
  written = _write_cifar10(str(tmp_path), as_archive)
  dataset = data.load_dataset('cifar10', data_dir=str(tmp_path))
  loaded = dataset[:4]
  for got, want in zip(loaded, written):
    np.testing.assert_array_equal(got, want)
  assert dataset.train_images.shape == (10, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32
  assert dataset.info == data.DATASETS['cifar10']


def test_cifar_channel_major_bytes_become_nhwc(tmp_path):
  record = bytes([7]) + (np.arange(3072) % 251).astype(np.uint8).tobytes()
  folder = tmp_path / 'cifar-10-batches-bin'
  for name in CIFAR10_FILES:
    _write(str(folder / name), record)
  image = data.load_dataset('cifar10', data_dir=str(tmp_path)).test_images[0]
  y, x, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3),
                        indexing='ij')
  np.testing.assert_array_equal(image, (c * 1024 + y * 32 + x) % 251)


@pytest.mark.parametrize('as_archive', [False, True])
def test_cifar100_uses_the_fine_label(tmp_path, as_archive):
  rng = np.random.default_rng(1)
  files, want = {}, {}
  for split, count in (('train', 4), ('test', 3)):
    images, fine = _random_cifar(rng, count, 100)
    coarse = (fine + 1) % 20
    files[f'cifar-100-binary/{split}.bin'] = _cifar_records(
        images, [coarse, fine])
    want[split] = (images, fine)
  if as_archive:
    _write_tar_gz(str(tmp_path / 'cifar-100-binary.tar.gz'), files)
  else:
    for name, payload in files.items():
      _write(str(tmp_path / name), payload)
  dataset = data.load_dataset('cifar100', data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.train_images, want['train'][0])
  np.testing.assert_array_equal(dataset.train_labels, want['train'][1])
  np.testing.assert_array_equal(dataset.test_images, want['test'][0])
  np.testing.assert_array_equal(dataset.test_labels, want['test'][1])
  assert dataset.info.num_classes == 100


def _write_fashion_mnist(directory):
  rng = np.random.default_rng(2)
  arrays = {
      'train-images-idx3-ubyte.gz': rng.integers(0, 256, (5, 28, 28)),
      'train-labels-idx1-ubyte.gz': rng.integers(0, 10, 5),
      't10k-images-idx3-ubyte.gz': rng.integers(0, 256, (3, 28, 28)),
      't10k-labels-idx1-ubyte.gz': rng.integers(0, 10, 3),
  }
  for name, array in arrays.items():
    _write_idx(os.path.join(directory, name), array)
  return list(arrays.values())


@pytest.mark.parametrize('subdir', ['', 'fashion-mnist'])
def test_fashion_mnist_reads_idx_files(tmp_path, subdir):
  written = _write_fashion_mnist(str(tmp_path / subdir))
  dataset = data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.train_images[..., 0], written[0])
  np.testing.assert_array_equal(dataset.train_labels, written[1])
  np.testing.assert_array_equal(dataset.test_images[..., 0], written[2])
  np.testing.assert_array_equal(dataset.test_labels, written[3])
  assert dataset.train_images.shape == (5, 28, 28, 1)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.info.image_size == 28


def test_pad_to_32_centres_fashion_mnist_in_zeros(tmp_path):
  written = _write_fashion_mnist(str(tmp_path))
  dataset = data.load_dataset('fashion_mnist', data_dir=str(tmp_path),
                              pad_to_32=True)
  assert dataset.train_images.shape == (5, 32, 32, 1)
  assert dataset.test_images.shape == (3, 32, 32, 1)
  assert dataset.info.image_size == 32
  np.testing.assert_array_equal(dataset.train_images[:, 2:30, 2:30, 0],
                                written[0])
  border = dataset.train_images.copy()
  border[:, 2:30, 2:30] = 0
  assert not border.any()


def _file_url(path):
  return 'file://' + os.path.abspath(path)


def _serve_cifar10_archive(tmp_path):
  """Writes a tiny CIFAR-10 archive outside data_dir and returns (remote, arrays)."""
  upstream = tmp_path / 'upstream'
  upstream.mkdir()
  written = _write_cifar10(str(upstream), as_archive=True)
  archive = upstream / 'cifar-10-binary.tar.gz'
  payload = archive.read_bytes()
  remote = downloads.RemoteFile(_file_url(archive), 'cifar-10-binary.tar.gz',
                                'sha256', hashlib.sha256(payload).hexdigest(),
                                size=len(payload))
  return remote, written


def test_download_with_good_checksum_lands_the_file(tmp_path, monkeypatch):
  remote, written = _serve_cifar10_archive(tmp_path)
  monkeypatch.setitem(downloads.FILES, 'cifar10', (remote,))
  data_dir = tmp_path / 'data'
  dataset = data.load_dataset('cifar10', data_dir=str(data_dir), download=True)
  np.testing.assert_array_equal(dataset.train_images, written[0])
  assert os.listdir(data_dir) == ['cifar-10-binary.tar.gz']


@pytest.mark.parametrize('corruption', ['digest', 'size'])
def test_download_with_bad_checksum_raises_and_leaves_nothing(
    tmp_path, monkeypatch, corruption):
  remote, _ = _serve_cifar10_archive(tmp_path)
  if corruption == 'digest':
    remote = downloads.RemoteFile(remote.url, remote.filename, 'sha256', '0' * 64)
  else:
    remote = downloads.RemoteFile(remote.url, remote.filename, remote.algorithm,
                                  remote.digest, size=remote.size + 1)
  monkeypatch.setitem(downloads.FILES, 'cifar10', (remote,))
  data_dir = tmp_path / 'data'
  with pytest.raises(downloads.ChecksumError, match='cifar-10-binary.tar.gz'):
    data.load_dataset('cifar10', data_dir=str(data_dir), download=True)
  assert os.listdir(data_dir) == []


def test_download_table_fetches_fashion_mnist_into_its_folder(
    tmp_path, monkeypatch):
  upstream = tmp_path / 'upstream'
  written = _write_fashion_mnist(str(upstream))
  remotes = []
  for remote in downloads.FILES['fashion_mnist']:
    local = upstream / os.path.basename(remote.filename)
    remotes.append(downloads.RemoteFile(
        _file_url(local), remote.filename, 'md5',
        hashlib.md5(local.read_bytes()).hexdigest()))
  monkeypatch.setitem(downloads.FILES, 'fashion_mnist', tuple(remotes))
  data_dir = tmp_path / 'data'
  dataset = data.load_dataset('fashion_mnist', data_dir=str(data_dir),
                              download=True)
  np.testing.assert_array_equal(dataset.test_labels, written[3])
  assert sorted(os.listdir(data_dir / 'fashion-mnist')) == sorted(
      os.path.basename(r.filename) for r in remotes)


def test_official_download_table_matches_the_published_checksums():
  cifar10, = downloads.FILES['cifar10']
  assert cifar10.url == 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
  assert cifar10.size == 170052171
  assert cifar10.digest.startswith('c4a38c50a1bc5f3a')
  cifar100, = downloads.FILES['cifar100']
  assert cifar100.digest == '03b5dce01913d631647c71ecec9e9cb8'
  fashion = {os.path.basename(r.filename): r.digest
             for r in downloads.FILES['fashion_mnist']}
  assert fashion['t10k-labels-idx1-ubyte.gz'] == (
      'bb300cfdad3c16e7a12a480ee83cd310')


@pytest.mark.parametrize('name,expected_file', [
    ('cifar10', 'cifar-10-binary.tar.gz'),
    ('cifar100', 'cifar-100-binary.tar.gz'),
    ('fashion_mnist', 'train-images-idx3-ubyte.gz'),
])
def test_missing_files_name_what_to_fetch(tmp_path, name, expected_file):
  with pytest.raises(FileNotFoundError) as error:
    data.load_dataset(name, data_dir=str(tmp_path))
  message = str(error.value)
  for part in (name, str(tmp_path), expected_file,
               '--config.data.download=True'):
    assert part in message


def test_unknown_source_and_dataset_are_rejected():
  with pytest.raises(ValueError, match=r"data\.source.*'files'"):
    data.load_dataset('cifar10', source='torchvision')
  with pytest.raises(ValueError, match=r"data\.dataset.*'cifar100'"):
    data.load_dataset('imagenet')
  with pytest.raises(ValueError, match=r'data\.source.*cifar10'):
    data.load_dataset('fashion_mnist', source='subset')


def test_tfds_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(ImportError) as error:
    data.load_dataset('cifar10', source='tfds', data_dir=str(tmp_path))
  assert 'pip install tensorflow-cpu tensorflow-datasets' in str(error.value)
  assert "data.source='files'" in str(error.value)


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('PCP_JAX_DATA', str(tmp_path))
  assert data.default_data_dir() == str(tmp_path)
  monkeypatch.delenv('PCP_JAX_DATA')
  assert data.default_data_dir() == os.path.expanduser('~/.cache/pcp_jax/data')


def test_search_split_keeps_order_and_sizes():
  images = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 1))
  labels = np.arange(10)
  (w_images, w_labels), (a_images, a_labels) = data.search_split(
      images, labels, train_portion=0.7)
  np.testing.assert_array_equal(w_labels, np.arange(7))
  np.testing.assert_array_equal(a_labels, np.arange(7, 10))
  np.testing.assert_array_equal(a_images[:, 0, 0, 0], np.arange(7, 10))
  assert w_images.shape == (7, 2, 2, 1)


@pytest.mark.parametrize('portion', [0.0, 1.0, 1.5, -0.1])
def test_search_split_rejects_bad_portion(portion):
  with pytest.raises(ValueError, match=r'data\.train_portion'):
    data.search_split(np.zeros((10, 2, 2, 1)), np.zeros(10), portion)


def test_shipped_subset_is_balanced_cifar10():
  dataset = data.load_dataset('cifar10', source='subset')
  assert dataset.train_images.shape == (2500, 32, 32, 3)
  assert dataset.test_images.shape == (500, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(dataset.train_labels),
                                np.full(10, 250))
  np.testing.assert_array_equal(np.bincount(dataset.test_labels),
                                np.full(10, 50))
  # The quick start's half split must give both parts every class.
  (_, weight_labels), (_, arch_labels) = data.search_split(
      dataset.train_images, dataset.train_labels, 0.5)
  assert len(np.unique(weight_labels)) == len(np.unique(arch_labels)) == 10


def _shared_data_or_skip(*names):
  if not all(os.path.exists(os.path.join(SHARED_DATA, n)) for n in names):
    pytest.skip(f'Real data not found in {SHARED_DATA} '
                '(set PCP_JAX_SHARED_DATA).')
  return SHARED_DATA


def test_real_cifar10_loads_and_the_subset_is_cut_from_it():
  data_dir = _shared_data_or_skip('cifar-10-binary.tar.gz')
  dataset = data.load_dataset('cifar10', data_dir=data_dir)
  assert dataset.train_images.shape == (50000, 32, 32, 3)
  assert dataset.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels),
                                np.full(10, 1000))
  mean = dataset.test_images.reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(mean, (0.4942, 0.4851, 0.4504), atol=1e-3)
  subset = data.load_dataset('cifar10', source='subset')
  first_horse = np.flatnonzero(dataset.train_labels == 7)[0]
  np.testing.assert_array_equal(
      subset.train_images[np.flatnonzero(subset.train_labels == 7)[0]],
      dataset.train_images[first_horse])
  np.testing.assert_array_equal(subset.test_images[:3],
                                dataset.test_images[:3])


def test_real_fashion_mnist_loads():
  data_dir = _shared_data_or_skip('fashion-mnist')
  dataset = data.load_dataset('fashion_mnist', data_dir=data_dir)
  assert dataset.train_images.shape == (60000, 28, 28, 1)
  assert dataset.test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(dataset.train_labels),
                                np.full(10, 6000))
  np.testing.assert_allclose(dataset.train_images.mean() / 255,
                             data.DATASETS['fashion_mnist'].mean[0], atol=1e-3)


def test_labels_out_of_range_name_the_dataset_and_folder(tmp_path):
  record = bytes([12]) + bytes(3072)  # label 12 in a 10-class dataset
  folder = tmp_path / 'cifar-10-batches-bin'
  for name in CIFAR10_FILES:
    _write(str(folder / name), record)
  with pytest.raises(ValueError, match=rf'labels of cifar10 \(files in {tmp_path}\) must be in '
                     r'0\.\.9, found 12\.\.12'):
    data.load_dataset('cifar10', data_dir=str(tmp_path))


@pytest.mark.parametrize('name', ['cifar10', 'fashion_mnist'])
def test_damaged_archives_name_the_file(tmp_path, name):
  if name == 'cifar10':
    _write_cifar10(str(tmp_path), as_archive=True)
    path = tmp_path / 'cifar-10-binary.tar.gz'
  else:
    _write_fashion_mnist(str(tmp_path))
    path = tmp_path / 'train-images-idx3-ubyte.gz'
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])  # a download cut short
  with pytest.raises(IOError, match=rf'{path} is damaged .*download it again'):
    data.load_dataset(name, data_dir=str(tmp_path))


def test_archives_are_checked_once_against_the_official_checksum(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv('PCP_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  (tmp_path / 'data').mkdir()
  _write_cifar10(str(tmp_path / 'data'), as_archive=True)
  path = str(tmp_path / 'data' / 'cifar-10-binary.tar.gz')
  # The loader checks the archives it reads: these test files are not the official ones.
  data.load_dataset('cifar10', data_dir=str(tmp_path / 'data'))
  assert f'{path} does not match the official sha256 checksum' in caplog.text
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  official = downloads.RemoteFile('https://example.org/c.tar.gz', 'c.tar.gz', 'sha256',
                                 digest)
  hashed = []
  new = hashlib.new
  monkeypatch.setattr(hashlib, 'new', lambda *a: hashed.append(a) or new(*a))
  caplog.clear()
  assert downloads.verify(official, path) and downloads.verify(official, path)
  assert len(hashed) == 1 and not caplog.text  # remembered: the file is read once
  with open(path, 'r+b') as f:  # one byte changed: a new version of the file
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 1]))
  assert not downloads.verify(official, path)
  assert f'{path} does not match the official sha256 checksum' in caplog.text
