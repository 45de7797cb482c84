"""Teacher outputs kept after a fit: in memory for the process's next fit, on disk for later runs.

Every reuse must train exactly as a fresh pass would; anything that changes the outputs (the
teacher, the images, the tapped layers, a temperature the digest cannot see) gets a pass of its own.
"""

import contextlib
import copy
import os
import time

import pytest
from conftest import seeded_kd_setup, tutorial_config
import torch

from kd_cli import teacher_outputs
from kd_cli.data import load_data, normalize
from kd_cli.engine import FitResult, Teacher, fit, seed_everything
from kd_cli.models import build_model
from kd_cli.schemes.ensemble import SoftTargetEnsemble
from kd_cli.store import checksum

STEPS, BATCH = 6, 8
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def nothing_kept_in_memory():
    teacher_outputs.forget()
    yield
    teacher_outputs.forget()


def config(root, *extra, epochs=1):
    return tutorial_config(root, BATCH, "lightnn", "deepnn", epochs=epochs, extra=["train.teacher_cache=on", *extra])


def fitted(cfg, change=lambda data, teacher: None, folder=None) -> tuple[dict, int, FitResult]:
    """The student's weights after a seeded fit, how often the teacher ran during the fit, and its result.

    `change(data, teacher)` may alter the training images or the teacher's weights in place first.
    """
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    change(data, teacher)
    loss_fn.attach(student, teacher, normalize(data.train_x[:2], data), len(data.train_y))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(123)
    result = fit(student, loss_fn, data, cfg, CPU, teacher=teacher, teacher_outputs_folder=folder)
    return student.state_dict(), len(calls), result


def test_the_next_fit_with_the_same_teacher_and_images_takes_the_kept_teacher_outputs(cifar, caplog):
    """The jobs of a sweep run in one process: the second one reuses the first one's cache and trains the same."""
    cfg = config(cifar, epochs=2)
    first, computing_calls, _ = fitted(cfg)
    (key, (outputs, _)), = teacher_outputs._in_memory.items()
    teacher_outputs._in_memory[key] = (outputs, 1000.0)  # as if the pass had taken 1000 s
    with caplog.at_level("INFO", logger="kd_cli.engine"):
        again, calls, result = fitted(cfg)
    assert computing_calls == STEPS and calls == 1  # a pass over every batch, then one batch to check the kept outputs
    assert "taken from this process's previous fit" in caplog.text
    assert result.train_time_s > 1000  # the pass counts where it is reused: train_time_s compares across jobs
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)
    teacher_outputs.forget()
    assert fitted(cfg)[1] == computing_calls


@pytest.mark.parametrize("between", ["train.teacher_cache=off", "loss=ce"], ids=["teacher-every-step", "no-teacher"])
def test_a_fit_that_does_not_use_the_kept_teacher_outputs_drops_them(cifar, between):
    """No job's memory holds an earlier job's cache."""
    cfg = config(cifar)
    fitted(cfg)
    fitted(tutorial_config(cifar, BATCH, "lightnn", "deepnn", extra=[between]))
    assert not teacher_outputs._in_memory
    assert fitted(cfg)[1] == STEPS


def _nudge_a_teacher_weight(data, teacher):
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1e-3


def _change_one_pixel(data, teacher):
    data.train_x[7, 0, 3, 3] ^= 1


@pytest.mark.parametrize("change", [_nudge_a_teacher_weight, _change_one_pixel, "loss=at"],
                         ids=["teacher-weights", "training-images", "tapped-layers"])
def test_another_teacher_other_images_or_other_layers_get_their_own_teacher_outputs(cifar, change):
    cfg = config(cifar)
    fitted(cfg)
    if isinstance(change, str):
        cfg, change = config(cifar, change), lambda *_: None
    assert fitted(cfg, change)[1] == STEPS


def test_another_thread_count_gets_its_own_teacher_outputs(cifar, tmp_path, caplog):
    """The thread count changes the outputs' last bits, and kept outputs must equal a new pass's bit for
    bit: 1-thread workers of a parallel sweep and a 2-thread run each keep their own."""
    with caplog.at_level("INFO"):
        for threads in (2, 1, 2):
            fitted(config(cifar, f"train.threads={threads}"), folder=tmp_path)
            teacher_outputs.forget()
    assert len(list(tmp_path.glob("*.pt"))) == 2 and "differ from this teacher's" not in caplog.text


def test_an_ensemble_at_another_temperature_gets_its_own_teacher_outputs(cifar):
    """`scheme=multi_teacher T=1,4` as a sweep: same members and buffers, another temperature."""
    cfg = config(cifar)
    data = load_data(cfg)
    seed_everything(1)
    member = build_model(cfg.teacher, data.spec)
    logits = {T: Teacher(SoftTargetEnsemble([copy.deepcopy(member)], T), [], data, cfg, CPU, augment=False).cache["logits"]
              for T in (1.0, 4.0)}
    expected = Teacher(SoftTargetEnsemble([copy.deepcopy(member)], 4.0), [], data, cfg, CPU, augment=False).cache["logits"]
    assert not torch.equal(logits[1.0], logits[4.0])
    torch.testing.assert_close(logits[4.0], expected, rtol=0, atol=0)


def test_a_later_run_takes_the_outputs_saved_on_disk_and_trains_the_same(cifar, tmp_path, caplog):
    """A separate `kd distill` (a new process: nothing in memory) with the same teacher and images."""
    cfg = config(cifar, epochs=2)
    first, computing_calls, _ = fitted(cfg, folder=tmp_path)
    saved, = tmp_path.glob("*.pt")
    payload = torch.load(saved, weights_only=True)
    torch.save(payload | {"seconds": 1000.0}, saved)  # as if the pass had taken 1000 s
    teacher_outputs.forget()
    with caplog.at_level("INFO", logger="kd_cli.engine"):
        again, calls, result = fitted(cfg, folder=tmp_path)
    assert calls == 1  # the first batch only, to check what was found
    assert f"taken from {saved}" in caplog.text
    assert result.train_time_s > 1000  # the pass counts where it is reused, as it does in memory
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)
    assert fitted(cfg, folder=tmp_path)[1] == 1  # and from memory in the same process


def test_a_parallel_job_waits_for_the_outputs_another_is_computing_then_reads_them(cifar, tmp_path, monkeypatch, caplog):
    """Two workers of a parallel sweep with the same teacher and images: one teacher pass, not two."""
    import threading

    monkeypatch.setattr("kd_cli.store.LOCK_POLL_S", 0.02)
    cfg = config(cifar)
    fitted(cfg, folder=tmp_path)
    saved, = tmp_path.glob("*.pt")
    content = saved.read_bytes()
    saved.unlink()
    teacher_outputs.forget()
    holding = threading.Event()

    def other_job():  # computing the same outputs: they reach the disk a moment after this job starts
        with teacher_outputs.computing(saved.stem, tmp_path):
            holding.set()
            time.sleep(0.5)
            saved.write_bytes(content)

    asked_and_got = []
    computing = teacher_outputs.computing

    @contextlib.contextmanager
    def timed_computing(*args):
        asked = time.perf_counter()
        with computing(*args) as waited:
            asked_and_got.append((asked, time.perf_counter()))
            yield waited

    other = threading.Thread(target=other_job)
    other.start()
    assert holding.wait(5)
    monkeypatch.setattr(teacher_outputs, "computing", timed_computing)  # this job's, not the other's
    with caplog.at_level("INFO"):
        started = time.perf_counter()
        _, calls, result = fitted(cfg, folder=tmp_path)
        wall = time.perf_counter() - started
    other.join()
    assert calls == 1  # the first batch, to check what it read; no pass of its own
    # The other job's pass counts at what it cost, as a cache an earlier fit kept; the wait for it does not count.
    (asked, got), = asked_and_got
    assert got - asked > 0.1
    assert result.train_time_s <= wall - (got - asked) + torch.load(saved, weights_only=True)["seconds"]
    assert f"waiting for {saved.name}" in caplog.text and f"taken from {saved}" in caplog.text
    assert list(tmp_path.iterdir()) == [saved]  # no lock file left


def rewrite(path, change) -> None:
    """Save the payload at `path` again after `change(payload)`."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def _change_a_later_image(payload):  # a flipped bit that torch.load does not notice: the checksum does
    payload["outputs"]["logits"][STEPS * BATCH - 1, 0] += 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another key", "a later image"])
def test_an_unusable_file_is_computed_again_and_replaced(cifar, tmp_path, caplog, damage):
    cfg = config(cifar)
    expected, _, _ = fitted(cfg, folder=tmp_path)
    saved, = tmp_path.glob("*.pt")
    if damage == "garbage":
        saved.write_bytes(b"not a torch file")
    elif damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:200])
    elif damage == "another key":
        rewrite(saved, lambda payload: payload.update(key="0" * 64))
    else:
        rewrite(saved, _change_a_later_image)
    teacher_outputs.forget()
    with caplog.at_level("WARNING", logger="kd_cli.teacher_outputs"):
        weights, calls, _ = fitted(cfg, folder=tmp_path)
    assert calls == STEPS and f"{saved} is unusable" in caplog.text
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    teacher_outputs.forget()
    assert fitted(cfg, folder=tmp_path)[1] == 1  # the replacement is whole


def test_outputs_that_differ_on_the_first_batch_are_not_used(cifar, tmp_path, caplog):
    """A whole file whose outputs this teacher does not give (another torch build, a forward that reads a
    plain attribute the digest cannot see) is caught by the first batch, computed anew."""
    cfg = config(cifar)
    fitted(cfg, folder=tmp_path)
    saved, = tmp_path.glob("*.pt")

    def change_the_first_image(payload):
        payload["outputs"]["logits"][0, 0] += 1
        payload["checksum"] = checksum(payload["outputs"])

    rewrite(saved, change_the_first_image)
    teacher_outputs.forget()
    with caplog.at_level("INFO", logger="kd_cli.teacher_outputs"):
        assert fitted(cfg, folder=tmp_path)[1] == STEPS
    assert f"kept in {saved} differ from this teacher's on the first batch" in caplog.text


def outputs_of(mb: float) -> dict:
    return {"logits": torch.zeros(int(mb * 2**20) // 2, dtype=torch.bfloat16)}


def found(name: str, folder) -> bool:
    outputs = outputs_of(1)
    return teacher_outputs.find(name, folder, {"logits": outputs["logits"][:4]}, len(outputs["logits"])) is not None


def test_the_folder_stays_within_its_size_least_recently_used_first(tmp_path):
    for age, name in enumerate(["c", "b", "a"]):  # a is the oldest
        teacher_outputs.keep(name, outputs_of(1), 1.0, tmp_path, max_disk_mb=3.5)
        os.utime(tmp_path / f"{name}.pt", (1e9 - age, 1e9 - age))
    assert found("a", tmp_path)  # used now: the newest
    teacher_outputs.keep("d", outputs_of(1), 1.0, tmp_path, max_disk_mb=3.5)
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["a", "c", "d"]  # b, the least recently used, went
    teacher_outputs.keep("d", outputs_of(1), 1.0, tmp_path, max_disk_mb=3.5)  # replaced: takes no more room
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["a", "c", "d"]
    teacher_outputs.keep("e", outputs_of(2), 1.0, tmp_path, max_disk_mb=3.5)
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["d", "e"]  # c, then a (used before d was written)


def test_outputs_over_the_disk_size_are_kept_in_memory_only(tmp_path, caplog):
    with caplog.at_level("INFO", logger="kd_cli.teacher_outputs"):
        teacher_outputs.keep("big", outputs_of(2), 1.0, tmp_path, max_disk_mb=1)
        teacher_outputs.keep("none", outputs_of(1), 1.0, tmp_path, max_disk_mb=0)
    assert not list(tmp_path.iterdir())
    assert "over train.teacher_cache_disk_mb=1" in caplog.text and "=0" not in caplog.text
    assert found("none", None)


def test_a_store_this_user_may_not_change_costs_no_run(tmp_path, monkeypatch, caplog):
    """A colleague's files in a shared store: not ours to touch or remove; a read-only store: no saving."""
    teacher_outputs.keep("theirs", outputs_of(1), 1.0, tmp_path, max_disk_mb=1.5)
    teacher_outputs.forget()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "utime", refuse)
    monkeypatch.setattr(type(tmp_path), "unlink", refuse)
    assert found("theirs", tmp_path)
    monkeypatch.setattr(os, "replace", refuse)
    with caplog.at_level("WARNING", logger="kd_cli.teacher_outputs"):
        teacher_outputs.keep("mine", outputs_of(1), 1.0, tmp_path, max_disk_mb=1.5)
    assert "not saved for later runs" in caplog.text and "Permission denied" in caplog.text
    assert found("mine", None)  # in memory all the same
    assert [p.stem for p in tmp_path.glob("*.pt")] == ["theirs"]


def test_writes_killed_long_ago_leave_nothing_behind(tmp_path):
    abandoned, in_progress = tmp_path / ".a.pt.x1y2.tmp", tmp_path / ".b.pt.z3w4.tmp"  # atomic_write's names
    for leftover in (abandoned, in_progress):
        leftover.write_bytes(bytes(2**20))
    os.utime(abandoned, (time.time() - 2 * 3600,) * 2)
    teacher_outputs.keep("c", outputs_of(1), 1.0, tmp_path, max_disk_mb=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_progress.name, "c.pt"]  # another run may be writing b
