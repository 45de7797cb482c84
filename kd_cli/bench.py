"""`make bench`: kd's engine against the plain PyTorch loop people write by hand, side by side.

Three cases, each with the same seeded weights, the same images (random pixels written in CIFAR-10's
on-disk format), batch size 128 and the same loss on both sides:

1. the PyTorch KD tutorial: DeepNN -> LightNN, CE + KD (T=2, CE 0.75 / KD 0.25), no augmentation;
2. ResNet-18 -> light6 with random crop + horizontal flip;
3. ResNet-18 trained alone with cross-entropy (a teacher's training), crop + flip.

The plain side is the tutorial's code: torchvision's CIFAR10 dataset (PIL images) -> ToTensor +
Normalize -> DataLoader(shuffle, 2 workers) -> teacher forward under no_grad every step ->
`loss.item()` every step. kd's side is kd's own code path: a config composed from kd's conf/ with
Hydra's compose API, `load_data`, the model catalogue, `build_loss` and `engine.fit`.

After a warm-up of both, the loops alternate over several rounds (their order flips every round,
so a slow drift of the shared machine does not favour one side); the table gives each side's
images/s, the median kd/plain ratio with its min-max, and kd's achieved FLOP/s against the
device's measured matmul FLOP/s.

    python -m kd_cli.bench [--cases 1,2,3] [--rounds 5] [--images N] [--device auto]
"""

import argparse
import copy
import csv
import io
import logging
import os
import pickle
import resource
import statistics
import struct
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.atomic import atomic_write_text
from kd_cli.data import ImageData

log = logging.getLogger("kd_cli.bench")

BATCH_SIZE = 128
T, ALPHA = 2.0, 0.25  # the tutorial's temperature; kd's alpha weights KD, so CE gets 1 - alpha = 0.75
LR = 1e-3  # the tutorial's Adam
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CSV_COLUMNS = ["case", "kd_img_per_s", "plain_img_per_s", "ratio", "ratio_min", "ratio_max",
               "kd_flops_per_s", "peak_matmul_flops_per_s", "device"]


# ---------------------------------------------------------------- CIFAR-10's on-disk format


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


def _torchvision_cifar10():
    from torchvision.datasets import CIFAR10

    class RandomPixelCIFAR10(CIFAR10):
        """torchvision's CIFAR10 reading our files: they have CIFAR-10's format but not its md5 sums.

        torchvision checks every batch file (and batches.meta) against the md5 of the real
        download and refuses anything else; the reading itself is left untouched.
        """

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return RandomPixelCIFAR10


def plain_dataset(root: Path, mean, std, augment: bool):
    """The tutorial's dataset: torchvision CIFAR10 -> (RandomCrop + flip) -> ToTensor -> Normalize."""
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))])
    return _torchvision_cifar10()(root=str(root), train=True, download=False, transform=transform)


# ---------------------------------------------------------------- the plain loop (the tutorial's code)


def tutorial_kd_loss(student_logits, teacher_logits, labels, T: float, soft_target_loss_weight: float,
                     ce_loss_weight: float):
    """The tutorial's loss, in its own words: KL written out, summed and divided by the batch size."""
    soft_targets = F.softmax(teacher_logits / T, dim=-1)
    soft_prob = F.log_softmax(student_logits / T, dim=-1)
    soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T**2)
    label_loss = F.cross_entropy(student_logits, labels)
    return soft_target_loss_weight * soft_targets_loss + ce_loss_weight * label_loss


def plain_kd_step(teacher, student, optimizer, inputs, labels) -> float:
    optimizer.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    student_logits = student(inputs)
    loss = tutorial_kd_loss(student_logits, teacher_logits, labels, T, ALPHA, 1 - ALPHA)
    loss.backward()
    optimizer.step()
    return loss.item()  # the tutorial's running_loss += loss.item(): a host sync per step, as users write it


def plain_ce_step(model, optimizer, inputs, labels) -> float:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def plain_epoch(loader, step, device: torch.device) -> int:
    """One pass over `loader` with `step(inputs, labels)`; returns the images seen."""
    seen, running_loss = 0, 0.0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        running_loss += step(inputs, labels)
        seen += len(labels)
    return seen


# ---------------------------------------------------------------- kd's side


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
    return ImageData(data.train_x[:n], data.train_y[:n], data.test_x, data.test_y, data.mean, data.std, data.spec)


# ---------------------------------------------------------------- cost: FLOPs and the matmul peak


def train_flops_per_image(student: nn.Module, teacher: nn.Module | None, teacher_share: float, spec) -> float:
    """FLOPs of one student forward + backward, plus `teacher_share` teacher forwards, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from kd_cli.measure import count_flops

    model = copy.deepcopy(student).cpu().train()
    x = torch.randn(2, spec.channels, spec.size, spec.size)  # two images: BatchNorm needs more than one in training
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    flops = counter.get_total_flops() / 2
    if teacher is not None and teacher_share:
        flops += teacher_share * count_flops(copy.deepcopy(teacher).cpu(), (spec.channels, spec.size, spec.size))
    return float(flops)


def _best_seconds(fn, sync, repeats: int) -> float:
    for _ in range(2):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The best of `repeats` timings of one large matmul: what the device's kernels reach at best.

    On a CPU the same product is also timed through oneDNN, as a 1x1 convolution over a
    channels-last image (rows = pixels, columns = channels): torch.mm goes to MKL, which takes slow
    code paths on AMD CPUs (half of oneDNN's rate measured on an AVX-512 EPYC), and oneDNN is what
    kd's convolutions run on. The faster of the two is the peak.
    """
    n = 8192 if device.type == "cuda" else 2048
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rate = 2 * n**3 / _best_seconds(lambda: a @ b, sync, repeats)
    if device.type == "cpu":
        rows = 4096  # 16 images of 16x16 pixels
        x = torch.randn(16, n, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
        rate = max(rate, 2 * rows * n * n / _best_seconds(lambda: F.conv2d(x, w), sync, repeats))
    return rate


class OthersLoad:
    """How much of the machine other processes used while we measured (Linux; NaN elsewhere).

    The bench shares its CPU with whatever else runs. Busy CPU time of the whole system (/proc/stat)
    minus this process's own (its DataLoader workers included once reaped), over cores x wall time.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return busy, own, time.perf_counter()

    def fraction(self) -> float:
        end = self._sample()
        if self.start is None or end is None:
            return float("nan")
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    teacher: str | None  # None: the student is trained alone with cross-entropy
    student: str
    augment: bool
    images: int  # per round: sized so that `make bench` takes about 10 minutes on a busy 2-core CPU
    kd_epochs: int  # epochs of each kd fit (see run_case)
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


@dataclass
class CaseResult:
    case: Case
    kd: list[float]
    plain: list[float]
    kd_steps_only: list[float]
    load: list[float]  # the share of the CPU other processes used, per round
    flops_kd: float  # per trained image, as kd executes them
    flops_plain: float

    @property
    def ratios(self) -> list[float]:
        return [k / p for k, p in zip(self.kd, self.plain)]


def _quiet_fit(*args, **kwargs):
    """engine.fit with stdout away from the terminal: its progress bar would redraw on every step of every round."""
    from kd_cli.engine import fit

    with redirect_stdout(io.StringIO()):
        return fit(*args, **kwargs)


def run_case(case: Case, images: int, rounds: int, device_name: str, workdir: Path) -> CaseResult:
    from torch.utils.data import DataLoader, Subset

    from kd_cli.data import load_data, normalize
    from kd_cli.engine import resolve_device, seed_everything
    from kd_cli.losses import build_loss
    from kd_cli.losses.hinton import CrossEntropy
    from kd_cli.models import build_model

    root = write_fake_cifar10(workdir / f"case{case.key}", images)
    command = "distill" if case.teacher else "train"
    overrides = tutorial_overrides(root, device_name, case.kd_epochs, case.augment) + [f"student={case.student}"]
    if case.teacher:
        overrides += [f"teacher={case.teacher}", "loss=kd", f"alpha={ALPHA}", f"T={T}"]
    cfg = compose_config(command, overrides)
    device = resolve_device(cfg.device)
    data = load_data(cfg).to(device)
    spec = data.spec

    # One set of initial weights for both sides and every round.
    seed_everything(cfg.seed)
    student_init = build_model(cfg.student, spec).state_dict()
    teacher_model = None
    if case.teacher:
        seed_everything(cfg.seed + 1)
        teacher_model = build_model(cfg.teacher, spec).eval()

    def fresh_student():
        model = build_model(cfg.student, spec)
        model.load_state_dict(student_init)
        return model

    cached = case.teacher is not None and not case.augment

    def kd_round(round_data: ImageData, epochs: int) -> tuple[float, float]:
        student = fresh_student()
        cfg.train.epochs = epochs
        if case.teacher:
            # As `kd distill` does: both models on the device before the loss looks at them.
            student, teacher = student.to(device), copy.deepcopy(teacher_model).to(device)
            loss_fn = build_loss(cfg)
            loss_fn.attach(student, teacher, normalize(round_data.train_x[:2], round_data), len(round_data.train_y))
        else:
            teacher, loss_fn = None, CrossEntropy()
        result = _quiet_fit(student, loss_fn, round_data, cfg, device, teacher=teacher, label=f"bench{case.key}")
        # Wall time of the whole fit: the cache, evaluation of the (10-image) test split and setup included.
        return epochs * len(round_data.train_y) / result.train_time_s, result.train_img_per_s

    dataset = plain_dataset(root, cfg.dataset.mean, cfg.dataset.std, case.augment)

    def plain_round(loader) -> float:
        student = fresh_student().to(device)
        student.train()
        optimizer = torch.optim.Adam(student.parameters(), lr=LR)
        if case.teacher:
            teacher = copy.deepcopy(teacher_model).to(device).eval()
            step = lambda x, y: plain_kd_step(teacher, student, optimizer, x, y)  # noqa: E731
        else:
            step = lambda x, y: plain_ce_step(student, optimizer, x, y)  # noqa: E731
        start = time.perf_counter()
        seen = plain_epoch(loader, step, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # One epoch: every epoch of this loop costs the same (its workers are started anew each epoch too).
        return seen / (time.perf_counter() - start)

    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2)
    warm = min(images, 2 * BATCH_SIZE)
    engine_log = logging.getLogger("kd_cli.engine")
    engine_log.setLevel(logging.INFO)  # kd's decisions (cache, precision) once, in the warm-up, not every round
    kd_round(subset(data, warm), 1)
    engine_log.setLevel(logging.WARNING)
    plain_round(DataLoader(Subset(dataset, range(warm)), batch_size=BATCH_SIZE, shuffle=True, num_workers=2))

    kd_rates, kd_steps, plain_rates, loads = [], [], [], []
    for r in range(rounds):
        order = ("plain", "kd") if r % 2 == 0 else ("kd", "plain")
        others = OthersLoad()
        for side in order:
            if side == "kd":
                rate, steps = kd_round(data, case.kd_epochs)
                kd_rates.append(rate)
                kd_steps.append(steps)
            else:
                plain_rates.append(plain_round(loader))
        loads.append(others.fraction())
        log.info("case %s round %d/%d: kd %.0f img/s, plain %.1f img/s, ratio %.2fx (other processes used %.0f%% of the CPU)",
                 case.key, r + 1, rounds, kd_rates[-1], plain_rates[-1], kd_rates[-1] / plain_rates[-1], 100 * loads[-1])

    student = fresh_student()
    teacher_share_kd = (1.0 / case.kd_epochs) if cached else 1.0
    return CaseResult(
        case, kd_rates, plain_rates, kd_steps, loads,
        flops_kd=train_flops_per_image(student, teacher_model, teacher_share_kd, spec),
        flops_plain=train_flops_per_image(student, teacher_model, 1.0, spec),
    )


# ---------------------------------------------------------------- report


def csv_rows(results: list[CaseResult], peak: float, device: str) -> list[dict]:
    rows = []
    for r in results:
        kd, plain = statistics.median(r.kd), statistics.median(r.plain)
        rows.append({
            "case": r.case.name, "kd_img_per_s": round(kd, 2), "plain_img_per_s": round(plain, 2),
            "ratio": round(statistics.median(r.ratios), 3), "ratio_min": round(min(r.ratios), 3),
            "ratio_max": round(max(r.ratios), 3), "kd_flops_per_s": round(r.flops_kd * kd),
            "peak_matmul_flops_per_s": round(peak), "device": device,
        })
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def student_dtype(device: torch.device) -> str:
    """The precision kd trains the student in with its default train.amp=auto: the peak to compare with."""
    from kd_cli.engine import cpu_has_native_bf16

    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def print_report(results: list[CaseResult], rows: list[dict], peaks: dict[str, float], device: torch.device,
                 label: str) -> None:
    from rich.console import Console
    from rich.table import Table

    on_gpu = device.type == "cuda"
    dtype = student_dtype(device)
    peak = peaks[dtype]
    table = Table(title=f"kd vs the plain loop, batch {BATCH_SIZE}, on {label}")
    for column in ("case", "kd img/s", "kd img/s, steps only", "plain img/s", "kd / plain (median)", "min-max",
                   "target", "kd GFLOP/s", "kd % of peak", "plain GFLOP/s", "others' CPU"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r, row in zip(results, rows):
        case = r.case
        target_ratio = case.gpu_target if on_gpu else case.cpu_target
        checks = []
        if target_ratio:
            checks.append((f">= {target_ratio:g}x", row["ratio"] >= target_ratio))
        if on_gpu and case.gpu_peak_fraction:
            checks.append((f">= {case.gpu_peak_fraction:.0%} of peak", row["kd_flops_per_s"] >= case.gpu_peak_fraction * peak))
        target = ", ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in checks) or "-"
        table.add_row(
            case.name, f"{row['kd_img_per_s']:,.0f}", f"{statistics.median(r.kd_steps_only):,.0f}",
            f"{row['plain_img_per_s']:,.1f}", f"{row['ratio']:.2f}x", f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}x",
            target, f"{row['kd_flops_per_s'] / 1e9:,.1f}", f"{100 * row['kd_flops_per_s'] / peak:.1f}%",
            f"{r.flops_plain * row['plain_img_per_s'] / 1e9:,.1f}", f"{100 * min(r.load):.0f}-{100 * max(r.load):.0f}%",
        )
    console = Console(width=None if sys.stdout.isatty() else 170)  # a log file gets every column unwrapped
    console.print(table)
    console.print("matmul peak measured now: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
                  + f"; the % column is against {dtype}, the precision kd trains the student in "
                  "(the plain loop trains in fp32).")
    busiest = max(max(r.load) for r in results)
    if device.type == "cpu" and busiest > 0.1:
        console.print(f"[bold]warning:[/bold] other processes used up to {100 * busiest:.0f}% of the CPU during the rounds. "
                      "Contention slows loops of many small operations (kd's cached steps: each multi-threaded "
                      "operation waits for a descheduled thread) far more than loops of a few large ones, so the "
                      "ratios are lower than on an idle machine.")
    console.print("kd img/s: training images / wall time of kd's whole fit (setup, teacher cache, per-epoch "
                  "evaluation included); steps only: kd's own train_img_per_s. Case 1's kd fit is 10 epochs "
                  "(the tutorial's), the plain loop's img/s is one epoch's (each of its epochs costs the same).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kd_cli.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1,2,3", help="comma-separated case numbers (default 1,2,3)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case, after a warm-up (default 5)")
    parser.add_argument("--images", default=None,
                        help="training images per round: one number for every case, or one per case "
                             f"(default {','.join(str(c.images) for c in CASES.values())})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/bench.csv"), help="the csv to write")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys:
        parser.error(f"--cases takes numbers among {', '.join(CASES)}, got {args.cases!r}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    sizes = [int(v) for v in args.images.split(",")] if args.images else [CASES[k].images for k in keys]
    if len(sizes) == 1:
        sizes *= len(keys)
    if len(sizes) != len(keys) or min(sizes) < 2:
        parser.error("--images takes one number >= 2, or one per case")
    args.plan = list(zip([CASES[k] for k in keys], sizes))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kd_cli").setLevel(logging.INFO)
    from kd_cli.engine import resolve_device

    device = resolve_device(args.device)
    label = device_label(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {k: matmul_flops_per_s(device, d) for k, d in dtypes.items()}
    log.info("device %s; matmul peak %s", label, ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    results = []
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as workdir:
        for case, images in args.plan:
            log.info("case %s (%s): %d images per round, %d rounds", case.key, case.name, images, args.rounds)
            results.append(run_case(case, images, args.rounds, str(device), Path(workdir)))
    # The machine may be shared: the best of a measurement before and after the cases is the peak.
    peaks = {k: max(v, matmul_flops_per_s(device, dtypes[k])) for k, v in peaks.items()}
    peak = peaks[student_dtype(device)]
    rows = csv_rows(results, peak, label)
    write_csv(args.out, rows)
    print_report(results, rows, peaks, device, label)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
