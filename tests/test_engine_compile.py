"""`train.compile=true`: the student through torch.compile gives the eager losses, and says so in the log.

Compilation takes seconds here (Inductor writes and builds C++), so the file keeps to one tiny
compiled fit; the comparison is in fp32, where only the order of floating-point sums may differ.
"""

import logging
import shutil

import pytest
from conftest import seeded_kd_setup
import torch
import torch._inductor.config

from kd_cli.bench.sides import compose_config, tutorial_overrides
from kd_cli.data import normalize
from kd_cli.engine import fit
from kd_cli.errors import KdError

STEPS, BATCH = 3, 8  # every batch full: a smaller last batch would make torch.compile compile again
pytestmark = pytest.mark.usefixtures("one_thread")


def config(root, *extra):
    overrides = [*tutorial_overrides(root, "cpu", 1, augment=False, batch_size=BATCH), "student=lightnn",
                 "teacher=deepnn", "alpha=0.25", "T=2", "train.amp=false", "train.teacher_precision=fp32", *extra]
    return compose_config("distill", overrides)


def step_losses(cfg) -> list[float]:
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    loss_fn.attach(student, teacher, normalize(data.train_x[:2], data), len(data.train_y))
    losses = []
    loss_fn.register_forward_hook(lambda module, inputs, out: losses.append(out.item()))
    torch.manual_seed(123)  # the same dropout masks in both fits
    fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher)
    return losses


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor needs a C++ compiler on the CPU")
def test_compiled_student_gives_the_eager_losses(cifar, caplog):
    eager = step_losses(config(cifar, "loss=kd"))
    # Inductor draws dropout masks from its own generator unless told to use torch's, as eager does.
    with caplog.at_level(logging.INFO, logger="kd_cli.engine"), torch._inductor.config.patch(fallback_random=True):
        compiled = step_losses(config(cifar, "loss=kd", "train.compile=true"))
    assert len(compiled) == len(eager) == STEPS
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert "runs through torch.compile" in caplog.text


def test_compile_refuses_losses_that_hook_layers_before_training(cifar):
    with pytest.raises(KdError, match="train.compile=true does not combine with losses that hook intermediate layers"):
        step_losses(config(cifar, "loss=fitnets", "train.compile=true"))
