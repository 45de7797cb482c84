"""The engine: what a fit records per epoch and when resumed, what it refuses, its optimizer and its
devices, on tiny CIFAR-format files."""

import dataclasses
import re
import time

import pytest
import torch
from conftest import seeded_kd_setup, tutorial_config

from kd_cli import engine
from kd_cli.data import load_data
from kd_cli.engine import fit, seed_everything
from kd_cli.errors import KdError
from kd_cli.losses.hinton import CrossEntropy
from kd_cli.models import build_model
from kd_cli.store import nested_checksum

STEPS, BATCH = 2, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def fitted(cfg, data=None):
    data = data or load_data(cfg)
    seed_everything(0)
    student = build_model(cfg.student, data.spec)
    return fit(student, CrossEntropy(), data, cfg, torch.device("cpu"))


def test_each_epoch_records_the_learning_rate_it_trained_with(cifar):
    """Cosine over 3 epochs from 0.3: epochs 1-3 train at 0.3, 0.225 and 0.075 (the schedule steps after each)."""
    cfg = tutorial_config(cifar, BATCH, "lightnn", epochs=3, extra=["train.schedule=cosine", "train.lr=0.3"])
    lrs = [epoch["lr"] for epoch in fitted(cfg).history]
    assert lrs == pytest.approx([0.3, 0.225, 0.075])


def test_a_training_set_of_one_image_is_refused_in_one_line(cifar):
    cfg = tutorial_config(cifar, BATCH, "lightnn")
    data = load_data(cfg)
    one = dataclasses.replace(data, train_x=data.train_x[:1], train_y=data.train_y[:1])
    with pytest.raises(KdError, match=r"kd: error: student: 1 training image; at least 2 are needed \(raise data.fraction\)$"):
        fitted(cfg, one)


def _stopped_after_epoch_1(cfg, state_path, **changes):
    """The training state a 2-epoch fit would have left had it stopped after epoch 1, with `changes`."""
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher, state_path=state_path)
    state = torch.load(state_path, weights_only=True)
    state.pop("checksum")
    state |= {"epoch": 1, "history": state["history"][:1], **changes}
    torch.save(state | {"checksum": nested_checksum(state)}, state_path)


def resumed(cfg, state_path):
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    return fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher, state_path=state_path)


def test_a_resumed_fit_counts_the_teachers_pass_once(cifar, tmp_path, monkeypatch):
    """The time saved with the state already holds the teacher's pass: resuming must not add it again."""
    cfg = tutorial_config(cifar, BATCH, "lightnn", teacher="lightnn", epochs=2)
    state_path = tmp_path / "state.pt"
    _stopped_after_epoch_1(cfg, state_path, elapsed_s=1000.0)
    teacher_init = engine.Teacher.__init__

    def a_kept_cache_that_cost_500_s(self, *args, **kwargs):
        teacher_init(self, *args, **kwargs)
        self.seconds_reused = 500.0

    monkeypatch.setattr(engine.Teacher, "__init__", a_kept_cache_that_cost_500_s)
    started = time.perf_counter()
    result = resumed(cfg, state_path)
    assert [epoch["epoch"] for epoch in result.history] == [1, 2]
    assert 1000.0 <= result.train_time_s <= 1000.0 + (time.perf_counter() - started)


def test_a_state_saved_on_another_device_is_refused_in_one_line(cifar, tmp_path):
    cfg = tutorial_config(cifar, BATCH, "lightnn", teacher="lightnn", epochs=2)
    state_path = tmp_path / "state.pt"
    _stopped_after_epoch_1(cfg, state_path, device="cuda")
    kept = state_path.read_bytes()
    with pytest.raises(KdError, match=rf"kd: error: {state_path} was saved by a run on cuda; resume it with device=cuda, "
                                      r"or delete that file to start over on cpu$"):
        resumed(cfg, state_path)
    assert state_path.read_bytes() == kept


def test_a_state_whose_content_changed_is_refused_not_resumed(cifar, tmp_path):
    """torch.load does not check a zip archive's CRCs: one flipped bit in a weight would be trained on, then stored."""
    cfg = tutorial_config(cifar, BATCH, "lightnn", teacher="lightnn", epochs=2)
    state_path = tmp_path / "state.pt"
    _stopped_after_epoch_1(cfg, state_path)
    state = torch.load(state_path, weights_only=True)
    state["model"]["features.0.weight"][0, 0, 0, 0] *= 2**30  # as one flipped exponent bit would
    torch.save(state, state_path)
    with pytest.raises(KdError, match=rf"^kd: error: training state {state_path} is corrupt \(its content does not match "
                                      r"its checksum\); delete it to start this model over$"):
        resumed(cfg, state_path)


def test_a_state_saved_while_learning_from_another_teacher_is_refused(cifar, tmp_path):
    """teacher.checkpoint names a file: replaced between a stop and the resume, its new weights would teach
    the remaining epochs, and the result would show no sign of it."""
    cfg = tutorial_config(cifar, BATCH, "lightnn", teacher="lightnn", epochs=2)
    state_path = tmp_path / "state.pt"
    _stopped_after_epoch_1(cfg, state_path)
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    with torch.no_grad():
        next(teacher.parameters()).mul_(2)
    with pytest.raises(KdError, match=rf"^kd: error: {state_path} was saved while learning from another teacher \(its "
                                      r"weights have changed since\); delete that file to start over with this one$"):
        fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher, state_path=state_path)
    assert [epoch["epoch"] for epoch in resumed(cfg, state_path).history] == [1, 2]  # the same teacher resumes


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_trains_a_parameter_whose_first_gradient_comes_late_as_unfused_sgd_does(nesterov):
    """A two-stage loss (fitnets, fsp) leaves the classifier without gradients in its first stage; fused
    SGD with momentum failed on the step where it got its first one."""
    from omegaconf import OmegaConf

    train_cfg = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": nesterov})
    torch.manual_seed(0)
    kd_params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    plain_params = [p.detach().clone().requires_grad_() for p in kd_params]
    ours = engine._optimizer(kd_params, train_cfg, torch.device("cpu"))
    reference = torch.optim.SGD(plain_params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, foreach=False)
    for step in range(4):
        for params, optimizer in ((kd_params, ours), (plain_params, reference)):
            optimizer.zero_grad(set_to_none=True)
            used = params if step >= 2 else params[:1]  # the second parameter gets gradients from step 2 on
            sum((p * (k + 1)).square().sum() for k, p in enumerate(used)).backward()
            optimizer.step()
    for ours_p, reference_p in zip(kd_params, plain_params):
        torch.testing.assert_close(ours_p, reference_p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, message", [
    ("cuda:abc", "device=cuda:abc is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cudax", "device=cudax is not one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:2", "device=cuda:2 does not exist; this machine has 1 GPU(s)"),
])
def test_a_device_name_a_gpu_machine_cannot_use_is_one_line(monkeypatch, name, message):
    """As on a machine with one GPU (faked: these tests run on CPUs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(KdError, match=re.escape(message)):
        engine.resolve_device(name)
    assert engine.resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("test_accuracy, train_accuracy, warned", [(10.0, 9.93, True), (10.0, 28.5, True), (57.4, 37.1, False)])
def test_a_model_that_ends_at_chance_gets_a_warning_that_says_what_to_try(caplog, test_accuracy, train_accuracy, warned):
    with caplog.at_level("WARNING", logger="kd_cli.engine"):
        engine._warn_if_at_chance("student_kd", {"test_accuracy": test_accuracy, "train_accuracy": train_accuracy}, 10)
    expected = ("student_kd: ended at 10.00% test accuracy, about chance for 10 classes: its training collapsed or has "
                "barely started; lower train.lr")
    assert (expected in caplog.text) == warned


@pytest.mark.parametrize("epochs_before, stage", [(0, "hints alone"), (2, "second stage")])
def test_a_continued_fit_goes_on_with_its_losss_schedule(cifar, caplog, epochs_before, stage):
    """quant=qat fine-tunes a distilled student with its loss: fitnets must stay in its second stage
    (from epoch 1 it would train on the hint alone), and dkd at its full weight, warned about once only."""
    cfg = tutorial_config(cifar, BATCH, "lightnn", "deepnn", epochs=2, extra=["loss=fitnets", "loss.stage1_epochs=1"])
    cfg.train.epochs = 1
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    loss_fn.attach(student, teacher, data.train_x[:2].float(), len(data.train_y))
    fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher, epochs_before=epochs_before)
    assert ("hints alone" if loss_fn.hint_only else "second stage") == stage

    cfg = tutorial_config(cifar, BATCH, "lightnn", "deepnn", extra=["loss=dkd", "loss.warmup_epochs=20"])
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher, epochs_before=epochs_before)
    assert loss_fn.ramp == (epochs_before + 1) / 20
    assert ("loss.warmup_epochs=20" in caplog.text) == (epochs_before == 0)


def test_on_a_terminal_the_epoch_line_still_reaches_the_runs_log_file(tmp_path, monkeypatch):
    """The progress bar shows each epoch's line on a terminal; the run's log file (Hydra's file handler)
    must keep it too, or a run that fails later leaves no per-epoch record."""
    import logging
    import sys

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    handler = logging.FileHandler(tmp_path / "train.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = engine._Progress("teacher", 2, 3, 1)
        assert progress.bar is not None
        progress.epoch({"epoch": 1, "loss": 0.5, "train_accuracy": 80.0, "test_accuracy": 75.0, "img_per_s": 900.0})
        progress.close()
    finally:
        root.removeHandler(handler)
        handler.close()
    assert (tmp_path / "train.log").read_text() == "teacher epoch 1/2  loss 0.5000  train 80.00%  test 75.00%  900 img/s\n"


def test_a_fit_hands_the_teacher_back_in_its_own_memory_layout(cifar):
    cfg = tutorial_config(cifar, BATCH, "lightnn", teacher="deepnn", extra=["train.channels_last=true"])
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    fit(student, loss_fn, data, cfg, torch.device("cpu"), teacher=teacher)
    assert all(p.is_contiguous() for p in [*teacher.parameters(), *student.parameters()])


@pytest.mark.parametrize("epochs, fractions, lrs", [
    (4, [0.5, 0.9], [1.0, 1.0, 0.1, 0.01]),  # 0.9 of 4 epochs rounds to 4: its drop comes before the last epoch
    (200, [0.5, 0.75], [1.0] * 100 + [0.1] * 50 + [0.01] * 50),
    (3, [0.5, 0.75], [1.0, 1.0, 0.01]),  # both fall after epoch 2: each milestone multiplies by gamma
])
def test_multistep_milestones_fall_within_the_training(epochs, fractions, lrs):
    from omegaconf import OmegaConf

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    train_cfg = OmegaConf.create({"schedule": "multistep", "epochs": epochs, "milestones": fractions, "gamma": 0.1})
    schedule = engine._schedule(optimizer, train_cfg)
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(lrs)


@pytest.mark.parametrize("device, waits_on", [("cuda", "cuda"), ("mps", "mps"), ("cpu", None)])
def test_timings_wait_for_the_work_a_gpu_has_queued(monkeypatch, device, waits_on):
    """CUDA and MPS run kernels after the Python call returns: epoch times, the teacher's pass and latency wait for them."""
    from kd_cli.measure import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: waited.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    synchronize(torch.device(device))
    assert waited == ([waits_on] if waits_on else [])
