"""Checkpoints: atomic, refused when unsafe, corrupt, foreign or for another model."""

import os
import pickle
import re
import time

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.atomic import atomic_write, atomic_write_files, atomic_write_text
from kd_cli.errors import KdError
from kd_cli.models import ImageSpec, build_model
from kd_cli.store import load_checkpoint, load_into, save_checkpoint, store_path

CFG = OmegaConf.create({
    "dataset": {"name": "fashion_mnist", "num_classes": 10}, "seed": 0, "store_dir": "outputs/store",
    "train": {"epochs": 2, "lr": 0.1, "amp": "auto", "teacher_cache": "auto"},
    "data": {"root": "data", "download": True, "fraction": 1.0},
})
MODEL = OmegaConf.create({"arch": "lightnn", "checkpoint": None})
SPEC = ImageSpec(1, 28, 10)


def saved(tmp_path):
    path = tmp_path / "m.pt"
    model = build_model(MODEL, SPEC)
    save_checkpoint(path, model, {"model": "lightnn", "dataset": "fashion_mnist", "num_classes": 10})
    return path, model


def test_round_trip(tmp_path):
    path, model = saved(tmp_path)
    fresh = build_model(MODEL, SPEC)
    load_into(fresh, load_checkpoint(path), path, MODEL, CFG)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "kd-checkpoint/1", "meta": Exploit()}, path)
    with pytest.raises(KdError, match="not a kd checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    path, _ = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(KdError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"model: lightnn\n", "is not a checkpoint file (PyTorch writes zip archives; this one starts with b'model: l')"),
    (pickle.dumps({"weights": list(range(100))}, protocol=2)[:20], "truncated or corrupt"),  # a legacy pickle, cut short
    (b"", "truncated or corrupt"),
])
def test_a_file_that_was_never_a_checkpoint_is_told_from_a_damaged_one(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(KdError, match=re.escape(message)):
        load_checkpoint(path)


def test_a_checkpoint_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    path, _ = saved(tmp_path)

    def denied(_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("kd_cli.store.safe_load", denied)  # chmod cannot show it to root, who reads anything
    with pytest.raises(KdError, match=re.escape(f"cannot read checkpoint {path} (Permission denied); check its permissions")):
        load_checkpoint(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(KdError, match="is not a kd checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    ({"dataset": {"name": "mnist"}}, "is for dataset=fashion_mnist, not mnist"),
    ({"dataset": {"num_classes": 100}}, "is for num_classes=10, not 100"),
])
def test_checkpoint_for_another_dataset(tmp_path, change, message):
    path, _ = saved(tmp_path)
    with pytest.raises(KdError, match=message):
        load_into(build_model(MODEL, SPEC), load_checkpoint(path), path, MODEL, OmegaConf.merge(CFG, change))


def test_checkpoint_for_another_architecture(tmp_path):
    path, _ = saved(tmp_path)
    other = OmegaConf.create({"arch": "deepnn", "checkpoint": None})
    with pytest.raises(KdError, match="is for model=lightnn, not deepnn"):
        load_into(build_model(other, SPEC), load_checkpoint(path), path, other, CFG)


def test_store_key_follows_the_recipe_not_runtime_switches():
    base = store_path(CFG, MODEL)
    assert base.parts[:4] == ("outputs", "store", "fashion_mnist", "lightnn") and base.name.startswith("seed0-")
    assert store_path(OmegaConf.merge(CFG, {"train": {"teacher_cache": "off", "amp": False}}), MODEL) == base
    assert store_path(OmegaConf.merge(CFG, {"data": {"root": "/elsewhere"}}), MODEL) == base
    assert store_path(OmegaConf.merge(CFG, {"train": {"epochs": 3}}), MODEL) != base
    assert store_path(OmegaConf.merge(CFG, {"data": {"fraction": 0.5}}), MODEL) != base
    assert store_path(OmegaConf.merge(CFG, {"seed": 1}), MODEL).name.startswith("seed1-")


def test_a_setting_the_recipe_does_not_read_keeps_its_key():
    from pathlib import Path

    from kd_cli.cli import config_dir
    from kd_cli.identity import numbers_as_floats
    from kd_cli.store import _digest, _RUNTIME_ONLY, model_spec

    cfg = OmegaConf.merge(CFG, {"train": OmegaConf.load(Path(config_dir()) / "base.yaml").train})  # sgd, cosine
    key = store_path(cfg, MODEL)
    # The defaults hash as they always did: models stored before keep their keys.
    as_before = {"recipe": {"dataset": "fashion_mnist", **{block: {k: v for k, v in OmegaConf.to_container(cfg[block]).items()
                                                                  if k not in skip} for block, skip in _RUNTIME_ONLY.items()}},
                 "model": model_spec(MODEL)}
    assert key.name == f"seed0-{_digest(numbers_as_floats(as_before))}.pt"
    # kd warns that these change nothing: the same model, so the same key (not a needless retrain).
    assert store_path(OmegaConf.merge(cfg, {"train": {"gamma": 0.5, "milestones": [0.3]}}), MODEL) == key
    adam = OmegaConf.merge(cfg, {"train": {"optimizer": "adam"}})
    assert store_path(OmegaConf.merge(adam, {"train": {"momentum": 0.5, "nesterov": True}}), MODEL) == store_path(adam, MODEL)
    # Read, so another model.
    assert store_path(OmegaConf.merge(cfg, {"train": {"momentum": 0.5}}), MODEL) != key
    multistep = OmegaConf.merge(cfg, {"train": {"schedule": "multistep"}})
    assert store_path(OmegaConf.merge(multistep, {"train": {"gamma": 0.5}}), MODEL) != store_path(multistep, MODEL)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write_text(path, "old\n")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(KdError, match="cannot write .*results.csv: No space left on device; its previous version is intact"):
        atomic_write(path, fail)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left behind


def test_files_written_together_are_all_replaced_or_none_is(tmp_path):
    """A model and the results that describe it (kd quantize, kd export) stay a matching set."""
    paths = [tmp_path / name for name in ("a.pt", "b.json", "c.md")]
    for path in paths:
        path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(KdError, match=r"cannot write .*b.json: No space left on device; none of a.pt, b.json, c.md was replaced"):
        atomic_write_files({paths[0]: b"new", paths[1]: fail, paths[2]: b"new"})
    assert [p.read_bytes() for p in paths] == [b"old"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.json", "c.md"]  # no temporary file left behind

    # A rename over a folder would fail after the files before it were replaced: refused before any write.
    paths[2].unlink()
    paths[2].mkdir()
    with pytest.raises(KdError, match=r"cannot write .*c.md: a folder has that name"):
        atomic_write_files({path: b"new" for path in paths})
    assert [p.read_bytes() for p in paths[:2]] == [b"old"] * 2

    paths[2].rmdir()
    atomic_write_files({path: b"new" for path in paths})
    assert [p.read_bytes() for p in paths] == [b"new"] * 3


def test_a_failed_rename_leaves_no_temporary_file_and_says_what_was_replaced(tmp_path, monkeypatch):
    """A rename can fail (EPERM over another user's file in a shared, sticky folder) after others succeeded."""
    import errno
    import signal

    paths = [tmp_path / name for name in ("a.pt", "b.json")]
    for path in paths:
        path.write_bytes(b"old")
    real_replace, masks = os.replace, []

    def second_rename_refused(src, dst):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # the signals held while renaming
        if str(dst).endswith("b.json"):
            raise OSError(errno.EPERM, "Operation not permitted")
        real_replace(src, dst)

    monkeypatch.setattr("kd_cli.atomic.os.replace", second_rename_refused)
    with pytest.raises(KdError, match=r"b.json: Operation not permitted; already replaced: a.pt; previous versions intact: b.json"):
        atomic_write_files({path: b"new" for path in paths})
    assert [p.read_bytes() for p in paths] == [b"new", b"old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.json"]
    # Ctrl-C and SIGTERM wait for the renames (kd turns them into exceptions): no stop between two of them.
    assert all({signal.SIGINT, signal.SIGTERM} <= mask for mask in masks)
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_run_stopped_mid_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    from kd_cli.errors import Terminated

    path = tmp_path / "results.csv"
    atomic_write_text(path, "old\n")

    def stopped(f):  # SIGTERM arrives while the file is being written (kd_cli.cli raises Terminated)
        f.write(b"half")
        raise Terminated

    with pytest.raises(Terminated):
        atomic_write(path, stopped)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_trained_with_reads_the_loss_a_checkpoint_records():
    from kd_cli.store import trained_with

    assert trained_with({"history": []}) == "ce"  # `kd train`: from labels
    assert trained_with({"loss": "dkd", "alpha": 0.5}) == "dkd"  # a `kd distill` student used as a teacher
    assert trained_with({"lineage": {"loss": {"name": "kd"}, "alpha": 0.9}}) == "kd"  # a teacher-assistant link


@pytest.fixture
def quick_locks(monkeypatch):
    monkeypatch.setattr("kd_cli.store.LOCK_POLL_S", 0.02)
    monkeypatch.setattr("kd_cli.store.LOCK_REFRESH_S", 0.02)


def hold_then_store(path, holding):
    """Another job: holds `path`'s lock, stores the model a moment later, releases the lock."""
    import threading
    import time

    from kd_cli.store import making

    def job():
        with making(path):
            holding.set()
            time.sleep(0.3)
            path.write_bytes(b"the model")

    thread = threading.Thread(target=job)
    thread.start()
    assert holding.wait(5)
    return thread


def test_a_job_needing_a_model_another_job_is_making_waits_then_loads_it(tmp_path, quick_locks):
    import threading

    from kd_cli.run import Run

    path = tmp_path / "store" / "seed0-abc.pt"
    other = hold_then_store(path, threading.Event())
    made = []

    class Loader:  # stands in for a Run: load_or_make uses only its load()
        def load(self, model_cfg, path):
            return "model", {"path": str(path)}

    model, meta, trained = Run.load_or_make(Loader(), MODEL, path, lambda: made.append(1) or ("new", {}))
    other.join()
    assert (model, meta, trained, made) == ("model", {"path": str(path)}, False, [])  # waited, loaded, never trained
    assert not path.with_name(path.name + ".lock").exists()


def test_a_lock_says_whether_it_waited_and_is_released_on_errors(tmp_path, quick_locks):
    import threading

    from kd_cli.store import making

    path = tmp_path / "seed0-abc.pt"
    lock = path.with_name(path.name + ".lock")
    with pytest.raises(RuntimeError):
        with making(path) as waited:
            assert not waited and f"kd pid {os.getpid()}" in lock.read_text()
            raise RuntimeError("training failed")
    assert not lock.exists()
    other = hold_then_store(path, threading.Event())
    with making(path) as waited:
        assert waited and path.read_bytes() == b"the model"
    other.join()
    assert not lock.exists()


def test_a_held_lock_stays_fresh_and_a_stale_one_is_taken_over(tmp_path, quick_locks, caplog):
    import time

    from kd_cli.store import LOCK_STALE_S, making

    path = tmp_path / "seed0-abc.pt"
    lock = path.with_name(path.name + ".lock")
    with making(path):
        os.utime(lock, (0, 0))
        time.sleep(0.2)
        assert time.time() - lock.stat().st_mtime < LOCK_STALE_S  # touched again while held
    lock.write_text("kd pid 99999 on gone-host\n")
    os.utime(lock, (time.time() - LOCK_STALE_S - 5,) * 2)  # a killed job's, on a machine kd cannot look at
    with making(path) as waited:
        assert not waited and "gone-host" not in lock.read_text()
    assert "by kd pid 99999 on gone-host, which has stopped; taking it over" in caplog.text


def test_an_empty_lock_is_taken_over_once_its_holder_would_have_named_itself(tmp_path, quick_locks, caplog):
    """A job killed between creating its lock and writing its name into it leaves an empty file: waiting
    LOCK_STALE_S for it would only cost time; a live holder names itself at once."""
    import time

    from kd_cli.store import LOCK_REFRESH_S, making

    path = tmp_path / "seed0-abc.pt"
    lock = path.with_name(path.name + ".lock")
    lock.write_text("")
    os.utime(lock, (time.time() - LOCK_REFRESH_S - 1,) * 2)
    with making(path) as waited:
        assert not waited and f"kd pid {os.getpid()}" in lock.read_text()
    assert "by another process, which has stopped; taking it over" in caplog.text


def test_a_lock_of_a_killed_process_on_this_machine_is_taken_over_at_once(tmp_path, quick_locks, caplog):
    import socket
    import subprocess
    import sys

    from kd_cli.store import _gone, making

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(ended.stdout)  # a process that has ended, as a SIGKILL leaves its lock
    path = tmp_path / "seed0-abc.pt"
    lock = path.with_name(path.name + ".lock")
    lock.write_text(f"kd pid {pid} on {socket.gethostname()}\n")  # touched just now: not stale by its age
    with making(path) as waited:
        assert not waited
    assert f"kd pid {pid} on {socket.gethostname()}, which has stopped" in caplog.text
    assert not _gone(f"kd pid {os.getpid()} on {socket.gethostname()}")  # alive: waited for, until stale
    assert not _gone(f"kd pid {pid} on another-host")  # not this machine's to look at


def test_a_number_typed_without_its_decimal_point_is_the_same_recipe(tmp_path):
    cfg = OmegaConf.merge(CFG, {"store_dir": str(tmp_path)})
    as_config = store_path(cfg, MODEL)
    assert store_path(OmegaConf.merge(cfg, {"data": {"fraction": 1}}), MODEL) == as_config  # `data.fraction=1`
    assert store_path(OmegaConf.merge(cfg, {"train": {"lr": 1}}), MODEL) != as_config


def test_a_model_stored_under_a_key_of_numbers_as_typed_is_still_found(tmp_path):
    from kd_cli.store import _digest, model_spec, recipe

    cfg = OmegaConf.merge(CFG, {"store_dir": str(tmp_path), "data": {"fraction": 1}})
    now = store_path(cfg, MODEL)
    earlier = now.with_name(f"seed0-{_digest({'recipe': recipe(cfg), 'model': model_spec(MODEL)})}.pt")
    assert earlier != now
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"stored by an earlier kd")
    assert store_path(cfg, MODEL) == earlier
    now.write_bytes(b"stored since")
    assert store_path(cfg, MODEL) == now


def test_kd_s_own_int8_and_export_files_are_named_when_given_as_a_checkpoint(tmp_path):
    import warnings

    linear, example = torch.nn.Linear(2, 2), torch.zeros(1, 2)
    scripted, program = tmp_path / "m_int8.torchscript.pt", tmp_path / "m.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; kd quantize still writes its int8 models with it
        torch.jit.save(torch.jit.trace(linear, example), scripted)
    torch.export.save(torch.export.export(linear, (example,)), program)
    for path, what in ((scripted, "a TorchScript model"), (program, "a torch.export program")):
        with pytest.raises(KdError, match=re.escape(f"{path} is {what}")) as error:
            load_checkpoint(path)
        assert "not a kd checkpoint; point at the checkpoint it was made from" in str(error.value)


def test_making_a_model_clears_what_a_killed_write_left_in_its_folder(tmp_path, quick_locks):
    """A write killed mid-way (SIGKILL, power cut) leaves a model-sized temporary file; an hour on, it is rubbish."""
    from kd_cli.atomic import ABANDONED_AFTER_S
    from kd_cli.store import making

    folder = tmp_path / "fashion_mnist" / "deepnn"
    folder.mkdir(parents=True)
    abandoned, fresh = folder / ".seed1-abc.pt.x1.tmp", folder / ".seed2-abc.pt.x2.tmp"  # fresh: a write under way
    for leftover in (abandoned, fresh):
        leftover.write_bytes(b"half a model")
    old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(abandoned, (old, old))
    with making(folder / "seed0-abc.pt"):
        pass
    assert not abandoned.exists() and fresh.exists()


def test_dataset_settings_that_change_the_model_are_part_of_its_key(tmp_path):
    """Another normalisation or augmentation trains another model; the dataset's own values keep the key
    models were stored under before kd counted them."""
    from kd_cli.identity import numbers_as_floats
    from kd_cli.store import _digest, model_spec

    settings = {"name": "fashion_mnist", "num_classes": 10, "mean": [0.2860], "std": [0.3530], "crop_padding": 2, "hflip": True}
    cfg = OmegaConf.merge(CFG, {"store_dir": str(tmp_path), "dataset": settings})
    shipped = store_path(cfg, MODEL)
    before = {"recipe": {"dataset": "fashion_mnist", "train": {"epochs": 2, "lr": 0.1}, "data": {"fraction": 1.0}},
              "model": model_spec(MODEL)}
    assert shipped.name == f"seed0-{_digest(numbers_as_floats(before))}.pt"
    changed = [{"mean": [0.5]}, {"std": [0.5]}, {"crop_padding": 4}, {"hflip": False}]
    paths = {store_path(OmegaConf.merge(cfg, {"dataset": change}), MODEL) for change in changed}
    assert len(paths) == len(changed) and shipped not in paths
    assert store_path(OmegaConf.merge(cfg, {"dataset": {"crop_padding": 2.0, "system_dirs": ["/elsewhere"]}}), MODEL) == shipped
    # Without augmentation the crop and flip settings are not read: the same model, so the same key.
    plain = OmegaConf.merge(cfg, {"data": {"augment": False}})
    assert store_path(OmegaConf.merge(plain, {"dataset": {"crop_padding": 4, "hflip": False}}), MODEL) == store_path(plain, MODEL)


def test_a_null_validation_fraction_is_the_recipe_without_one():
    """data.val_fraction=null holds nothing out, as the default 0 does: the same model, so the same key."""
    assert store_path(OmegaConf.merge(CFG, {"data": {"val_fraction": None}}), MODEL) == \
        store_path(OmegaConf.merge(CFG, {"data": {"val_fraction": 0.0}}), MODEL)
    assert store_path(OmegaConf.merge(CFG, {"data": {"val_fraction": 0.1}}), MODEL) != \
        store_path(OmegaConf.merge(CFG, {"data": {"val_fraction": 0.0}}), MODEL)


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("scored_on, rescored", [(0.1, False), (0.5, True), (None, True)])
def test_a_teacher_file_is_scored_on_this_runs_test_split(tmp_path, scored_on, rescored):
    """A teacher.checkpoint trained with another data.test_fraction recorded its accuracy on other test images."""
    from conftest import TINY
    from kd_cli.bench.sides import compose_config
    from kd_cli.engine import evaluate
    from kd_cli.run import Run

    path = tmp_path / "teacher.pt"
    config = {"data": {"test_fraction": scored_on}} if scored_on else {}  # None: a file that does not say
    save_checkpoint(path, build_model(OmegaConf.create({"arch": "mnist_teacher"}), SPEC),
                    {"model": "mnist_teacher", "dataset": "fashion_mnist", "num_classes": 10, "config": config,
                     "metrics": {"accuracy": 99.0, "best_accuracy": 99.5}})
    cfg = compose_config("distill", [*TINY, f"teacher.checkpoint={path}", "device=cpu"])  # data.test_fraction=0.1
    run = Run.start(cfg, tmp_path / "run")
    model, meta, _ = run.teacher()
    if rescored:
        assert meta["metrics"] == {"accuracy": evaluate(model, run.data)}
    else:
        assert meta["metrics"] == {"accuracy": 99.0, "best_accuracy": 99.5}
