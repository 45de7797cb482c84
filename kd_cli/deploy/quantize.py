"""Int8 models: post-training quantization, quantization-aware training, and `kd quantize`.

PyTorch's FX graph mode quantization (torch.ao.quantization.quantize_fx) with the CPU's quantized
engine (x86 here, qnnpack on ARM). Its converted models run int8 kernels in eager mode, so they are
smaller and faster without torch.compile. torch 2.13 marks torch.ao.quantization deprecated in favour
of torchao's PT2E flow, whose converted model computes in fp32 between quantize / dequantize ops
until torch.compile lowers it to int8 kernels (24 s for lightnn on this project's 2-core CPU), so kd
uses FX while torch ships it (docs/deploy.md).
"""

import copy
import io
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from kd_cli.atomic import atomic_write, atomic_write_files
from kd_cli.config import distill_columns
from kd_cli.data import normalize
from kd_cli.deploy.source import SOURCE_KEYS, integer, load_source, parse, set_threads
from kd_cli.engine import evaluate
from kd_cli.errors import KdError
from kd_cli.measure import CPU, model_costs
from kd_cli.provenance import device_name
from kd_cli.results import print_table, results_files, results_frame

# torch 2.13 warns on every use of torch.ao.quantization, int8 tensors and TorchScript (docs/deploy.md says it
# once), and about its own internals during torch.export; none of it is the user's to act on.
_KNOWN_WARNINGS = (r"torch\.ao\.quantization is deprecated", r"torch\.quantize_per_tensor", r"`torch\.jit\.\w+` is deprecated",
                   r"The TorchScript type system", r"Please use quant_min and quant_max", r"`isinstance\(treespec, LeafSpec\)`")
SUPPORTED = "a catalogue student such as lightnn, light6, mnist_student or conv2 ... conv10"


@contextmanager
def quiet():
    with warnings.catch_warnings():
        for message in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def engine() -> str:
    name = torch.backends.quantized.engine
    if name == "none":
        raise KdError("this PyTorch build has no quantized CPU engine (x86, fbgemm or qnnpack); install an official torch wheel")
    return name


def _float_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in the default memory layout: the caller's model (maybe on a GPU, or in use) is left alone."""
    return copy.deepcopy(model).to(CPU, memory_format=torch.contiguous_format)


def _has(model: nn.Module, layer: type) -> bool:
    return any(isinstance(m, layer) for m in model.modules())


def kind(model: nn.Module) -> str:
    """How `model` is quantized: static with convolutions, dynamic for linear-only models."""
    if _has(model, nn.Conv2d):
        return "static"
    if _has(model, nn.Linear):
        return "dynamic"
    raise KdError(f"{type(model).__name__} has no convolution or linear layer to quantize; quantize {SUPPORTED}")


def _checked(what: str, model_name: str, step):
    """Run an FX step; tracing and int8 kernels fail in many ways (tensor control flow, unsupported ops)."""
    try:
        with quiet():
            return step()
    except KdError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise KdError(f"{model_name} cannot be {what} by PyTorch's FX graph mode ({type(e).__name__}: {first}); "
                      f"quantize {SUPPORTED}") from e


def quantize(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of `model` on the CPU; `calibration` holds normalised input batches.

    Static for models with convolutions: weights and activations int8, activation ranges observed on
    the calibration batches. Dynamic for linear-only models: weights int8, activations quantized on
    the fly, no calibration.
    """
    float_model = _float_copy(model).eval()
    name = type(model).__name__
    if kind(float_model) == "dynamic":
        int8 = _checked("quantized", name, lambda: quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8))
    else:
        prepared = _checked("quantized", name, lambda: prepare_fx(float_model, get_default_qconfig_mapping(engine()),
                                                                  (calibration[0][:2],)))
        def calibrate():
            with torch.no_grad():
                for batch in calibration:
                    prepared(batch)

        _checked("calibrated", name, calibrate)  # observers can fail on what tracing took
        int8 = _checked("quantized", name, lambda: convert_fx(prepared))
    _smoke_test(int8, calibration[0][:2], name)
    return int8


def prepare_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A CPU copy of `model` with fake quantization in its forward pass, ready to train (`convert` after)."""
    float_model = _float_copy(model).train()
    kind(float_model)
    return _checked("prepared for quantization-aware training", type(model).__name__,
                    lambda: prepare_qat_fx(float_model, get_default_qat_qconfig_mapping(engine()), (example.cpu(),)))


def convert(qat_model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The int8 model (CPU) of a model trained after `prepare_qat`."""
    float_model = _float_copy(qat_model).eval()
    int8 = _checked("converted to int8", "the fake-quantized student", lambda: convert_fx(float_model))
    _smoke_test(int8, example.cpu(), "the fake-quantized student")
    return int8


def _smoke_test(int8: nn.Module, example: torch.Tensor, name: str) -> None:
    """Run the int8 model once: a layer without an int8 kernel only fails when it is called."""
    with torch.inference_mode():
        _checked("run in int8", name, lambda: int8.eval()(example))


def calibration_batches(data, count: int, seed: int = 0, batch_size: int = 128) -> list[torch.Tensor]:
    """`count` training images of `data` picked at random with `seed`, normalised, in CPU batches."""
    data = data.to(CPU)
    picked = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:count]
    return list(normalize(data.train_x[picked], data).split(batch_size))


def scripted_int8(model: nn.Module) -> io.BytesIO:
    """`model` as TorchScript: the format that keeps eager int8 kernels loadable without kd (`torch.jit.load`)."""
    def script():
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buffer)
        return buffer

    return _checked("saved as TorchScript", type(model).__name__, script)


def as_shipped(int8: nn.Module) -> torch.jit.ScriptModule:
    """`int8` as a user runs it: its TorchScript file, loaded back. Its latency is the one to report.

    The FX module calls each layer from Python, a fixed cost per call: at batch 1 on one thread,
    lightnn took 0.29 ms that way, 0.085 ms loaded from its file (and 0.15 ms freshly scripted, not
    loaded); at batch 64, 2.2 against 1.95 ms.
    """
    buffer = scripted_int8(int8)
    buffer.seek(0)
    with quiet():
        return torch.jit.load(buffer)


def write_scripted(buffer: io.BytesIO, path: Path) -> int:
    """Write `buffer` to `path` atomically; returns the file's size in bytes."""
    atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()))
    return buffer.getbuffer().nbytes


# ---------------------------------------------------------------- kd quantize

QUANTIZE_KEYS = {
    "calibration": "training images that set the activation ranges (default 512)",
    "measure.latency_runs": "timed batch-1 CPU forward passes per model (default: the run's)",
    "measure.latency_warmup": "untimed passes before them (default: the run's)",
    "threads": "CPU threads for torch (default: the run's measure.threads, else torch's own choice); 1 gives "
               "steadier latencies on a busy machine",
}


def trained_how(source) -> dict:
    """The scheme, taught_by, loss, alpha and T of the model's row in its run's own table (unread alpha or T empty)."""
    if source.role != "student_kd":  # kd train's models, and kd distill's scratch student, learn from the labels
        return {"loss": "ce"}
    return distill_columns(source.cfg) | {"taught_by": _taught_by(source.checkpoint)}


def _taught_by(checkpoint: Path) -> str | None:
    """Who taught the student, as the table of the run that wrote `checkpoint` says (a run folder's student.pt);
    None for a checkpoint without its run's results.json beside it: which scheme taught whom is no config key."""
    try:
        rows = json.loads((checkpoint.parent / "results.json").read_text())["rows"]
        return next((row.get("taught_by") for row in rows if row.get("role") == "student_kd"), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def table_row(source, role: str, model: nn.Module, checkpoint: Path, measure_cfg) -> dict:
    """A results-table row (kd_cli/results.py columns) of `model`, measured now on the CPU."""
    return {"role": role, "model": source.label, "dataset": source.cfg.dataset.name, "seed": source.cfg.seed,
            **trained_how(source),
            "accuracy": round(evaluate(model, source.data), 2), **model_costs(model, source.shape, CPU, measure_cfg),
            "checkpoint": str(checkpoint)}


def main(argv: list[str]) -> None:
    _, options = parse("quantize", "Post-training int8 quantization of a trained student (static, calibrated on "
                       "training images; dynamic for linear-only models): accuracy, size and CPU latency before and after.",
                       argv, {**SOURCE_KEYS, **QUANTIZE_KEYS})
    set_threads(options)
    source = load_source(options, "quantize")
    count = integer(options, "calibration", 512)
    measure = source.cfg.measure
    if "threads" not in options and measure.get("threads") is not None:  # the run's, as for its runs and warm-up
        torch.set_num_threads(measure.threads)
    measure_cfg = OmegaConf.create({"latency_runs": integer(options, "measure.latency_runs", measure.latency_runs),
                                    "latency_warmup": integer(options, "measure.latency_warmup", measure.latency_warmup, 0),
                                    "threads": torch.get_num_threads()})
    how = kind(source.model)
    int8 = quantize(source.model, calibration_batches(source.data, count, source.cfg.seed))
    path = source.out / f"{source.label}_int8.torchscript.pt"
    scripted = scripted_int8(int8)  # a model TorchScript cannot take is refused before anything is measured
    before = table_row(source, source.role, source.model, source.checkpoint, measure_cfg)
    after = table_row(source, f"{source.role}_ptq", int8, path, measure_cfg)
    file_bytes = scripted.getbuffer().nbytes
    summary = {"quantization": how, "engine": engine(), "calibration_images": min(count, len(source.data.train_y)),
               "accuracy_change": round(after["accuracy"] - before["accuracy"], 2),
               "size_ratio": round(before["size_mb"] / after["size_mb"], 2), "int8_file_bytes": file_bytes,
               "latency_ratio": round(before["latency_ms"] / after["latency_ms"], 2)}
    frame = results_frame([before, after])
    details = {"command": "quantize", "source": str(source.checkpoint), **summary, "device": "cpu",
               "device_name": device_name(CPU), "torch": torch.__version__, "config": OmegaConf.to_container(source.cfg)}
    # Written with the results that describe it, once every measurement has succeeded: a failure leaves
    # the previous model and results together.
    atomic_write_files({path: scripted.getvalue(), **results_files(source.out, frame, details)})
    print_table(frame, title=f"kd quantize: {source.label} on {source.cfg.dataset.name}, CPU")
    print(f"int8 ({how}, {engine()} engine, {summary['calibration_images']} calibration images): accuracy "
          f"{before['accuracy']:.2f}% -> {after['accuracy']:.2f}% ({summary['accuracy_change']:+.2f} points), size "
          f"{before['size_mb']:.3f} -> {after['size_mb']:.3f} MiB ({summary['size_ratio']:.2f}x smaller), CPU latency "
          f"{before['latency_ms']:.3f} -> {after['latency_ms']:.3f} ms")
    print(f"wrote {path} (TorchScript, {file_bytes / 2**20:.3f} MiB: torch.jit.load it) and {source.out / 'results'}.csv/.md/.json")
