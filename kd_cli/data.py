"""Datasets as in-memory uint8 tensors, and batches made from them on the device.

Whole datasets fit in memory (Fashion-MNIST is 47 MB, CIFAR-10 150 MB), so there is no per-image
PIL work and no DataLoader: a batch is an index into one tensor, then normalised and augmented in
one batched operation on the training device.
"""

import gzip
import logging
import pickle
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from kd_cli.errors import KdError
from kd_cli.models import ImageSpec

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    """Train and test images (N, C, H, W) uint8 and labels (N,) int64, plus how to normalise them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1) float, in [0, 1] units
    std: torch.Tensor
    spec: ImageSpec
    val_x: torch.Tensor | None = None  # held out of the training set (data.val_fraction), for model selection
    val_y: torch.Tensor | None = None

    def to(self, device: torch.device) -> "ImageData":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return ImageData(**moved)


# ---------------------------------------------------------------- reading the on-disk formats

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, EOFError, ValueError, IndexError, zlib.error) as e:
        raise KdError(f"dataset file {path} is unreadable or corrupt ({e}); delete it and download again") from e


def _idx_pair(images_path: Path, labels_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images (N x size x size) and labels (N) of one split; files that do not pair up are refused."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    paired = images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels)
    if paired and images.shape[1] == images.shape[2] != size:  # whole files, of another dataset's images
        raise KdError(f"dataset files {images_path} and {labels_path} hold {images.shape[1]} x {images.shape[2]} "
                      f"images, not this dataset's {size} x {size}: they are another dataset's; point data.root "
                      f"at this one's files, or move them away and download it")
    if images.ndim != 3 or images.shape[1:] != (size, size) or labels.ndim != 1 or len(images) != len(labels):
        raise KdError(f"dataset files {images_path} and {labels_path} do not match (images of shape {images.shape}, "
                      f"labels of shape {labels.shape}; expected N x {size} x {size} and N); delete them and download again")
    return images, labels


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _folders(cfg_dataset, root: Path) -> list[Path]:
    """Where the dataset's files may be. IDX: torchvision's layout under data.root, data.root itself,
    system copies; CIFAR: its folder under data.root."""
    if cfg_dataset.format == "cifar":
        return [root / cfg_dataset.folder]
    return [root / cfg_dataset.torchvision_class / "raw", root, *map(Path, cfg_dataset.get("system_dirs", []))]


def _files_in(cfg_dataset, folder: Path) -> dict[str, list[Path]] | None:
    """Each split's files of the dataset in `folder`, or None where one is missing."""
    if cfg_dataset.format == "cifar":
        names = {"train": cfg_dataset.train_files, "test": cfg_dataset.test_files}
        files = {split: [folder / n if (folder / n).is_file() else None for n in split_names]
                 for split, split_names in names.items()}
    else:
        files = {split: [_find_idx(folder, stem) for stem in stems] for split, stems in _IDX_FILES.items()}
    return files if all(p is not None for paths in files.values() for p in paths) else None


def find_files(cfg_dataset, root: Path, download: bool) -> dict[str, list[Path]]:
    """The dataset's files, split -> paths; downloaded first where they are missing and `download` allows."""
    folders = _folders(cfg_dataset, root)
    for folder in folders:
        if (files := _files_in(cfg_dataset, folder)) is not None:
            log.info("%s from %s", cfg_dataset.name, folder)
            return files
    if download:
        _torchvision_download(cfg_dataset, root, folders[0])
        return find_files(cfg_dataset, root, download=False)
    if cfg_dataset.format == "cifar":
        raise KdError(f"{cfg_dataset.name} not found in {folders[0]}; set data.root=DIR to a folder that has "
                      f"'{cfg_dataset.folder}', or data.download=true with internet access")
    raise KdError(f"{cfg_dataset.name} not found (looked in {', '.join(map(str, folders))}); set data.root=DIR to a "
                  f"folder that has it, or data.download=true with internet access")


def _load_idx(cfg_dataset, files: dict[str, list[Path]]):
    split_arrays = {split: _idx_pair(x, y, cfg_dataset.image_size) for split, (x, y) in files.items()}
    return {split: (x[:, None, :, :], y) for split, (x, y) in split_arrays.items()}


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they hold (NumPy arrays), so a crafted file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")


def read_cifar_batch(path: Path, label_key: str):
    """One file of the CIFAR python format: a pickled dict with b"data" (N x 3072) and labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key.encode()], dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return images, labels
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise KdError(f"dataset file {path} is unreadable or corrupt ({e}); delete it and download again") from e


def _load_cifar(cfg_dataset, files: dict[str, list[Path]]):
    out = {}
    for split, paths in files.items():
        parts = [read_cifar_batch(path, cfg_dataset.label_key) for path in paths]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def _torchvision_download(cfg_dataset, root: Path, files_in: Path) -> None:
    """torchvision's download into `root`, which puts the files in `files_in`."""
    import torchvision

    cls = getattr(torchvision.datasets, cfg_dataset.torchvision_class)
    # On the terminal: kd's checks before a run download a missing dataset, before any log exists.
    print(f"kd: downloading {cfg_dataset.name} into {root} (data.download=true)", file=sys.stderr, flush=True)
    created = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, socket errors)
        _remove_empty(created)
        raise KdError(
            f"could not download {cfg_dataset.name} into {root} ({type(e).__name__}: {e}); "
            f"check the internet connection, or put the files in {files_in} and set data.download=false"
        ) from e


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders a failed download created (`created`: the deepest first) where it left nothing."""
    for folder in created:
        if not folder.is_dir():
            continue
        for inner in sorted(folder.rglob("*"), reverse=True):  # a folder's contents sort after it
            if inner.is_dir() and not any(inner.iterdir()):
                inner.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()


_LOADERS = {"idx": _load_idx, "cifar": _load_cifar}


@lru_cache(maxsize=4)
def _load_arrays(dataset_key: str, cfg_dataset_yaml: str, root: str, download: bool):
    from omegaconf import OmegaConf

    cfg_dataset = OmegaConf.create(cfg_dataset_yaml)
    return _LOADERS[cfg_dataset.format](cfg_dataset, find_files(cfg_dataset, Path(root).expanduser(), download))


# ---------------------------------------------------------------- subsets and batches


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of each class (at least one per class), chosen with `seed`."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        picked.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(picked).sort().values


def load_data(cfg) -> ImageData:
    """The dataset of `cfg.dataset`, subset by `cfg.data.fraction` / `cfg.data.test_fraction`, on the CPU."""
    from omegaconf import OmegaConf

    ds, data = cfg.dataset, cfg.data
    arrays = _load_arrays(ds.name, OmegaConf.to_yaml(ds), str(data.root), bool(data.download))
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    # Copies: the cached arrays stay untouched, and torch wants writable memory.
    train_x, test_x = torch.tensor(train_x), torch.tensor(test_x)
    train_y, test_y = torch.tensor(train_y, dtype=torch.int64), torch.tensor(test_y, dtype=torch.int64)
    # The validation split is fixed (seed 0) so every configuration of a search is judged on the same
    # images; the training subset follows the run's seed; the test subset is fixed so every run is scored alike.
    val = {}
    if (data.get("val_fraction") or 0) > 0:  # null: no validation split, as 0
        val_idx = stratified_subset(train_y, data.val_fraction, 0)
        val = {"val_x": train_x[val_idx], "val_y": train_y[val_idx]}
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[val_idx] = False
        if not keep.any():
            raise KdError(f"data.val_fraction={data.val_fraction} holds out all {len(keep)} training images of "
                          f"{ds.name}; lower it (0.1 holds out a tenth)")
        train_x, train_y = train_x[keep], train_y[keep]
    train_idx = stratified_subset(train_y, data.fraction, cfg.seed)
    test_idx = stratified_subset(test_y, data.test_fraction, 0)
    stats = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
    return ImageData(
        train_x=train_x[train_idx], train_y=train_y[train_idx],
        test_x=test_x[test_idx], test_y=test_y[test_idx],
        mean=stats(ds.mean), std=stats(ds.std),
        spec=ImageSpec.of(ds), **val,
    )


def normalize(images: torch.Tensor, data: ImageData) -> torch.Tensor:
    return (images.float() / 255.0 - data.mean) / data.std


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy, and a horizontal flip with probability 1/2.

    The same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip(), done
    for the whole batch at once by gathering shifted row/column indices.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    rows = (dy + torch.arange(h, device=device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx + torch.arange(w, device=device))
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    """Shuffled index batches for one epoch; a last batch of one image is dropped (BatchNorm needs two)."""
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        if len(idx) > 1:
            yield idx
