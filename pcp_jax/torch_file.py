"""Reads a PyTorch checkpoint (`torch.save`'s `.pt`/`.pth`) into numpy arrays, without torch.

Two formats: the zip archive of PyTorch >= 1.6 (`<name>/data.pkl`, a pickle whose tensors
point at raw storages `<name>/data/<key>`) and the legacy stream of PyTorch before 1.6 (a magic
number, the protocol, the system's sizes, the pickle, its storage keys, then each storage as
an element count and raw bytes). The pickle is read by an unpickler that builds only dicts,
lists, numbers, strings and tensors: anything else (a whole pickled model, an optimiser's
class, arbitrary code) is refused with a line naming the file.
"""

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile

import ml_dtypes
import numpy as np

# The legacy stream's first pickle, and the protocol version after it (torch/serialization.py).
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

# Storage classes by name (torch.FloatStorage, torch.cuda.FloatStorage, ...): element types.
STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'BFloat16Storage': ml_dtypes.bfloat16,
}
NOT_A_CHECKPOINT = 'not a PyTorch checkpoint (neither a zip archive nor the legacy format)'
HOW_TO_CONVERT = ("with torch: torch.save(torch.load(path, map_location='cpu', "
                  "weights_only=False).state_dict(), 'weights.pt')")


class _Storage:
  """A storage named by a pickle: its element type and key; its array once read."""

  def __init__(self, dtype, key, numel):
    self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
    self.array = None


class _Tensor:
  """A tensor rebuilt by a pickle before its storage is read (the legacy stream stores the
  data after the pickle): a strided view of a storage."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), stride

  def to_numpy(self) -> np.ndarray:
    data = self.storage.array
    if not self.size:
      return np.array(data[self.offset])
    itemsize = data.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, [s * itemsize for s in self.stride]).copy()


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_REBUILD = {('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
            ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
            ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
            ('collections', 'OrderedDict'): collections.OrderedDict}


class _Unpickler(pickle.Unpickler):
  """Builds what a state dict holds; `storage(record)` answers the pickle's storage ids."""

  def __init__(self, file, path, storage):
    super().__init__(file, encoding='utf-8')
    self.path, self.storage = path, storage

  def find_class(self, module, name):
    if (module, name) in _REBUILD:
      return _REBUILD[(module, name)]
    if module in ('torch', 'torch.cuda') and name in STORAGE_DTYPES:
      return STORAGE_DTYPES[name]
    raise ValueError(f'{self.path}: holds a {module}.{name}, which this reader does not build '
                     '(it reads tensors, numbers, strings, lists and dicts: a state dict). If '
                     f'it is a whole pickled model, save its state dict {HOW_TO_CONVERT}.')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise ValueError(f'{self.path}: holds a pickled {pid[0] if pid else pid!r} object, not '
                       f'a state dict; save its state dict {HOW_TO_CONVERT}.')
    return self.storage(pid[1:])


def _materialise(obj):
  """`obj` with every `_Tensor` replaced by its numpy array."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _zip_prefix(archive: zipfile.ZipFile, path: str) -> str:
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise ValueError(f'{path}: a zip file but not a PyTorch checkpoint (no <name>/data.pkl).')
  return pickles[0][:-len('data.pkl')]


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    prefix = _zip_prefix(archive, path)
    names = set(archive.namelist())
    order = (archive.read(prefix + 'byteorder').decode().strip()
             if prefix + 'byteorder' in names else 'little')
    storages = {}

    def storage(record):
      dtype, key = record[0], str(record[1])
      if key not in storages:
        if f'{prefix}data/{key}' not in names:
          raise ValueError(f'{path}: the pickle names storage {key}, which the archive lacks.')
        storages[key] = _Storage(dtype, key, record[3])
      return storages[key]

    obj = _Unpickler(io.BytesIO(archive.read(prefix + 'data.pkl')), path, storage).load()
    for s in storages.values():
      raw = archive.read(f'{prefix}data/{s.key}')
      if len(raw) < s.numel * s.dtype.itemsize:
        raise ValueError(f'{path}: storage {s.key} is cut short (a damaged file).')
      s.array = np.frombuffer(raw, s.dtype.newbyteorder('<' if order == 'little' else '>'),
                              count=s.numel).astype(s.dtype)
  return obj


def _read_legacy(f, path: str):
  def load():
    return _Unpickler(f, path, None).load()

  if load() != LEGACY_MAGIC or load() != LEGACY_PROTOCOL:
    raise ValueError(f'{path}: {NOT_A_CHECKPOINT}.')
  sys_info = load()
  order = '<' if sys_info.get('little_endian', True) else '>'
  storages = {}

  def storage(record):
    dtype, key, _, numel, view = record
    if view is not None:  # a view of a larger storage, as PyTorch < 0.4 saved some
      raise ValueError(f'{path}: holds storage views (PyTorch < 0.4), which this reader does '
                       f'not read; save its state dict {HOW_TO_CONVERT}.')
    return storages.setdefault(str(key), _Storage(dtype, str(key), numel))

  obj = _Unpickler(f, path, storage).load()
  for key in _Unpickler(f, path, None).load():
    s = storages.get(str(key))
    (numel,) = struct.unpack(order + 'q', f.read(8))
    raw = f.read(numel * s.dtype.itemsize) if s else b''
    if s is None or len(raw) != numel * s.dtype.itemsize:
      raise ValueError(f'{path}: storage {key} is missing or cut short (a damaged file).')
    s.array = np.frombuffer(raw, s.dtype.newbyteorder(order)).astype(s.dtype)
  return obj


def check(path: str) -> None:
  """A line naming `path` unless it is a PyTorch checkpoint file (its container only: the
  contents are read by `load`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      _zip_prefix(archive, path)
    return
  if tarfile.is_tarfile(path):
    raise ValueError(f'{path}: the tar format of PyTorch before 0.1.10, which this reader does '
                     f'not read; save its state dict {HOW_TO_CONVERT}.')
  with open(path, 'rb') as f:
    if f.read(2) != b'\x80\x02':  # the legacy stream starts with a protocol-2 pickle
      raise ValueError(f'{path}: {NOT_A_CHECKPOINT}.')


def load(path: str):
  """The object a `torch.save` file holds, its tensors numpy arrays (dtype kept)."""
  check(path)
  try:
    if zipfile.is_zipfile(path):
      return _materialise(_read_zip(path))
    with open(path, 'rb') as f:
      return _materialise(_read_legacy(f, path))
  except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not a readable PyTorch checkpoint ({e}).') from None


def state_dict(obj, path: str) -> dict:
  """The `{name: array}` state dict in what a checkpoint holds: the dict itself or its
  'state_dict' or 'model' entry, without DataParallel's 'module.' prefixes."""
  for key in ('state_dict', 'model'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f'{path}: holds no state dict (a dict of tensors, or one under '
                     f"'state_dict' or 'model'); found {keys}.")
  if all(k.startswith('module.') for k in obj):
    obj = {k[len('module.'):]: v for k, v in obj.items()}
  return dict(obj)
