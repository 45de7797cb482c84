"""The training loop: one function, data on the device, no host sync inside an epoch."""

import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kd_cli.data import ImageData, epoch_batches, normalize, random_crop_flip
from kd_cli.errors import KdError
from kd_cli.losses import DistillationLoss

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        index = int(name.split(":")[1]) if ":" in name else 0
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
    train_time_s: float  # wall time of the whole fit, evaluation included
    train_img_per_s: float  # training images per second of optimisation steps
    history: list[dict] = field(default_factory=list)


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.test_x.device)
    for start in range(0, len(data.test_y), batch_size):
        x = normalize(data.test_x[start: start + batch_size], data)
        correct += (model(x).argmax(1) == data.test_y[start: start + batch_size]).sum()
    return 100.0 * correct.item() / len(data.test_y)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, data: ImageData, batch_size: int = 1000) -> torch.Tensor:
    """The teacher's logits for a whole (unaugmented) image set, computed once."""
    return torch.cat([teacher(normalize(images[i: i + batch_size], data)) for i in range(0, len(images), batch_size)])


def _optimizer(params, train_cfg) -> torch.optim.Optimizer:
    name = train_cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise KdError(f"unknown train.optimizer '{name}'; choose sgd or adam")


def _schedule(optimizer, train_cfg):
    name, epochs = train_cfg.schedule, train_cfg.epochs
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "multistep":
        milestones = [max(1, round(f * epochs)) for f in train_cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=train_cfg.gamma)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise KdError(f"unknown train.schedule '{name}'; choose cosine, multistep or constant")


def _use_teacher_cache(train_cfg, augment: bool) -> bool:
    """Teacher outputs can be reused across epochs only when the student sees the same images."""
    mode = str(train_cfg.teacher_cache)
    if mode == "on" and augment:
        raise KdError("train.teacher_cache=on needs fixed inputs; set data.augment=false or train.teacher_cache=auto")
    if mode not in ("auto", "on", "off"):
        raise KdError(f"train.teacher_cache={mode} is not one of auto, on, off")
    return mode != "off" and not augment


class _Progress:
    """A rich progress bar on a terminal; one log line per epoch elsewhere (CI, files, pipes)."""

    def __init__(self, label: str, epochs: int, steps: int):
        self.label, self.epochs = label, epochs
        self.bar = None
        if sys.stdout.isatty() and not os.environ.get("CI"):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task(f"{label} epoch 1/{epochs}", total=epochs * steps)
            self.bar.start()

    def step(self) -> None:
        if self.bar:
            self.bar.advance(self.task)

    def epoch(self, epoch: int, stats: dict) -> None:
        line = (f"{self.label} epoch {epoch}/{self.epochs}  loss {stats['loss']:.4f}  "
                f"train {stats['train_accuracy']:.2f}%  test {stats['test_accuracy']:.2f}%  "
                f"{stats['img_per_s']:.0f} img/s")
        if self.bar:
            self.bar.update(self.task, description=line)
        else:
            log.info(line)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def fit(student: nn.Module, loss_fn: DistillationLoss, data: ImageData, cfg, device: torch.device,
        teacher: nn.Module | None = None, label: str = "student") -> FitResult:
    """Train `student` with `loss_fn` (and `teacher`, if the loss needs one) on data already on `device`."""
    train_cfg, augment = cfg.train, bool(cfg.data.augment)
    started = time.perf_counter()
    student.to(device)
    loss_fn.to(device)
    optimizer = _optimizer([*student.parameters(), *loss_fn.parameters()], train_cfg)
    schedule = _schedule(optimizer, train_cfg)
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)
    augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and train_cfg.amp in (True, "auto") else nullcontext())

    cached_logits = None
    if loss_fn.needs_teacher:
        teacher.to(device).eval()
        if _use_teacher_cache(train_cfg, augment):
            cached_logits = teacher_logits(teacher, data.train_x, data)
            log.info("teacher cache: on (teacher logits for %d images, %.1f MB, reused every epoch)",
                     len(cached_logits), cached_logits.numel() * cached_logits.element_size() / 2**20)
        else:
            log.info("teacher cache: off (%s); the teacher runs on every step",
                     "inputs are augmented" if augment else "train.teacher_cache=off")

    n = len(data.train_y)
    steps = math.ceil(n / train_cfg.batch_size)
    progress = _Progress(label, train_cfg.epochs, steps)
    history, step_seconds, images_seen = [], 0.0, 0
    try:
        for epoch in range(1, train_cfg.epochs + 1):
            student.train()
            loss_fn.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            epoch_start = time.perf_counter()
            for idx in epoch_batches(n, train_cfg.batch_size, shuffle_rng, device):
                images, targets = data.train_x[idx], data.train_y[idx]
                if augment:
                    images = random_crop_flip(images, cfg.dataset.crop_padding, cfg.dataset.hflip, augment_rng)
                x = normalize(images, data)
                with autocast:
                    student_out = {"logits": student(x)}
                    teacher_out = None
                    if cached_logits is not None:
                        teacher_out = {"logits": cached_logits[idx]}
                    elif loss_fn.needs_teacher:
                        with torch.no_grad():
                            teacher_out = {"logits": teacher(x)}
                    loss = loss_fn(student_out, teacher_out, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                correct += (student_out["logits"].argmax(1) == targets).sum()
                seen += len(idx)
                progress.step()
            schedule.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - epoch_start
            step_seconds += seconds
            images_seen += seen
            mean_loss = (loss_sum / seen).item()
            if not math.isfinite(mean_loss):
                raise KdError(f"{label}: loss became {mean_loss} in epoch {epoch}; lower train.lr or check the inputs")
            stats = {"epoch": epoch, "loss": mean_loss, "train_accuracy": 100.0 * correct.item() / seen,
                     "test_accuracy": evaluate(student, data), "lr": optimizer.param_groups[0]["lr"],
                     "img_per_s": seen / seconds}
            history.append(stats)
            progress.epoch(epoch, stats)
    finally:
        progress.close()
    accuracies = [h["test_accuracy"] for h in history]
    return FitResult(
        accuracy=accuracies[-1], best_accuracy=max(accuracies),
        train_time_s=time.perf_counter() - started, train_img_per_s=images_seen / step_seconds, history=history,
    )
