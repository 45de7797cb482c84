"""What a training step costs and what the device can do: FLOPs per image, the matmul peak, the machine's load."""

import copy
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.measure import synchronize


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
    sync = lambda: synchronize(device)  # noqa: E731
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
    minus the bench's own: this process's, plus the CPU seconds its side processes report (their
    DataLoader workers included), over cores x wall time.
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
        return busy, own_cpu_seconds(), time.perf_counter()

    def fraction(self, side_cpu_seconds: float) -> float:
        end = self._sample()
        if self.start is None or end is None:
            return float("nan")
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - own - side_cpu_seconds) / (wall * (os.cpu_count() or 1)))


def own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (a DataLoader's workers, once reaped)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


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
