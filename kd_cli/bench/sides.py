"""The two sides of a case, each built and run in a process of its own.

A side's process is started fresh (spawned, not forked), so neither side inherits the other's
allocator settings, thread pools or kernel caches: kd's engine tunes the process it trains in (it
keeps freed memory for reuse, which alone made the plain loop 1.4x faster when the two shared a
process), and the plain loop must run as a user's script would.
"""

import copy
import dataclasses
import io
import logging
import multiprocessing
import time
import traceback
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_cli.bench.cost import own_cpu_seconds, train_flops_per_image
from kd_cli.bench.tutorial import ALPHA, BATCH_SIZE, LR, T, plain_ce_step, plain_dataset, plain_epoch, plain_kd_step
from kd_cli.data import ImageData
from kd_cli.measure import synchronize


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    teacher: str | None  # None: the student is trained alone with cross-entropy
    student: str
    augment: bool
    images: int  # per round: sized so that `make bench` takes about 10 minutes on a busy 2-core CPU
    kd_epochs: int  # epochs of each kd fit (see KdSide)
    cpu_target: float  # kd / plain on a CPU
    gpu_target: float | None = None  # kd / plain on a GPU
    gpu_peak_fraction: float | None = None  # kd's FLOP/s over the bf16 matmul FLOP/s on a GPU


CASES = {
    # The tutorial trains 10 epochs; the teacher cache is computed once per fit, so kd's side runs a
    # fit of that length and pays for its cache the way a user of the tutorial's recipe would.
    "1": Case("1", "1-deepnn-lightnn-kd", "deepnn", "lightnn", False, 2048, 10, 20.0, gpu_target=10.0),
    "2": Case("2", "2-resnet18-light6-kd-aug", "resnet18", "light6", True, 384, 1, 2.0),
    # Teacher training: kd's default recipe for CIFAR augments, and so does anyone's ResNet-18 recipe.
    "3": Case("3", "3-resnet18-ce-aug", None, "resnet18", True, 256, 1, 1.3, gpu_peak_fraction=0.25),
}


def compose_config(command: str, overrides: list[str]):
    """kd's config as `kd COMMAND OVERRIDES` composes it."""
    from hydra import compose, initialize_config_dir

    from kd_cli.cli import config_dir
    from kd_cli.config import register_model_groups, validate

    register_model_groups()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(command, overrides)
    validate(cfg)
    return cfg


def tutorial_overrides(root: Path, device: str, epochs: int, augment: bool, batch_size: int = BATCH_SIZE) -> list[str]:
    """The tutorial's recipe in kd's keys (Adam 1e-3, no weight decay, no schedule, batch 128)."""
    return [f"data.root={root}", "data.download=false", f"data.augment={str(augment).lower()}", f"device={device}",
            "seed=0", f"train.epochs={epochs}", f"train.batch_size={batch_size}", "train.optimizer=adam",
            f"train.lr={LR}", "train.weight_decay=0", "train.schedule=constant"]


def subset(data: ImageData, n: int) -> ImageData:
    return dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


class _Side:
    """What both sides share: the config and the seeded initial weights of every model."""

    def __init__(self, case: Case, root: Path, device_name: str):
        from kd_cli.engine import resolve_device, seed_everything
        from kd_cli.models import ImageSpec, build_model

        self.case = case
        command = "distill" if case.teacher else "train"
        overrides = tutorial_overrides(root, device_name, case.kd_epochs, case.augment) + [f"student={case.student}"]
        if case.teacher:
            overrides += [f"teacher={case.teacher}", "loss=kd", f"alpha={ALPHA}", f"T={T}"]
        self.cfg = compose_config(command, overrides)
        self.device = resolve_device(self.cfg.device)
        self.spec = ImageSpec.of(self.cfg.dataset)
        # One set of initial weights for both sides (each builds the same seeded models) and every round.
        seed_everything(self.cfg.seed)
        self.student_init = build_model(self.cfg.student, self.spec).state_dict()
        self.teacher = None
        if case.teacher:
            seed_everything(self.cfg.seed + 1)
            self.teacher = build_model(self.cfg.teacher, self.spec).eval()

    def fresh_student(self) -> torch.nn.Module:
        from kd_cli.models import build_model

        model = build_model(self.cfg.student, self.spec)
        model.load_state_dict(self.student_init)
        return model


class KdSide(_Side):
    """kd's own code path: a composed config, `load_data`, the catalogue, `build_loss`, `engine.fit`."""

    def __init__(self, case: Case, root: Path, device_name: str):
        from kd_cli.data import load_data

        super().__init__(case, root, device_name)
        self.data = load_data(self.cfg).to(self.device)

    def _fit(self, data: ImageData, epochs: int) -> tuple[float, float]:
        from kd_cli.data import normalize
        from kd_cli import teacher_outputs
        from kd_cli.engine import fit
        from kd_cli.losses import build_loss
        from kd_cli.losses.hinton import CrossEntropy

        student = self.fresh_student()
        self.cfg.train.epochs = epochs
        if self.case.teacher:
            # As `kd distill` does: both models on the device before the loss looks at them.
            student, teacher = student.to(self.device), copy.deepcopy(self.teacher).to(self.device)
            loss_fn = build_loss(self.cfg)
            loss_fn.attach(student, teacher, normalize(data.train_x[:2], data), len(data.train_y))
        else:
            teacher, loss_fn = None, CrossEntropy()
        # Every round pays for its own teacher cache, as the tutorial's one run would: the fits of a
        # sweep share one (teacher_outputs.py), and these rounds would too. (Only `kd distill` keeps them on disk.)
        teacher_outputs.forget()
        with redirect_stdout(io.StringIO()):  # the progress bar would redraw on every step of every round
            result = fit(student, loss_fn, data, self.cfg, self.device, teacher=teacher, label=f"bench{self.case.key}")
        # Wall time of the whole fit: the cache, evaluation of the (10-image) test split and setup included.
        return epochs * len(data.train_y) / result.train_time_s, result.train_img_per_s

    def warm_up(self) -> None:
        engine_log = logging.getLogger("kd_cli.engine")
        engine_log.setLevel(logging.INFO)  # kd's decisions (cache, precision) once, in the warm-up, not every round
        self._fit(subset(self.data, min(len(self.data.train_y), 2 * BATCH_SIZE)), 1)
        engine_log.setLevel(logging.WARNING)

    def round(self) -> tuple[float, float]:
        return self._fit(self.data, self.case.kd_epochs)

    def flops(self) -> tuple[float, float]:
        """FLOPs per trained image as kd executes them (a cached teacher runs once per fit) and as the plain loop does."""
        cached = self.case.teacher is not None and not self.case.augment
        student = self.fresh_student()
        return (train_flops_per_image(student, self.teacher, 1.0 / self.case.kd_epochs if cached else 1.0, self.spec),
                train_flops_per_image(student, self.teacher, 1.0, self.spec))


class PlainSide(_Side):
    """The tutorial's loop over torchvision's CIFAR10 and a DataLoader with 2 workers."""

    def __init__(self, case: Case, root: Path, device_name: str):
        super().__init__(case, root, device_name)
        self.dataset = plain_dataset(root, self.cfg.dataset.mean, self.cfg.dataset.std, case.augment)

    def _epoch(self, dataset) -> float:
        from torch.utils.data import DataLoader

        student = self.fresh_student().to(self.device)
        student.train()
        optimizer = torch.optim.Adam(student.parameters(), lr=LR)
        if self.teacher is not None:
            teacher = copy.deepcopy(self.teacher).to(self.device).eval()
            step = lambda x, y: plain_kd_step(teacher, student, optimizer, x, y)  # noqa: E731
        else:
            step = lambda x, y: plain_ce_step(student, optimizer, x, y)  # noqa: E731
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2)
        start = time.perf_counter()
        seen = plain_epoch(loader, step, self.device)
        synchronize(self.device)
        # One epoch: every epoch of this loop costs the same (its workers are started anew each epoch too).
        return seen / (time.perf_counter() - start)

    def warm_up(self) -> None:
        from torch.utils.data import Subset

        self._epoch(Subset(self.dataset, range(min(len(self.dataset), 2 * BATCH_SIZE))))

    def round(self) -> float:
        return self._epoch(self.dataset)


def _serve(side_class, case: Case, root: Path, device_name: str, start_method: str, conn) -> None:
    """A side's process: build the side, then call the methods the bench names until it sends None."""
    # A spawned process spawns its own children by default; the DataLoader's workers start the way
    # they would in a user's script (fork on Linux), not re-importing torch for every epoch.
    multiprocessing.set_start_method(start_method, force=True)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kd_cli").setLevel(logging.INFO)
    try:
        side = side_class(case, root, device_name)
        conn.send((True, None, 0.0))
        while (method := conn.recv()) is not None:
            start = own_cpu_seconds()
            result = getattr(side, method)()
            conn.send((True, result, own_cpu_seconds() - start))
    except Exception:
        conn.send((False, traceback.format_exc(), 0.0))
    finally:
        conn.close()


class SideProcess:
    """One side in a spawned process; calling it runs a method there and returns (result, CPU seconds used)."""

    def __init__(self, side_class, case: Case, root: Path, device_name: str):
        context = multiprocessing.get_context("spawn")
        self.name = f"{side_class.__name__} (case {case.key})"
        self.conn, child_end = context.Pipe()
        # Not a daemon: daemonic processes may not start the DataLoader's worker processes.
        self.process = context.Process(target=_serve, args=(side_class, case, root, device_name, multiprocessing.get_start_method(), child_end),
                                       name=self.name)
        self.process.start()
        child_end.close()
        self._receive()

    def _receive(self):
        try:
            ok, result, cpu_seconds = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise RuntimeError(f"the bench's {self.name} process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"the bench's {self.name} process failed:\n{result}")
        return result, cpu_seconds

    def __call__(self, method: str):
        self.conn.send(method)
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
