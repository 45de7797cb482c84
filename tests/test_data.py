"""Datasets read from their real on-disk formats, subsets, and the batched augmentation."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from kd_cli.cli import config_dir
from kd_cli.config import register_model_groups
from kd_cli.data import load_data, random_crop_flip, read_idx, stratified_subset
from kd_cli.errors import KdError

register_model_groups()


def cfg_for(dataset, root, *extra):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", [f"dataset={dataset}", f"data.root={root}", "data.download=false", *extra])


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(path, images, gz)
    np.testing.assert_array_equal(read_idx(path), images)


def test_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    data = load_data(cfg_for("mnist", tmp_path, "dataset.system_dirs=[]"))
    assert data.train_x.shape == (40, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_y.tolist() == [i % 10 for i in range(20)]


def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, classes: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % classes for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_in_its_python_pickle_format(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", {**{f"data_batch_{i}": 20 for i in range(1, 6)}, "test_batch": 10},
                b"labels", 10)
    data = load_data(cfg_for("cifar10", tmp_path))
    assert data.train_x.shape == (100, 3, 32, 32) and len(data.test_y) == 10
    assert data.spec.num_classes == 10 and data.mean.shape == (1, 3, 1, 1)


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", {"train": 200, "test": 100}, b"fine_labels", 100)
    data = load_data(cfg_for("cifar100", tmp_path))
    assert data.train_y.max().item() == 99 and data.spec.num_classes == 100


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(KdError, match="unreadable or corrupt"):
        load_data(cfg_for("cifar100", tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(KdError, match=f"cifar10 not found in {tmp_path}/cifar-10-batches-py; set data.root"):
        load_data(cfg_for("cifar10", tmp_path))


def test_corrupt_idx_file_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{prefix}-{kind}-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(KdError, match="unreadable or corrupt"):
        load_data(cfg_for("mnist", tmp_path, "dataset.system_dirs=[]"))


def _mnist_files(raw: Path, train_images: int = 40, train_labels: int = 40) -> None:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, images, labels in (("train", train_images, train_labels), ("t10k", 20, 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (images, 28, 28)), gz=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(labels) % 10, gz=True)


def test_a_gzip_file_damaged_inside_is_reported(tmp_path):
    """The gzip header intact, its compressed stream not: zlib's own error, as one line."""
    raw = tmp_path / "MNIST" / "raw"
    _mnist_files(raw)
    damaged = raw / "train-images-idx3-ubyte.gz"
    content = bytearray(damaged.read_bytes())
    content[10:12] = bytes(b ^ 0xFF for b in content[10:12])  # the first deflate block: "invalid block type"
    damaged.write_bytes(bytes(content))
    with pytest.raises(KdError, match=f"dataset file {damaged} is unreadable or corrupt"):
        load_data(cfg_for("mnist", tmp_path, "dataset.system_dirs=[]"))


@pytest.mark.parametrize("images, labels", [(40, 20), (20, 40)])
def test_image_and_label_files_that_do_not_pair_up_are_refused(tmp_path, images, labels):
    """Fewer labels would fail on an index, more would pair images with the wrong labels silently."""
    _mnist_files(tmp_path / "MNIST" / "raw", images, labels)
    with pytest.raises(KdError, match=rf"train-labels-idx1-ubyte.gz do not match \(images of shape \({images}, 28, 28\), "
                                      rf"labels of shape \({labels},\); expected N x 28 x 28 and N\)"):
        load_data(cfg_for("mnist", tmp_path, "dataset.system_dirs=[]"))


def test_stratified_subset_keeps_class_balance():
    labels = torch.arange(1000) % 10
    idx = stratified_subset(labels, 0.1, seed=3)
    assert len(idx) == 100
    assert torch.bincount(labels[idx]).tolist() == [10] * 10
    assert torch.equal(idx, stratified_subset(labels, 0.1, seed=3))
    assert not torch.equal(idx, stratified_subset(labels, 0.1, seed=4))


def test_fraction_subsets_fashion_mnist(fashion_mnist):
    data = load_data(cfg_for("fashion_mnist", "/nonexistent", "data.fraction=0.1", "data.test_fraction=0.5"))
    assert len(data.train_y) == 6000 and len(data.test_y) == 5000
    assert torch.bincount(data.train_y).tolist() == [600] * 10


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (512, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is detectable
    out = random_crop_flip(images, padding=2, flip=True, generator=gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips, offsets = 0, set()
    for i in range(len(images)):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, "every output is a crop of the padded image, possibly flipped"
        dy, dx, f = matches[0]
        flips += f
        offsets.add((dy, dx))
    assert len(offsets) == 25  # every offset in [0, 2 * padding] occurs
    assert 0.4 < flips / len(images) < 0.6  # flipped with probability 1/2


def test_no_flip_when_disabled():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 1, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, padding=0, flip=False, generator=gen)
    assert torch.equal(out, images)


def test_validation_split_is_held_out_of_training_and_fixed(fashion_mnist):
    with_val = load_data(cfg_for("fashion_mnist", "/nonexistent", "data.val_fraction=0.1", "data.fraction=0.5", "seed=3"))
    other_seed = load_data(cfg_for("fashion_mnist", "/nonexistent", "data.val_fraction=0.1", "data.fraction=0.5", "seed=4"))
    assert len(with_val.val_y) == 6000 and torch.bincount(with_val.val_y).tolist() == [600] * 10
    assert len(with_val.train_y) == 27000  # half of the 54,000 images left after the split
    assert torch.equal(with_val.val_x, other_seed.val_x)  # every run of a search is judged on the same images
    val_images = {bytes(x.numpy()) for x in with_val.val_x}
    assert not any(bytes(x.numpy()) in val_images for x in with_val.train_x[:3000])
    assert load_data(cfg_for("fashion_mnist", "/nonexistent")).val_y is None
    with pytest.raises(KdError, match="data.val_fraction=0.99999 holds out all 60000 training images of fashion_mnist"):
        load_data(cfg_for("fashion_mnist", "/nonexistent", "data.val_fraction=0.99999"))


def test_a_failed_download_is_one_line_and_leaves_no_empty_folders_behind(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train, download):  # what torchvision does without a network: folders first, then fail
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        # torchvision's MNIST reports each mirror it tried on a line of its own
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "kept").mkdir()
    cfg = cfg_for("cifar10", tmp_path / "new" / "data", "data.download=true")
    with pytest.raises(KdError, match="could not download cifar10") as error:
        load_data(cfg)
    assert "\n" not in str(error.value) and "Tried https://a/, got: <urlopen error" in str(error.value)
    assert f"put the files in {tmp_path / 'new' / 'data' / 'cifar-10-batches-py'} and set data.download=false" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_an_error_joins_the_lines_it_quotes_and_keeps_the_spaces_it_quotes():
    error = KdError("cannot read 'my  data.csv':\n  torch says:\n\nbad header\n")
    assert str(error) == "kd: error: cannot read 'my  data.csv': torch says: bad header"


def test_a_null_validation_fraction_holds_nothing_out(fashion_mnist):
    data = load_data(cfg_for("fashion_mnist", "/nonexistent", "data.val_fraction=null", "data.fraction=0.1"))
    assert data.val_y is None and len(data.train_y) == 6000
