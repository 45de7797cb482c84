"""`kd distill quant=qat`: the distilled student in int8, quantized after training and trained quantized.

Two rows after the fp32 `student_kd` row, measured like it (Run.row) but as int8 models on the CPU,
where PyTorch's int8 kernels run:

- `student_kd_ptq`: the finished KD student, post-training quantized (activation ranges from
  `qat.calibration_images` training images);
- `student_kd_qat`: a copy fine-tuned for `qat.epochs` with fake quantization in its forward pass,
  still learning from the teacher with the run's own loss, then converted to int8. It starts from
  the trained student, so a lower learning rate (`qat.lr`, default train.lr / 10) only adapts it
  to int8 rounding instead of retraining it.

The int8 models are saved beside student.pt as TorchScript (`torch.jit.load`).
"""

import logging

import torch
from omegaconf import OmegaConf

from kd_cli.deploy.quantize import calibration_batches, convert, prepare_qat, quantize, scripted_int8, write_scripted
from kd_cli.engine import evaluate, fit
from kd_cli.errors import KdError

log = logging.getLogger(__name__)


def unusable_paths(paths: list[str], fake_quantized) -> list[str]:
    """The hooked paths that would not give the fp32 run's feature in the fake-quantized (FX) model.

    Fusion removes the ReLU (or BatchNorm) after a convolution and makes the convolution's output
    that of the fused block: Conv -> BN -> ReLU hooked at the Conv would become ReLU(BN(conv)). And
    tracing inlines a container (resnet18's `layer3`): its module stays, but is never called, so a
    hook on it would never fire.
    """
    layers = dict(fake_quantized.named_modules())
    called = {node.target for node in fake_quantized.graph.nodes if node.op == "call_module"}

    def usable(path: str) -> bool:
        name, _, side = path.partition(":")
        fused = name in layers and type(layers[name]).__module__.startswith("torch.ao.nn.intrinsic")
        return name in called and (side == "in" or not fused)

    return [path for path in paths if not usable(path)]


def check_hooked_layers(student, loss_fn, example: torch.Tensor) -> None:
    """Refuse, before the fp32 student trains, a loss whose student layers the fake-quantized copy would lose."""
    fused_away = unusable_paths(loss_fn.student_layers, prepare_qat(student, example[:2]))
    if fused_away:
        raise KdError(f"quant=qat: loss={loss_fn.loss_name()} hooks student layer(s) {', '.join(fused_away)}, which "
                      f"quantization fuses with its neighbours or traces through, so the loss would not see that "
                      f"feature; choose other loss.student_layers (such as pooling layers or a block's last ReLU) or "
                      f"set quant=null")


def qat_rows(run, teacher, student, loss_fn, **columns) -> list[dict]:
    """The `student_kd_ptq` and `student_kd_qat` rows of the finished fp32 KD `student`.

    `columns` adds to (or replaces) the scheme, loss, alpha and T columns, e.g. taught_by=...
    """
    cfg = run.cfg
    # config.validate has checked these before any training.
    epochs, images = int(cfg.qat.epochs), int(cfg.qat.calibration_images)
    lr = cfg.train.lr / 10 if cfg.qat.lr is None else float(cfg.qat.lr)
    cpu_data = run.data.to(torch.device("cpu"))
    calibration = calibration_batches(cpu_data, images, cfg.seed)
    columns = run.distill_columns() | columns

    def row(role: str, int8, metrics: dict) -> dict:
        path = run.run_dir / f"{role}.torchscript.pt"
        write_scripted(scripted_int8(int8), path)
        accuracy = evaluate(int8, cpu_data)
        log.info("%s: int8 test accuracy %.2f%% on the CPU, saved to %s", role, accuracy, path)
        return run.row(role, int8, cfg.student, {"metrics": {"accuracy": accuracy, **metrics}}, path, **columns)

    rows = [row("student_kd_ptq", quantize(student, calibration), {})]

    # Its hooked layers were checked on the untrained student (check_hooked_layers), whose structure this shares.
    fake_quantized = prepare_qat(student, calibration[0][:2]).to(run.device)
    # Fake quantization has fp32 kernels only: no bf16 autocast for this fine-tuning.
    qat_cfg = OmegaConf.merge(cfg, {"train": {"epochs": epochs, "lr": lr, "amp": False}})
    log.info("student_kd_qat: qat.epochs=%d of quantization-aware training from the KD student, lr %g, in fp32: "
             "fake quantization has no bf16 kernels, so this fine-tuning runs with train.amp=false", epochs, lr)
    # The loss's schedule goes on from the fp32 run's last epoch: dkd at its full weight, fitnets and fsp
    # in their second stage (from epoch 1, they would fine-tune on dkd's first ramp or on hints alone).
    result = fit(fake_quantized, loss_fn, run.data, qat_cfg, run.device, teacher=teacher, label="student_kd_qat",
                 state_path=run.state_path("student_kd_qat"), epochs_before=int(cfg.train.epochs))
    int8 = convert(fake_quantized, calibration[0][:2])
    # train_time_s is the fine-tuning's own (teacher outputs it reuses count at their cost, as in any fit):
    # the fp32 KD student it starts from has its own row.
    rows.append(row("student_kd_qat", int8, {"train_time_s": result.train_time_s, "train_img_per_s": result.train_img_per_s}))
    return rows
