"""Random pixels written in CIFAR-10's on-disk format (cifar-10-batches-py), readable by kd and by torchvision."""

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Str(bytes):
    """A Python 2 `str`, which is what CIFAR-10's pickles hold.

    The format was written by Python 2, and its readers rely on that: kd unpickles with
    encoding="bytes" and looks up b"data", torchvision with encoding="latin1" and looks up "data".
    Only a Python 2 string (pickle opcode BINSTRING) turns into either, so a Python 3 pickle of
    str or bytes keys would be read by one of them and not the other.
    """


class _Global:
    """A module-level name written as the GLOBAL opcode exactly as Python 2's numpy wrote it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function be callable; this one is only ever written
        raise TypeError(f"{self.module}.{self.name} is a pickling placeholder")


_RECONSTRUCT = _Global("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _Global("numpy", "ndarray")
_DTYPE = _Global("numpy", "dtype")


class _Py2Pickler(pickle._Pickler):
    """The pure-Python pickler (its dispatch table can be extended), protocol 2, Python 2 strings and arrays."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str
    dispatch[_Global] = _save_global

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            assert obj.dtype == np.uint8, "CIFAR batches hold uint8 pixels"
            state = (1, obj.shape, obj.dtype, False, _Py2Str(np.ascontiguousarray(obj).tobytes()))
            return _RECONSTRUCT, (_NDARRAY, (0,), _Py2Str(b"b")), state
        if isinstance(obj, np.dtype):
            return _DTYPE, (_Py2Str(b"u1"), 0, 1), (3, _Py2Str(b"|"), None, None, None, -1, -1, 0)
        return NotImplemented


def _py2(value):
    """Strings (keys, names) as Python 2 strings, recursively."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump_py2(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def write_fake_cifar10(root: Path, n_train: int, n_test: int = 10, seed: int = 0) -> Path:
    """Random pixels in cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) under `root`.

    Labels cycle through the ten classes, so stratified subsets and per-class counts behave as on
    the real data. Returns `root`.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n_train, 6).round().astype(int)
    batches = [(f"data_batch_{i + 1}", f"training batch {i + 1} of 5", range(bounds[i], bounds[i + 1])) for i in range(5)]
    batches.append(("test_batch", "testing batch 1 of 1", range(n_test)))
    for name, label, indices in batches:
        pixels = rng.integers(0, 256, (len(indices), 3072), dtype=np.uint8)
        _dump_py2(folder / name, {"batch_label": label, "labels": [i % 10 for i in indices], "data": pixels,
                                  "filenames": [f"random_{i:05d}.png" for i in indices]})
    _dump_py2(folder / "batches.meta", {"num_cases_per_batch": max(1, n_train // 5), "label_names": CIFAR10_LABELS,
                                        "num_vis": 3072})
    return Path(root)
