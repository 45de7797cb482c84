"""What a deployable model costs: parameters, bytes, FLOPs and latency, measured one way everywhere."""

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters: a frozen teacher's weights are trainable ones of the deployable model."""
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module) -> float:
    """Bytes of the state_dict as fp32 (integer buffers at their own width), in MiB."""
    total = 0
    for t in model.state_dict().values():
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total / 2**20


def _example(model: nn.Module, shape, device) -> torch.Tensor:
    return torch.randn(1, *shape, device=device)


@torch.no_grad()
def count_flops(model: nn.Module, shape) -> int:
    """Forward FLOPs for one image (torch's counter: 2 FLOPs per multiply-add), eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(_example(model, shape, device))
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.inference_mode()
def latency_ms(model: nn.Module, shape, device: torch.device, runs: int = 50, warmup: int = 10) -> float:
    """Median wall time of a batch-1 forward pass on `device`, after `warmup` untimed passes."""
    was_training = model.training
    model.eval()
    x = _example(model, shape, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
    return statistics.median(times) * 1000.0


def model_costs(model: nn.Module, shape, device: torch.device, measure_cfg) -> dict:
    return {
        "params": count_params(model),
        "size_mb": round(size_mb(model), 4),
        "flops": count_flops(model, shape),
        "latency_ms": round(latency_ms(model, shape, device, measure_cfg.latency_runs, measure_cfg.latency_warmup), 4),
    }
