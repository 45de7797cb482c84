"""`kd export`: a trained student as ONNX and as a `torch.export` program, checked before it is written.

One `torch.export` trace (batch size dynamic) gives both files: the program itself (`.pt2`,
`torch.export.load`) and, through torch's own ONNX exporter, the `.onnx` graph. Both are run on real
test images of the run's dataset and compared with the PyTorch model, and the ONNX model's accuracy
on the whole test split is measured with onnxruntime; only then are the files written (atomically),
with a JSON that says how to feed the model.
"""

import io
import json

import torch
from torch import nn

from kd_cli.atomic import atomic_write_files
from kd_cli.data import normalize
from kd_cli.deploy.source import SOURCE_KEYS, class_names, load_source, parse
from kd_cli.engine import evaluate
from kd_cli.errors import KdError
from kd_cli.measure import count_params, size_mb

CHECK_IMAGES = 256
# fp32 kernels of two runtimes sum in different orders: logits agree to ~1e-5, a wrong graph misses by far more.
RTOL, ATOL = 1e-3, 1e-4


class OnnxModel(nn.Module):
    """An onnxruntime session behind nn.Module's call, so kd's own `evaluate` scores it."""

    def __init__(self, onnx_bytes: bytes):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"input": x.numpy()})[0])


def _program(model: nn.Module, example: torch.Tensor):
    # Two images in the example: torch.export specialises a dimension of size 1, and batch must stay free.
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:  # torch.export rejects data-dependent control flow and more, in many error types
        raise KdError(f"{type(model).__name__} cannot be traced by torch.export ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200]}); export a catalogue model") from e


def _onnx_bytes(program) -> bytes:
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"], output_names=["logits"],
                                         verbose=False)
    except ModuleNotFoundError as e:
        raise KdError(f"ONNX export needs {e.name}; run `pip install onnx onnxscript onnxruntime` (or make install)") from e
    proto = onnx_program.model_proto
    _name_batch_dimension(proto)
    return proto.SerializeToString()


def _name_batch_dimension(proto) -> None:
    """Call the free batch dimension `batch`, as the JSON does; torch.export names it after an internal symbol (s77)."""
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got - want).abs().max().item()
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        raise KdError(f"the {name} model's logits differ from PyTorch's by up to {diff:.3g} on test images; "
                      f"nothing was written (report this with the model name)")
    return diff


def export(source) -> dict:
    """Write `<model>.onnx`, `<model>.pt2` and `<model>.json` into `source.out`; return the JSON's content."""
    model, data = source.model, source.data
    images = normalize(data.test_x[:CHECK_IMAGES], data)
    program = _program(model, images[:2])
    onnx_bytes = _onnx_bytes(program)
    pt2 = io.BytesIO()
    torch.export.save(program, pt2)

    onnx_model = OnnxModel(onnx_bytes)
    pt2.seek(0)
    loaded = torch.export.load(pt2).module()
    with torch.inference_mode():
        want = model(images)
        diffs = {"onnxruntime": _compare("ONNX", onnx_model(images), want),
                 "torch_export": _compare("torch.export", loaded(images), want)}
    accuracy = {"recorded": source.meta.get("metrics", {}).get("accuracy"), "pytorch": evaluate(model, data),
                "onnxruntime": evaluate(onnx_model, data), "test_images": len(data.test_y)}

    import onnx
    import onnxruntime

    out, label = source.out, source.label
    files = {"onnx": out / f"{label}.onnx", "torch_export": out / f"{label}.pt2", "json": out / f"{label}.json"}
    c, s = source.shape[0], source.shape[1]
    info = {
        "model": label, "dataset": source.cfg.dataset.name, "checkpoint": str(source.checkpoint),
        "files": {k: p.name for k, p in files.items()},
        "input": {"name": "input", "shape": ["batch", c, s, s], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", source.cfg.dataset.num_classes], "dtype": "float32"},
        "normalization": {"mean": list(source.cfg.dataset.mean), "std": list(source.cfg.dataset.std),
                          "formula": "input = (pixels / 255 - mean) / std, per channel"},
        "class_names": class_names(source.cfg),
        "accuracy": accuracy,
        "verification": {"test_images": len(images), "max_abs_logit_diff": diffs, "rtol": RTOL, "atol": ATOL},
        "size": {"params": count_params(model), "size_mb": round(size_mb(model), 4),
                 "onnx_bytes": len(onnx_bytes), "pt2_bytes": pt2.getbuffer().nbytes},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnx_opset": next(o.version for o in onnx.load_from_string(onnx_bytes).opset_import if o.domain == "")},
    }
    atomic_write_files({files["onnx"]: onnx_bytes, files["torch_export"]: pt2.getvalue(),
                        files["json"]: (json.dumps(info, indent=2) + "\n").encode()})
    return info


def main(argv: list[str]) -> None:
    _, options = parse("export", "A trained student as ONNX (checked with onnxruntime on real test images) and as a "
                       "torch.export program, with a JSON of its input shape, normalisation, classes, accuracy and size.",
                       argv, SOURCE_KEYS)
    source = load_source(options, "export")
    info = export(source)
    acc, diffs = info["accuracy"], info["verification"]["max_abs_logit_diff"]
    print(f"{source.label} ({source.cfg.dataset.name}): test accuracy {acc['pytorch']:.2f}% in PyTorch, "
          f"{acc['onnxruntime']:.2f}% in onnxruntime ({acc['test_images']} images); logits on "
          f"{info['verification']['test_images']} test images match PyTorch to {diffs['onnxruntime']:.1e} (ONNX) "
          f"and {diffs['torch_export']:.1e} (torch.export)")
    for name in info["files"].values():
        path = source.out / name
        print(f"wrote {path} ({path.stat().st_size / 2**20:.3f} MiB)")
