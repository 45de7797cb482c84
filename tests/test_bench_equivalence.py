"""`make bench` compares like with like: kd's engine and the bench's plain loop compute the same losses.

kd's side is driven through `engine.fit` on a composed config; the plain side is the bench's own
tutorial-style code reading the same files through torchvision. Only speed may differ between them.
"""

import copy

import numpy as np
import pytest
from conftest import seeded_kd_setup, tutorial_config
import torch

from kd_cli.bench.tutorial import LR, plain_ce_step, plain_dataset, plain_kd_step
from kd_cli.data import load_data, normalize
from kd_cli.engine import Teacher, fit, seed_everything
from kd_cli.losses import build_loss
from kd_cli.losses.hinton import CrossEntropy
from kd_cli.models import build_model

STEPS, BATCH = 20, 8
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = ["train.teacher_cache=off", "train.teacher_precision=fp32", "train.channels_last=false", "train.amp=false"]


def recorded(loss_fn) -> list[float]:
    """The value of every call of `loss_fn`, i.e. of every training step, in order."""
    values = []
    loss_fn.register_forward_hook(lambda module, inputs, output: values.append(output.item()))
    return values


def test_both_readers_see_the_same_images(cifar):
    data = load_data(tutorial_config(cifar, BATCH, "lightnn"))
    dataset = plain_dataset(cifar, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=False)
    assert len(dataset) == len(data.train_y) == STEPS * BATCH
    torch.testing.assert_close(torch.from_numpy(dataset.data).permute(0, 3, 1, 2), data.train_x)
    assert dataset.targets == data.train_y.tolist()
    assert dataset.classes[0] == "airplane"


@pytest.mark.parametrize("teacher, student", [("deepnn", "lightnn"), (None, "conv2")],
                         ids=["kd-deepnn-lightnn-dropout", "ce-conv2-batchnorm"])
def test_kd_steps_equal_the_plain_loop_steps(cifar, teacher, student):
    cfg = tutorial_config(cifar, BATCH, student, teacher, extra=EXACT)
    data = load_data(cfg)
    seed_everything(0)
    student_model = build_model(cfg.student, data.spec)
    plain_student = copy.deepcopy(student_model)
    teacher_model = plain_teacher = None
    if teacher:
        seed_everything(1)
        teacher_model = build_model(cfg.teacher, data.spec)
        plain_teacher = copy.deepcopy(teacher_model).eval()

    loss_fn = CrossEntropy() if teacher is None else build_loss(cfg)
    if teacher:
        loss_fn.attach(student_model, teacher_model, normalize(data.train_x[:2], data), len(data.train_y))
    kd_losses = recorded(loss_fn)
    torch.manual_seed(123)  # the same dropout masks on both sides: only the student's forward draws from this RNG
    fit(student_model, loss_fn, data, cfg, CPU, teacher=teacher_model)

    # The plain loop, fed kd's batches: the order of kd's shuffle (a permutation drawn from a
    # generator seeded with cfg.seed), images read and normalised by torchvision.
    dataset = plain_dataset(cifar, cfg.dataset.mean, cfg.dataset.std, augment=False)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.Adam(plain_student.parameters(), lr=LR)
    plain_student.train()
    torch.manual_seed(123)
    plain_losses = []
    for step in range(STEPS):
        items = [dataset[i] for i in order[step * BATCH: (step + 1) * BATCH].tolist()]
        inputs, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
        if teacher:
            plain_losses.append(plain_kd_step(plain_teacher, plain_student, optimizer, inputs, labels))
        else:
            plain_losses.append(plain_ce_step(plain_student, optimizer, inputs, labels))

    assert len(kd_losses) == len(plain_losses) == STEPS
    assert len(set(np.round(kd_losses, 4))) > 1, "the steps must differ (the student learns), or the test proves little"
    np.testing.assert_allclose(kd_losses, plain_losses, rtol=1e-5, atol=1e-6)


def test_teacher_cache_gives_the_losses_of_the_teacher_run_every_step(cifar):
    fp32 = ["train.teacher_precision=fp32", "train.amp=false"]
    cfg_on = tutorial_config(cifar, BATCH, "lightnn", "deepnn", extra=["train.teacher_cache=on", *fp32])
    cfg_off = tutorial_config(cifar, BATCH, "lightnn", "deepnn", extra=["train.teacher_cache=off", *fp32])
    data = load_data(cfg_on)
    seed_everything(1)
    teacher_model = build_model(cfg_on.teacher, data.spec)
    cached = Teacher(copy.deepcopy(teacher_model), [], data, cfg_on, CPU, augment=False)
    live = Teacher(copy.deepcopy(teacher_model), [], data, cfg_off, CPU, augment=False)
    assert cached.cache is not None and live.cache is None

    idx = torch.tensor([37, 3, 150, 12, 12, 99, 0, STEPS * BATCH - 1])  # unordered, a repeat, both ends
    x = normalize(data.train_x[idx], data)
    seed_everything(0)
    student = build_model(cfg_on.student, data.spec).eval()
    loss_fn = build_loss(cfg_on)
    with torch.no_grad():
        student_out = {"logits": student(x)}
        loss_cached = loss_fn(student_out, cached(x, idx), data.train_y[idx], indices=idx)
        loss_live = loss_fn(student_out, live(x, idx), data.train_y[idx], indices=idx)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)


def test_teacher_cache_changes_no_training_step(cifar):
    """Over two epochs (the second one reads the cache), every step's loss matches the uncached run."""
    losses = {}
    for mode in ("on", "off"):
        cfg = tutorial_config(cifar, BATCH, "lightnn", "deepnn", epochs=2,
                     extra=[f"train.teacher_cache={mode}", "train.teacher_precision=fp32", "train.amp=false"])
        data, student, teacher, loss_fn = seeded_kd_setup(cfg)
        losses[mode] = recorded(loss_fn)
        torch.manual_seed(123)
        fit(student, loss_fn, data, cfg, CPU, teacher=teacher)
    assert len(losses["on"]) == 2 * STEPS
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-5, atol=1e-6)
