"""The training loop: data already on the device, one function, no host sync inside an epoch.

Per step: slice a batch of uint8 images, augment and normalise it in one batched operation, run the
student (and the teacher, unless its outputs are cached), and hand both outputs to the loss. Loss
and accuracy are summed on the device and read once per epoch. After each epoch the whole training
state is checkpointed atomically, so a killed run continues exactly where it stopped.
"""

import ctypes
import functools
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_cli import teacher_outputs as kept_outputs
from kd_cli.atomic import atomic_torch_save
from kd_cli.config import CACHE_NEEDS_FIXED_INPUTS, COMPILE_WITH_HOOKS, run_identity
from kd_cli.data import ImageData, epoch_batches, normalize, random_crop_flip
from kd_cli.errors import KdError
from kd_cli.features import FeatureTaps
from kd_cli.losses import DistillationLoss
from kd_cli.measure import synchronize
from kd_cli.models import has_conv
from kd_cli.store import checksum, nested_checksum, safe_load

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda:
        if not torch.cuda.is_available():
            raise KdError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        index = int(cuda.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise KdError(f"device={name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise KdError("device=mps was asked for but MPS is not available; use device=cpu or device=auto")
    elif name not in ("cpu", "mps"):
        raise KdError(f"device={name} is not one of auto, cpu, cuda, cuda:N, mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    accuracy: float  # test top-1 % after the final epoch
    best_accuracy: float  # best test top-1 % over epochs
    train_time_s: float  # wall time of the whole fit, evaluation and teacher caching included
    train_img_per_s: float  # training images per second of optimisation steps
    val_accuracy: float | None = None  # top-1 % on the held-out validation split, final epoch
    history: list[dict] = field(default_factory=list)


def _as_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000, channels_last: bool = False,
             split: str = "test") -> float:
    """Top-1 accuracy (%) on the `test` or `val` split."""
    images, labels = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        x = _as_input(normalize(images[start: start + batch_size], data), channels_last)
        correct += (model(x).argmax(1) == labels[start: start + batch_size]).sum()
    return 100.0 * correct.item() / len(labels)


def _optimizer(params, train_cfg, device: torch.device) -> torch.optim.Optimizer:
    name = train_cfg.optimizer
    # One fused kernel for all parameters: on a 2-core CPU, Adam's step for LightNN took 0.14 ms
    # instead of 0.42 ms, for ResNet-18 23 ms instead of 94 ms (SGD: 2.7x and 2x faster).
    fused = True if device.type == "cpu" else None
    if name == "sgd":
        params = list(params)
        sgd = torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                              weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov, fused=fused)
        if fused and train_cfg.momentum:
            # Fused SGD takes momentum buffers for every parameter or for none, and fails when a parameter
            # first gets a gradient after the others have buffers (the classifier, after a two-stage loss's
            # first stage). A zero buffer gives the same first step as none (momentum * 0 + grad = grad).
            for p in params:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sgd
    if name == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=fused)
    raise KdError(f"unknown train.optimizer '{name}'; choose sgd or adam")


def _schedule(optimizer, train_cfg):
    name, epochs = train_cfg.schedule, train_cfg.epochs
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "multistep":
        # After epoch 1 at the earliest and epoch `epochs`-1 at the latest: a drop after the last epoch
        # would change nothing (0.9 of 4 epochs rounds to 4).
        milestones = [min(max(1, round(f * epochs)), max(1, epochs - 1)) for f in train_cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=train_cfg.gamma)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise KdError(f"unknown train.schedule '{name}'; choose cosine, multistep or constant")


def use_channels_last(model: nn.Module, train_cfg, device: torch.device) -> bool:
    """NHWC memory layout: measured faster for convolutional training on CPU and GPU; off for MPS."""
    mode = train_cfg.get("channels_last", "auto")
    return mode is True or (mode == "auto" and has_conv(model) and device.type in ("cpu", "cuda"))


# CPU features with bf16 arithmetic in hardware: x86's AVX512-BF16 and AMX-BF16, ARM's BF16 and SVE-BF16.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively; without it bf16 is emulated and slower.

    Not oneDNN's `_is_mkldnn_bf16_supported()`: that also says yes to AVX-512 without BF16, where
    oneDNN emulates it. On such a 2-core Intel Xeon (Ice Lake) a bf16 128 -> 64 3x3 convolution
    took 332-399 ms against 107-112 ms in fp32.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch, which does not list CPU features: oneDNN's answer is all there is
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    features = capabilities()
    return any(features.get(name) is True for name in NATIVE_BF16_FEATURES)


def student_precision(train_cfg, device: torch.device, label: str = "student") -> str:
    """fp32 or bf16 (autocast) for the forward pass of the model `label` trains, from `train.amp` and the hardware.

    auto: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; true: bf16 on CUDA and any CPU;
    false: fp32. Never decided by timing, so runs stay reproducible. The loss itself is always fp32.
    """
    mode = train_cfg.amp
    if mode is False:
        choice, why = "fp32", "train.amp=false"
    elif device.type == "mps":
        choice, why = "fp32", "MPS"
    elif device.type == "cuda":
        choice, why = "bf16", "CUDA"
    elif mode is True:
        choice, why = "bf16", "train.amp=true"
    else:
        # Measured on a 2-core AVX512-BF16 CPU, the training steps in bf16 against fp32: see the
        # README's performance section.
        supported = cpu_has_native_bf16()
        choice, why = ("bf16" if supported else "fp32"), f"this CPU {'has' if supported else 'lacks'} native bf16"
    # No hint after train.amp=false: set by the user, or by a caller that must train in fp32 (QAT).
    hint = "" if mode is False else "; train.amp=false for fp32" if choice == "bf16" else "; train.amp=true for bf16"
    log.info("%s trains in %s (%s%s)", label, choice, why, hint)
    return choice


class Teacher:
    """The frozen teacher: its outputs for a batch, computed each step or taken from a cache."""

    def __init__(self, model: nn.Module, layers: list[str], data: ImageData, cfg, device: torch.device, augment: bool,
                 outputs_folder: Path | None = None):
        mode = str(cfg.train.teacher_cache)
        if mode == "on" and augment:
            raise KdError(CACHE_NEEDS_FIXED_INPUTS)
        self.model = model.to(device).eval().requires_grad_(False)
        self.layers = list(layers)
        self.taps = FeatureTaps(self.model, layers, "teacher")
        self.channels_last = use_channels_last(self.model, cfg.train, device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        cached = mode != "off" and not augment
        self.precision, why = self._choose_precision(cfg.train, device, cached)
        self.cache = None
        self.seconds_reused = 0.0  # what computing a cache kept by an earlier fit cost
        self.seconds_waited = 0.0  # spent waiting for a parallel job's pass, which it counts as its own
        if cached:
            # On a CPU a training batch at a time, whatever the C library: with glibc's default
            # allocator DeepNN's pass over 2,048 images took 0.51 s this way and 0.82 s in chunks of 1000
            # (each chunk's 256 MB of first-layer activations mmapped and faulted in anew); after
            # keep_freed_memory(), 0.50 s either way.
            chunk = 1000 if device.type == "cuda" else cfg.train.batch_size
            self.cache = self._outputs_for_all(data, cfg.train, strict=(mode == "on"), chunk=chunk, folder=outputs_folder)
            if self.cache is None:  # too big to keep: the teacher runs on every step after all
                self.precision, why = self._choose_precision(cfg.train, device, cached=False)
        else:
            log.info("teacher cache: off (%s); the teacher runs on every step in %s",
                     "inputs are augmented" if augment else "train.teacher_cache=off", self.precision)
        if why:
            log.info("teacher precision: %s (%s; train.teacher_precision=fp32|bf16 to choose)", self.precision, why)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    @staticmethod
    def _choose_precision(train_cfg, device, cached: bool) -> tuple[str, str]:
        """fp32 or bf16 for the teacher's forward pass, and why `auto` chose it (empty when the user did).

        Never decided by timing, so runs stay reproducible.
        """
        mode = train_cfg.get("teacher_precision", "auto")
        if mode != "auto":
            return mode, ""
        if device.type == "mps" or (cached and device.type == "cuda"):
            choice, why = "fp32", "MPS" if device.type == "mps" else "its outputs are computed once"
        elif device.type == "cuda":
            supported = torch.cuda.is_bf16_supported()
            choice, why = ("bf16" if supported else "fp32"), f"this GPU {'has' if supported else 'lacks'} bf16"
        else:
            # Measured on a 2-core AVX512-BF16 CPU: ResNet-18 teacher forward 2.6x faster in bf16
            # (logits within 0.3% relative L2); without native bf16 it is slower than fp32. The same
            # holds for the one-off cache pass (DeepNN logits within 0.3%), about half of a 10-epoch
            # cached run's time: the cache is computed in bf16 and kept in bf16, half the memory of fp32.
            supported = cpu_has_native_bf16()
            choice, why = ("bf16" if supported else "fp32"), f"this CPU {'has' if supported else 'lacks'} native bf16"
        return choice, why

    def _outputs_for_all(self, data: ImageData, train_cfg, strict: bool, chunk: int, folder: Path | None) -> dict | None:
        """Every output the loss needs, for the whole (unaugmented) training set, computed once.

        Kept in the precision the teacher computes in (bf16 under bf16 autocast); batches are handed
        out in fp32, the values a teacher run on every step would give. Outputs an earlier fit kept
        (teacher_outputs.py) are taken instead of a new pass when they match.
        """
        n, started = len(data.train_y), time.perf_counter()
        # The first chunk, as the pass computes it: it sizes the cache and checks kept outputs.
        first = self._forward(normalize(data.train_x[:chunk], data))
        mb = sum(t[0].numel() * t.element_size() for t in first.values()) * n / 2**20
        if mb > train_cfg.teacher_cache_max_mb:
            if strict:
                raise KdError(f"the teacher cache would take {mb:.3g} MB, over train.teacher_cache_max_mb="
                              f"{train_cfg.teacher_cache_max_mb}; raise it or use train.teacher_cache=auto")
            log.info("teacher cache: off (it would take %.3g MB, over train.teacher_cache_max_mb=%s)",
                     mb, train_cfg.teacher_cache_max_mb)
            return None
        # The CPU thread count changes the last bits of the outputs (how sums are split), and kept outputs
        # must equal this pass's bit for bit: 1-thread workers of a parallel sweep share theirs.
        threads = torch.get_num_threads() if data.train_x.device.type == "cpu" else None
        key = kept_outputs.key(self.model, data, self.layers, self.precision, self.channels_last, chunk,
                               str(data.train_x.device), threads)
        found = kept_outputs.find(key, folder, first, n)
        if not found:
            disk_mb = train_cfg.get("teacher_cache_disk_mb") or 0
            # A parallel job with this teacher and these images may be computing the same outputs, to be
            # saved: wait for them rather than compute them twice (worth it only where they will be saved).
            asked = time.perf_counter()
            with kept_outputs.computing(key, folder if mb <= disk_mb else None) as waited:
                self.seconds_waited = time.perf_counter() - asked
                found = kept_outputs.find(key, folder, first, n) if waited else None
                if not found:
                    kept_outputs.forget()  # before the new pass: one cache in memory at a time
                    cache = self._whole_pass(first, data, chunk)
                    log.info("teacher cache: on (teacher outputs for %d images, computed and kept in %s, %.1f MB, "
                             "reused every epoch)", n, self.precision, mb)
                    seconds = time.perf_counter() - started - self.seconds_waited
                    kept_outputs.keep(key, cache, seconds, folder, disk_mb)
                    return cache
        cache, self.seconds_reused, where = found
        log.info("teacher cache: on (teacher outputs for %d images in %s, %.1f MB, taken from %s: same teacher "
                 "and training images; its %.1f s count in this fit's train_time_s)",
                 n, self.precision, mb, where, self.seconds_reused)
        cache = {k: t.to(data.train_x.device) for k, t in cache.items()}
        kept_outputs.keep(key, cache, self.seconds_reused)  # the next fit of this process finds them in memory
        return cache

    def _whole_pass(self, first: dict, data: ImageData, chunk: int) -> dict:
        """The outputs for every training image, `first` being those of the first chunk."""
        parts = [first] + [self._forward(normalize(data.train_x[i: i + chunk], data))
                           for i in range(chunk, len(data.train_y), chunk)]
        cache = {k: torch.cat([p[k] for p in parts]) for k in first}
        synchronize(data.train_x.device)
        return cache

    def _forward(self, x: torch.Tensor) -> dict:
        with torch.inference_mode(), self._autocast(x.device):
            logits = self.model(_as_input(x, self.channels_last))
            return {"logits": logits, **self.taps.pop()}

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dict:
        if self.cache is not None and idx is not None:
            return {k: v.index_select(0, idx).float() for k, v in self.cache.items()}
        # Inference tensors cannot be saved for backward; an fp32 copy outside inference mode can.
        return {k: v.float().clone() for k, v in self._forward(x).items()}

    def close(self) -> None:
        self.taps.remove()
        if self.channels_last:  # the caller's model as it came: later measurements time it in its own layout
            self.model.to(memory_format=torch.contiguous_format)


class _Progress:
    """A rich progress bar on a terminal; one log line per epoch elsewhere (CI, files, pipes)."""

    def __init__(self, label: str, epochs: int, steps: int, first_epoch: int):
        self.label, self.epochs = label, epochs
        self.bar = None
        if sys.stdout.isatty() and not os.environ.get("CI"):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task(f"{label} epoch {first_epoch}/{epochs}", total=epochs * steps,
                                          completed=(first_epoch - 1) * steps)
            self.bar.start()

    def step(self) -> None:
        if self.bar:
            self.bar.advance(self.task)

    def epoch(self, stats: dict) -> None:
        line = (f"{self.label} epoch {stats['epoch']}/{self.epochs}  loss {stats['loss']:.4f}  "
                f"train {stats['train_accuracy']:.2f}%  test {stats['test_accuracy']:.2f}%  "
                f"{stats['img_per_s']:.0f} img/s")
        if self.bar:
            self.bar.update(self.task, description=line)
            # The run's log file keeps every epoch's line; the terminal shows it in the bar.
            record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                    handler.handle(record)
        else:
            log.info(line)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        **{f"generator_{k}": g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state[f"generator_{k}"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = safe_load(path)
        saved = state.pop("checksum", None)  # states written before kd checked them have none
    except Exception as e:  # a state file is only written whole (atomic rename); anything else is foreign
        raise KdError(f"training state {path} is unreadable ({type(e).__name__}); delete it to start this model over") from e
    if saved is not None and saved != nested_checksum(state):
        raise KdError(f"training state {path} is corrupt (its content does not match its checksum); delete it to "
                      f"start this model over")
    return state


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel; once per process.

    By default glibc returns every block over its mmap threshold (32 MB at most) to the kernel when it
    is freed, and trims the top of its heap, so the next batch's activations of the same size are
    page-faulted in and zeroed anew: 260k page faults in one 10-epoch DeepNN -> LightNN fit on a
    2-core CPU, 0.3 s of its 1.9 s (`make bench`, case 1). Training allocates the same sizes on every
    step; keeping them is what PyTorch's CUDA allocator does on a GPU. Other C libraries: unchanged.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    m_trim_threshold, m_mmap_threshold = -1, -3
    # The mmap threshold first: setting only the trim threshold pins the mmap threshold at its 128 kB
    # start, and then nearly every tensor is mmapped and faulted in (1.8M faults, 2x slower).
    if mallopt is None or not mallopt(m_mmap_threshold, 2**30):
        return False
    mallopt(m_trim_threshold, 2**31 - 1)
    return True


@contextmanager
def num_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (train.threads, measure.threads) inside the block; None keeps it."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _warn_if_at_chance(label: str, last_epoch: dict, num_classes: int) -> None:
    """A model that ends where guessing would is a failed run the table alone would not explain.

    Seen with kd's CIFAR recipe (SGD, lr 0.05) on networks without BatchNorm: LightNN distilled at
    alpha=0.9, T=4 on Fashion-MNIST sat at 10.00% from its first epoch, its ReLUs dead.
    """
    chance = 100.0 / num_classes
    # The test accuracy alone: a model that learnt, then collapsed within its last epoch (its running
    # train accuracy 28.5%, its test accuracy 10.00% on Fashion-MNIST) predicts one class all the same.
    if last_epoch["test_accuracy"] <= 1.5 * chance:
        log.warning("%s: ended at %.2f%% test accuracy, about chance for %d classes: its training collapsed or has barely "
                    "started; lower train.lr (networks without BatchNorm train better with train.optimizer=adam "
                    "train.lr=1e-3, the PyTorch KD tutorial's recipe) or train more epochs", label,
                    last_epoch["test_accuracy"], num_classes)


def fit(student: nn.Module, loss_fn: DistillationLoss, data: ImageData, cfg, device: torch.device,
        teacher: nn.Module | None = None, label: str = "student", state_path: Path | None = None,
        teacher_outputs_folder: Path | None = None, epochs_before: int = 0) -> FitResult:
    """Train `student` with `loss_fn` (and `teacher`, when the loss needs one) on data already on `device`.

    With `state_path`, the training state is saved there after every epoch, and a run that finds
    one continues from it: on the CPU the result equals an uninterrupted run's exactly. With
    `teacher_outputs_folder`, a teacher cache is also saved there for later runs, and taken from there.
    `epochs_before`: epochs the student has already trained with this loss (QAT's fine-tuning of a
    distilled student), so that a staged loss goes on from its last stage instead of starting over.
    """
    with num_threads(cfg.train.get("threads")):
        return _fit(student, loss_fn, data, cfg, device, teacher, label, state_path, teacher_outputs_folder, epochs_before)


def _fit(student: nn.Module, loss_fn: DistillationLoss, data: ImageData, cfg, device: torch.device,
         teacher: nn.Module | None, label: str, state_path: Path | None, teacher_outputs_folder: Path | None,
         epochs_before: int) -> FitResult:
    train_cfg, augment = cfg.train, bool(cfg.data.augment)
    if train_cfg.get("compile") and loss_fn.hooks_layers:  # before the teacher's pass, not after it
        raise KdError(COMPILE_WITH_HOOKS)
    # torch's optimizers import torch._dynamo when the first one is built, 1.3-2 s once per process:
    # imported before the clock starts, so that a process's first fit is timed like the others.
    import torch._dynamo  # noqa: F401

    started = time.perf_counter()
    if device.type == "cpu":
        keep_freed_memory()
    student.to(device)
    channels_last = use_channels_last(student, train_cfg, device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    student_taps = FeatureTaps(student, loss_fn.student_layers, "student")
    teacher_outputs = None
    if loss_fn.needs_teacher:
        teacher_outputs = Teacher(teacher, loss_fn.teacher_layers, data, cfg, device, augment, teacher_outputs_folder)
        # A cache kept by an earlier fit counts at what it cost, and the wait for a parallel job's pass not
        # at all (that pass is counted as reused): train_time_s compares across runs.
        started -= teacher_outputs.seconds_reused - teacher_outputs.seconds_waited
    if teacher_outputs is None or teacher_outputs.cache is None:
        kept_outputs.forget()
    loss_fn.to(device)
    optimizer = _optimizer([*student.parameters(), *loss_fn.parameters()], train_cfg, device)
    schedule = _schedule(optimizer, train_cfg)
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),
                  "augment": torch.Generator(device=device).manual_seed(cfg.seed + 1)}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if student_precision(train_cfg, device, label) == "bf16" else nullcontext())
    forward = student
    if train_cfg.get("compile"):
        forward = torch.compile(student)
        log.info("%s: the student runs through torch.compile; its first steps compile it, which takes seconds "
                 "to minutes (train.compile=false runs it eagerly)", label)

    history, step_seconds, images_seen, first_epoch = [], 0.0, 0, 1
    # The config names a teacher file, not its content: one replaced between a stop and its resume would
    # teach the remaining epochs unseen.
    teacher_sha256 = checksum(teacher.state_dict()) if state_path and teacher_outputs else None
    state = _load_state(state_path) if state_path else None
    if state is not None:
        if state["config"] != run_identity(cfg):
            raise KdError(f"{state_path} holds the training state of a different config; use another hydra.run.dir "
                          f"or delete that file to start over")
        if state.get("teacher_sha256", teacher_sha256) != teacher_sha256:  # states before kd recorded it: not checked
            raise KdError(f"{state_path} was saved while learning from another teacher (its weights have changed "
                          f"since); delete that file to start over with this one")
        saved_on = state.get("device", device.type)  # states written before kd recorded it: assume this device
        if saved_on != device.type:  # a device's random streams (augmentation, dropout) do not carry over to another
            raise KdError(f"{state_path} was saved by a run on {saved_on}; resume it with device={saved_on}, "
                          f"or delete that file to start over on {device.type}")
        student.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["helpers"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        _restore_rng(state["rng"], generators)
        history, step_seconds, images_seen = state["history"], state["step_seconds"], state["images_seen"]
        first_epoch = state["epoch"] + 1
        # The time before the interruption, which includes the teacher's pass and setup once; this
        # process's own setup is left out, so train_time_s stays that of an uninterrupted fit.
        started = time.perf_counter() - state["elapsed_s"]
        log.info("%s: resuming after epoch %d from %s", label, state["epoch"], state_path)

    n = len(data.train_y)
    if n < 2:  # epoch_batches drops a batch of one, so an epoch would see nothing
        raise KdError(f"{label}: {n} training image{'' if n == 1 else 's'}; at least 2 are needed (raise data.fraction)")
    if not epochs_before:  # a continued schedule was checked with the fit it continues
        loss_fn.check_epochs(train_cfg.epochs)
    progress = _Progress(label, train_cfg.epochs, math.ceil(n / train_cfg.batch_size), first_epoch)
    try:
        for epoch in range(first_epoch, train_cfg.epochs + 1):
            student.train()
            loss_fn.train()
            loss_fn.set_epoch(epochs_before + epoch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
            seen = 0
            epoch_start = time.perf_counter()
            for step, idx in enumerate(epoch_batches(n, train_cfg.batch_size, generators["shuffle"], device), 1):
                # index_select, not train_x[idx]: a row copy, 10-100x faster than advanced indexing's
                # gather for a batch of CIFAR images (measured 22-32 us against 0.24-4.4 ms on 2 busy cores).
                images, targets = data.train_x.index_select(0, idx), data.train_y.index_select(0, idx)
                if augment:
                    images = random_crop_flip(images, cfg.dataset.crop_padding, cfg.dataset.hflip, generators["augment"])
                x = _as_input(normalize(images, data), channels_last)
                with autocast:
                    student_out = {"logits": forward(x), **student_taps.pop()}
                # The loss in fp32, outside autocast: CPU autocast leaves softmax and log_softmax of bf16
                # logits in bf16 (cross_entropy and kl_div it does run in fp32).
                student_out = {k: v.float() for k, v in student_out.items()}
                teacher_out = teacher_outputs(x, idx) if teacher_outputs else None
                loss = loss_fn(student_out, teacher_out, targets, indices=idx, inputs=x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # Sums stay on the device: no host sync inside the epoch.
                loss_sum += loss.detach() * len(idx)
                correct += (student_out["logits"].argmax(1) == targets).sum()
                bad = ~torch.isfinite(loss.detach()) & (first_bad_step < 0)
                first_bad_step = torch.where(bad, step, first_bad_step)
                seen += len(idx)
                progress.step()
            lr = optimizer.param_groups[0]["lr"]  # the epoch's own, before the schedule moves it on
            schedule.step()
            synchronize(device)
            seconds = time.perf_counter() - epoch_start
            if first_bad_step.item() >= 0:
                kept = f"; the last good state is in {state_path}" if state_path and state_path.exists() else ""
                raise KdError(f"{label}: the loss became NaN or inf in epoch {epoch}, step {first_bad_step.item()}{kept}; "
                              f"lower train.lr or check the inputs")
            step_seconds += seconds
            images_seen += seen
            stats = {"epoch": epoch, "loss": (loss_sum / seen).item(), "train_accuracy": 100.0 * correct.item() / seen,
                     "test_accuracy": evaluate(student, data, channels_last=channels_last),
                     "lr": lr, "img_per_s": seen / seconds}
            if data.val_y is not None:
                stats["val_accuracy"] = evaluate(student, data, channels_last=channels_last, split="val")
            history.append(stats)
            progress.epoch(stats)
            if state_path:
                state = {"config": run_identity(cfg), "device": device.type, "teacher_sha256": teacher_sha256,
                         "epoch": epoch, "model": student.state_dict(), "helpers": loss_fn.state_dict(),
                         "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                         "rng": _rng_state(generators), "history": history, "step_seconds": step_seconds,
                         "images_seen": images_seen, "elapsed_s": time.perf_counter() - started}
                # torch.load does not check the archive's CRCs: a flipped bit would be resumed from, then stored.
                atomic_torch_save(state_path, state | {"checksum": nested_checksum(state)})
    finally:
        progress.close()
        student_taps.remove()
        if teacher_outputs:
            teacher_outputs.close()
    student.to(memory_format=torch.contiguous_format)
    accuracies = [h["test_accuracy"] for h in history]
    _warn_if_at_chance(label, history[-1], data.spec.num_classes)
    return FitResult(
        accuracy=accuracies[-1], best_accuracy=max(accuracies), val_accuracy=history[-1].get("val_accuracy"),
        train_time_s=time.perf_counter() - started, train_img_per_s=images_seen / step_seconds, history=history,
    )

