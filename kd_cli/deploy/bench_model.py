"""`kd bench-model MODEL_OR_RUN`: what one model costs to run, on the CPU and on the GPU when there is one.

MODEL is a catalogue name (weights seeded, not trained: cost does not depend on them) or a trained
model (a `kd distill` run folder or a kd checkpoint). Rows: fp32 on each device, and int8 on the CPU
(post-training quantized with random calibration inputs, which set scales, not size or speed).
A model with convolutions gets two fp32 rows per device, one per memory layout of its weights and
input: PyTorch's default NCHW, and channels_last (NHWC), in which CPU (oneDNN) convolutions often run
several times faster. int8 convolutions only run channels_last, so timing fp32 in NCHW alone would
credit int8 with what is the layout's gain.
Latency is measured by kd_cli.measure after warm-up passes, at batch 1 and at a larger batch; no
dataset is read.
"""

import copy
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from kd_cli.atomic import check_writable
from kd_cli.deploy.quantize import quantize
from kd_cli.deploy.source import SOURCE_KEYS, THREADS_KEY, integer, load_source, parse, set_threads
from kd_cli.engine import resolve_device, seed_everything
from kd_cli.errors import KdError
from kd_cli.measure import CPU, count_flops, count_params, latency_stats, size_mb
from kd_cli.models import CATALOGUE, ImageSpec, build_model, has_conv
from kd_cli.provenance import device_name
from kd_cli.results import print_table, write_results

COLUMNS = ["model", "dataset", "precision", "layout", "device", "device_name", "params", "size_mb", "flops",
           "latency_ms", "latency_p90_ms", "batch_size", "batch_latency_ms", "batch_latency_p90_ms", "img_per_s",
           "runs", "warmup"]
KEYS = {
    "dataset": "the input shape and class count of a catalogue MODEL (default cifar10)",
    "device": "auto (the CPU, and the GPU when there is one), cpu, cuda, cuda:N",
    "batch": "the larger batch size (default 64)",
    "runs": "timed passes per measurement (default 50)",
    "warmup": "untimed passes before them (default 10)",
    "out": "output folder (default: RUN/bench-model, outputs/bench-model/MODEL-CHECKPOINT_NAME for a checkpoint, "
           "or outputs/bench-model/MODEL-DATASET)",
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _dataset(name: str):
    from kd_cli.cli import config_dir

    folder = Path(config_dir()) / "dataset"
    choices = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in choices:  # a name, never a path: dataset=../base would read another config
        raise KdError(f"unknown dataset '{name}'; choose one of: {', '.join(choices)}")
    return OmegaConf.load(folder / f"{name}.yaml")


def _catalogue_model(name: str, dataset):
    """(model, its label): `light6`, or `torchvision.NAME` for a torchvision classifier (untrained;
    plain `torchvision` is its default, resnet18, and labelled so)."""
    arch, _, tv_name = name.partition(".")
    if arch not in CATALOGUE:
        raise KdError(f"'{name}' is neither an existing run folder or checkpoint nor a catalogue model; "
                      f"pass a path that exists or one of: {', '.join(sorted(CATALOGUE))} (torchvision.NAME for "
                      f"a torchvision classifier)")
    extra = {}
    if arch == "torchvision":
        extra = {"name": tv_name or "resnet18", "weights": None}
        name = f"torchvision.{extra['name']}"
    seed_everything(0)
    return build_model(OmegaConf.create({"arch": arch, **extra}), ImageSpec.of(dataset)).eval(), name


def _devices(name: str) -> list[torch.device]:
    if name == "auto":
        return [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [resolve_device(name)]


def bench_row(model, precision: str, layout: str, device: torch.device, shape, batch: int, runs: int,
              warmup: int) -> dict:
    """One row; `model` is already in `layout`, its inputs are converted to it before the timed passes."""
    model = model.to(device)
    one = latency_stats(model, shape, device, runs, warmup, batch=1, memory_format=LAYOUTS[layout])
    many = latency_stats(model, shape, device, runs, warmup, batch=batch, memory_format=LAYOUTS[layout])
    return {"precision": precision, "layout": layout, "device": str(device), "device_name": device_name(device),
            "params": count_params(model), "size_mb": round(size_mb(model), 4), "flops": count_flops(model, shape),
            "latency_ms": round(one["median_ms"], 4), "latency_p90_ms": round(one["p90_ms"], 4), "batch_size": batch,
            "batch_latency_ms": round(many["median_ms"], 4), "batch_latency_p90_ms": round(many["p90_ms"], 4),
            "img_per_s": round(batch / many["median_ms"] * 1000.0, 1), "runs": runs, "warmup": warmup}


def main(argv: list[str]) -> None:
    target, options = parse("bench-model", "Latency (batch 1 and a larger batch, median and p90 after warm-up), "
                            "throughput, parameters, fp32 / int8 size and FLOPs of one model, on the CPU and the GPU.",
                            argv, {**KEYS, **THREADS_KEY, **{k: SOURCE_KEYS[k] for k in ("run", "student.checkpoint")}},
                            positional="MODEL_OR_RUN")
    set_threads(options)
    batch, runs, warmup = integer(options, "batch", 64), integer(options, "runs", 50), integer(options, "warmup", 10, 0)
    named = [key for key in ("run", "student.checkpoint") if options.get(key)]
    if target and named:
        raise KdError(f"kd bench-model measures one model: {target} or {named[0]}={options[named[0]]}; drop one of them")
    if target and Path(target).exists():
        options["run" if Path(target).is_dir() else "student.checkpoint"] = target
    if options.get("run") or options.get("student.checkpoint"):
        if "dataset" in options:
            raise KdError("dataset= is for catalogue models; a trained model keeps the dataset it was trained on")
        source = load_source(options, "bench-model")  # it checks the output folder too
        model, label, dataset, out = source.model, source.label, source.cfg.dataset, source.out
    elif target:
        dataset = _dataset(options.get("dataset", "cifar10"))
        model, label = _catalogue_model(target, dataset)
        out = Path(options.get("out") or Path("outputs") / "bench-model" / f"{label}-{dataset.name}")
        check_writable(out, "kd bench-model's output folder", "out=PATH")
    else:
        raise KdError("kd bench-model needs a catalogue model name (e.g. light6), a run folder or a checkpoint")
    shape = (dataset.channels, dataset.image_size, dataset.image_size)

    layouts = ["nchw", "channels_last"] if has_conv(model) else ["nchw"]
    rows = []
    for device in _devices(options.get("device", "auto")):
        for layout in layouts:
            # A converted copy: `model` stays NCHW for the other rows and for quantization.
            fp32 = model if layout == "nchw" else copy.deepcopy(model).to(memory_format=torch.channels_last)
            rows.append(bench_row(fp32, "fp32", layout, device, shape, batch, runs, warmup))
    model.to(CPU)
    try:
        int8 = quantize(model, [torch.randn(8, *shape)])
        # Quantized convolutions (x86 and qnnpack kernels) compute in NHWC and return channels_last
        # tensors whatever their input's layout: channels_last is the layout int8 runs in.
        layout = "channels_last" if has_conv(model) else "nchw"
        rows.append(bench_row(int8, "int8", layout, CPU, shape, batch, runs, warmup))
    except KdError as e:
        print(f"no int8 row: {e.reason}")
    rows.sort(key=lambda row: row["device"] != "cpu")  # stable: per device, fp32 then int8 on the CPU, then the GPU
    frame = pd.DataFrame([{"model": label, "dataset": dataset.name, **row} for row in rows]).reindex(columns=COLUMNS)
    write_results(out, frame, {"command": "bench-model", "model": label, "torch": torch.__version__,
                               "threads": torch.get_num_threads()})
    print_table(frame, title=f"kd bench-model: {label} on {dataset.name}-shaped input "
                             f"(each: timed runs {runs}, after warm-up runs {warmup})", hide=("dataset", "device_name"),
                keys=["model", "precision", "layout", "device"])
    for precision, device, name in dict.fromkeys((row["precision"], row["device"], row["device_name"]) for row in rows):
        print(f"{precision} on {device}: {name}")
    print(f"wrote {out / 'results'}.csv/.md/.json")
