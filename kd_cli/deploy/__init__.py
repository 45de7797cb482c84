"""From a trained student to a deployable model: `kd export`, `kd quantize`, `kd bench-model`, and the
int8 rows of `kd distill quant=qat` (docs/deploy.md). Plain argparse commands, not Hydra apps: they
read what a run wrote instead of composing a new config."""

import os
import sys

from kd_cli.errors import KdError

COMMANDS = {
    "export": "a trained student as ONNX (checked with onnxruntime) and a torch.export program",
    "quantize": "a trained student in int8: accuracy, size and CPU latency before and after",
    "bench-model": "latency, throughput, size and FLOPs of one model, on the CPU and the GPU",
}


def main(command: str, argv: list[str]) -> int:
    import logging

    from kd_cli.deploy import bench_model, export, quantize

    # kd's own progress lines; torch.onnx's optimiser logs every pass at INFO, which says nothing to a user.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kd_cli").setLevel(logging.INFO)
    run = {"export": export.main, "quantize": quantize.main, "bench-model": bench_model.main}[command]
    try:
        with quantize.quiet():
            run(argv)
    except KdError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(e, file=sys.stderr)
        return 1
    return 0
