"""What a deployable model costs: parameters, bytes, FLOPs and latency, measured one way everywhere.

Int8 models (kd_cli/deploy/quantize.py) go through the same functions. Their quantized layers keep
weights packed instead of as parameters, and torch's FLOP counter does not see quantized kernels,
so both are read from the quantized layers themselves.
"""

import logging
import math
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_cli.errors import KdError

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: a GPU runs kernels after the Python call returns, so a
    clock read without this would time the queueing, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def packed_layers(model: nn.Module) -> list[nn.Module]:
    """The quantized convolutions and linear layers of `model` (none in a float model)."""
    return [m for m in model.modules() if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None))]


def is_quantized(model: nn.Module) -> bool:
    return bool(packed_layers(model))


def _packed_tensors(model: nn.Module):
    for layer in packed_layers(model):
        yield layer.weight()
        if layer.bias() is not None:
            yield layer.bias()


def count_params(model: nn.Module) -> int:
    """All parameters: a frozen teacher's weights are trainable ones of the deployable model."""
    return sum(p.numel() for p in model.parameters()) + sum(t.numel() for t in _packed_tensors(model))


def _tensors(values):
    for value in values:
        if isinstance(value, (tuple, list)):  # a quantized linear layer's state is a (weight, bias) pair
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def size_mb(model: nn.Module) -> float:
    """Bytes of the state_dict as fp32 (integer and int8 tensors at their own width), in MiB."""
    total = 0
    for t in _tensors(model.state_dict().values()):
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total / 2**20


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    return tensor.device if tensor is not None else CPU


def _example(model: nn.Module, shape, device, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, *shape, device=device)


@torch.no_grad()
def count_flops(model: nn.Module, shape) -> int:
    """Forward FLOPs for one image (torch's counter: 2 FLOPs per multiply-add), eval mode.

    A quantized layer's multiply-adds are counted the same way (2 per int8 multiply-add), so an int8
    model reports the FLOPs of its float original.
    """
    was_training = model.training
    model.eval()
    int8_flops = []

    def count(layer, inputs, output):
        # Each output element of a conv / linear layer takes one weight row (in/groups x kh x kw, or in).
        int8_flops.append(2 * output.numel() * layer.weight()[0].numel())

    hooks = [layer.register_forward_hook(count) for layer in packed_layers(model)]
    try:
        with FlopCounterMode(display=False) as counter:
            model(_example(model, shape, _device(model)))
    finally:
        for hook in hooks:
            hook.remove()
    model.train(was_training)
    return int(counter.get_total_flops()) + sum(int8_flops)


@torch.inference_mode()
def latency_stats(model: nn.Module, shape, device: torch.device, runs: int = 50, warmup: int = 10,
                  batch: int = 1, memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Fastest, median and 90th percentile (nearest rank) of a forward pass's wall time in ms, on `device`.

    `warmup` untimed passes come first (allocator, oneDNN / cuDNN kernel choice, caches), so the
    figures are of the steady state only. `memory_format` is the input's layout (torch.channels_last
    to time a model converted to it), set before the timed passes. An int8 model is timed as it ships:
    its TorchScript file, loaded back.
    """
    if is_quantized(model):
        from kd_cli.deploy.quantize import as_shipped  # deploy builds on this module

        model = as_shipped(model)
    was_training = model.training
    model.eval()
    x = _example(model, shape, device, batch).contiguous(memory_format=memory_format)
    sync = lambda: synchronize(device)  # noqa: E731
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    model.train(was_training)
    ranked = sorted(times)
    return {"min_ms": ranked[0] * 1000.0, "median_ms": statistics.median(times) * 1000.0,
            "p90_ms": ranked[math.ceil(0.9 * len(ranked)) - 1] * 1000.0}


def latency_ms(model: nn.Module, shape, device: torch.device, runs: int = 50, warmup: int = 10) -> float:
    """Median wall time of a batch-1 forward pass on `device`, after `warmup` untimed passes."""
    return latency_stats(model, shape, device, runs, warmup)["median_ms"]


def int8_costs(model: nn.Module, shape, runs: int, warmup: int) -> dict:
    """`int8_size_mb` and CPU `int8_latency_ms` of the fp32 `model` quantized post-training.

    Neither depends on the quantization scales, so random inputs calibrate it and no data is read.
    A model that cannot be quantized gets no int8 columns: the run it belongs to is not failed for it.
    """
    from kd_cli.deploy.quantize import quantize  # deploy builds on this module

    try:
        int8 = quantize(model, [_example(model, shape, CPU, 8)])
        latency = latency_ms(int8, shape, CPU, runs, warmup)
    except KdError as e:
        log.warning("%s; its int8 columns stay empty", e.reason)
        return {}
    return {"int8_size_mb": round(size_mb(int8), 4), "int8_latency_ms": round(latency, 4)}


# A 90th percentile over twice the median, and over it by a scheduler's time slice (~1 ms or more):
# passes were descheduled by other processes. Sub-millisecond jitter on an idle machine is not that.
# The median against the fastest pass likewise: a machine busy for most of the runs slows the median
# too (0.14 ms fastest, 72 ms median, seen with 2 threads on 2 busy cores), and then the 90th percentile is near it.
UNSTEADY, UNSTEADY_MS = 2.0, 1.0


def _unsteady(low: float, high: float) -> bool:
    return high > UNSTEADY * low and high - low > UNSTEADY_MS


def model_costs(model: nn.Module, shape, device: torch.device, measure_cfg, label: str = "model") -> dict:
    if is_quantized(model):
        device = CPU  # PyTorch's int8 kernels run on the CPU only
    runs, warmup = measure_cfg.latency_runs, measure_cfg.latency_warmup
    latency = latency_stats(model, shape, device, runs, warmup)
    fastest, median, p90 = latency["min_ms"], latency["median_ms"], latency["p90_ms"]
    if _unsteady(median, p90) or _unsteady(fastest, median):
        advice = ("; one thread times it more steadily (measure.threads=1; threads=1 for kd quantize and kd bench-model)"
                  if measure_cfg.get("threads") != 1 and device.type == "cpu" else "")
        log.warning("%s: latency unsteady (fastest %.3g ms, median %.3g ms, 90th percentile %.3g ms), likely other "
                    "processes on the machine%s", label, fastest, median, p90, advice)
    costs = {
        "params": count_params(model),
        "size_mb": round(size_mb(model), 4),
        "flops": count_flops(model, shape),
        "latency_ms": round(latency["median_ms"], 4),
    }
    if measure_cfg.get("int8"):
        # An int8 model is its own int8 version: the size and latency just measured, not timed twice.
        costs |= ({"int8_size_mb": costs["size_mb"], "int8_latency_ms": costs["latency_ms"]} if is_quantized(model)
                  else int8_costs(model, shape, runs, warmup))
    return costs
