"""The official dataset files: where to fetch them and their published checksums.

`fetch` downloads a file and moves it into place only once it matches; `verify` checks a copy
already on disk, once per file version.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from typing import Optional

from absl import logging


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One official download: its URL, its path under data_dir and its checksum."""
  url: str
  filename: str
  algorithm: str  # a hashlib name: 'sha256' or 'md5'
  digest: str
  size: Optional[int] = None


FASHION_DIR = 'fashion-mnist'  # under data_dir: MNIST's files have the same names
_FASHION_URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
FASHION_FILES = {  # name: md5
    'train-images-idx3-ubyte.gz': '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
    'train-labels-idx1-ubyte.gz': '25c81989df183df01b3e8a0aad5dffbe',
    't10k-images-idx3-ubyte.gz': 'bef4ecab320f06d8554ea6380940ec79',
    't10k-labels-idx1-ubyte.gz': 'bb300cfdad3c16e7a12a480ee83cd310',
}

FILES = {  # the official downloads of each dataset
    'cifar10': (RemoteFile(
        'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
        'cifar-10-binary.tar.gz', 'sha256',
        'c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd',
        size=170052171),),
    'cifar100': (RemoteFile(
        'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
        'cifar-100-binary.tar.gz', 'md5', '03b5dce01913d631647c71ecec9e9cb8'),),
    'fashion_mnist': tuple(
        RemoteFile(_FASHION_URL + name, os.path.join(FASHION_DIR, name), 'md5',
                   md5) for name, md5 in FASHION_FILES.items()),
}


class ChecksumError(IOError):
  """A downloaded file does not match its published size or checksum."""


def fetch(remote: RemoteFile, data_dir: str) -> str:
  """Fetches one file, verifies it and moves it into place; returns its path.

  The file is written to a temporary name beside its destination and renamed
  only once it matches, so a failed or interrupted download leaves nothing.
  """
  target = os.path.join(data_dir, remote.filename)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, partial = tempfile.mkstemp(
      dir=os.path.dirname(target), prefix=f'.{os.path.basename(target)}.',
      suffix='.part')
  try:
    hasher = hashlib.new(remote.algorithm)
    size = 0
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(
        remote.url, timeout=60) as response:
      while chunk := response.read(1 << 20):
        out.write(chunk)
        hasher.update(chunk)
        size += len(chunk)
    if remote.size is not None and size != remote.size:
      raise ChecksumError(f'{remote.url}: got {size} bytes, expected '
                          f'{remote.size}; the download is incomplete or not '
                          'the official file.')
    if hasher.hexdigest() != remote.digest:
      raise ChecksumError(f'{remote.url}: {remote.algorithm} is '
                          f'{hasher.hexdigest()}, expected {remote.digest}; '
                          'the file is corrupt or not the official one.')
    os.replace(partial, target)
  except urllib.error.URLError as e:
    os.remove(partial)
    raise IOError(f'Could not download {remote.url}: {e}. Without internet, '
                  f'copy {remote.filename} into {data_dir} by hand.') from e
  except BaseException:
    os.remove(partial)
    raise
  return target


def _verified_files_path() -> str:
  folder = (os.environ.get('PCP_JAX_CACHE_DIR')
            or os.path.join(os.path.expanduser('~'), '.cache', 'pcp_jax'))
  return os.path.join(folder, 'verified_files.json')


def verify(remote: RemoteFile, path: str) -> bool:
  """Whether the file at `path` is the official `remote` (its checksum); a copy that is not is
  logged with a warning naming it. Checked once per file version (path, size, modification
  time), remembered in ~/.cache/pcp_jax/verified_files.json ($PCP_JAX_CACHE_DIR if set)."""
  stat = os.stat(path)
  key = f'{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{remote.digest}'
  cache_path = _verified_files_path()
  try:
    with open(cache_path) as f:
      known = json.load(f)
  except (OSError, ValueError):
    known = {}
  if key not in known:
    hasher = hashlib.new(remote.algorithm)
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        hasher.update(block)
    known[key] = hasher.hexdigest() == remote.digest
    try:
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      with open(cache_path + '.tmp', 'w') as f:
        json.dump(known, f)
      os.replace(cache_path + '.tmp', cache_path)
    except OSError:
      pass  # a read-only home: verified again next time
  if not known[key]:
    logging.warning('%s does not match the official %s checksum of %s: it is damaged or '
                    'another copy, so results may differ from published ones.', path,
                    remote.algorithm, remote.url)
  return known[key]
