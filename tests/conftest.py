import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs one worker per core), each worker and every `kd` it
# starts computes on one thread: two workers with two threads each would wait on each other's
# descheduled threads. Set before torch is imported anywhere in the worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")

# Small and quick, but real: Fashion-MNIST subsets and the seed's small MNIST-family networks.
TINY = [
    "dataset=fashion_mnist", "teacher=mnist_teacher", "student=mnist_student",
    "data.fraction=0.05", "data.test_fraction=0.1", "train.epochs=2",
    "train.optimizer=adam", "train.lr=1e-3", "measure.latency_runs=3", "measure.latency_warmup=1",
]


def kd_executable() -> str:
    """The installed console script (beside this Python first, so an unactivated venv works)."""
    beside = Path(sys.executable).parent / "kd"
    found = str(beside) if beside.exists() else shutil.which("kd")
    assert found, "the kd command is not installed; run `make install`"
    return found


@pytest.fixture
def kd(tmp_path):
    """Run the installed `kd` in a fresh folder, as a user would; returns the CompletedProcess."""

    def run(*args, check=True):
        env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0"}
        proc = subprocess.run([kd_executable(), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"kd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.cwd = tmp_path
    return run


@pytest.fixture(scope="session")
def fashion_mnist():
    assert (FASHION / "train-images-idx3-ubyte.gz").exists(), (
        f"Fashion-MNIST is missing from {FASHION}; `make install` adds it (Debian package dataset-fashion-mnist)"
    )
    return FASHION


@pytest.fixture(autouse=True)
def datasets_looked_for(monkeypatch) -> set:
    """The datasets an in-process preflight would find or download, recorded instead: its checks of
    configs are under test there, and the default dataset (CIFAR-10) cannot be downloaded here. The
    `kd` fixture's runs are processes of their own, so they find (or fail to find) the real files."""
    looked_for = set()
    monkeypatch.setattr("kd_cli.preflight.find_files", lambda dataset, root, download: looked_for.add(dataset.name))
    return looked_for


@pytest.fixture
def one_thread():
    """Torch on one thread for the test. The models in such tests are tiny, and on a shared 2-core
    machine every multi-threaded operation can wait for a descheduled thread (10x slower tests);
    comparisons hold at any thread count, as long as both sides use the same one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar(request, tmp_path_factory):
    """Exactly the test module's STEPS batches of BATCH training images, in CIFAR-10's on-disk format."""
    from kd_cli.bench.cifar10_files import write_fake_cifar10

    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), request.module.STEPS * request.module.BATCH)


def seeded_kd_setup(cfg):
    """(data, student, teacher, loss) of a config, each model built from its own fixed seed."""
    from kd_cli.data import load_data
    from kd_cli.engine import seed_everything
    from kd_cli.losses import build_loss
    from kd_cli.models import build_model

    data = load_data(cfg)
    seed_everything(0)
    student = build_model(cfg.student, data.spec)
    seed_everything(1)
    teacher = build_model(cfg.teacher, data.spec)
    return data, student, teacher, build_loss(cfg)


def tutorial_config(root, batch_size: int, student: str, teacher: str | None = None, epochs: int = 1, extra=()):
    """`kd distill` (with a teacher: the tutorial's CE + KD) or `kd train`, with the bench's tutorial recipe
    on the CIFAR-10-format files at `root`, extras last."""
    from kd_cli.bench.sides import compose_config, tutorial_overrides
    from kd_cli.bench.tutorial import ALPHA, T

    overrides = [*tutorial_overrides(root, "cpu", epochs, augment=False, batch_size=batch_size), f"student={student}"]
    if teacher:
        return compose_config("distill", [*overrides, f"teacher={teacher}", "loss=kd", f"alpha={ALPHA}", f"T={T}", *extra])
    return compose_config("train", [*overrides, *extra])
