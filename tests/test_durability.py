"""Nothing lost: exact resume after SIGKILL, reproducible runs, safe failures of every kind."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY, kd_executable
from kd_cli.cli import config_dir
from kd_cli.config import register_model_groups
from kd_cli.data import load_data
from kd_cli.engine import fit, seed_everything
from kd_cli.errors import KdError, Terminated
from kd_cli.losses.hinton import CrossEntropy
from kd_cli.models import build_model
from kd_cli.store import save_checkpoint

pytestmark = pytest.mark.usefixtures("fashion_mnist")
register_model_groups()


def composed(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", [*TINY, *overrides])


def histories(run_dir: Path) -> dict:
    """Per-epoch loss, accuracies and lr of every model (throughput, a timing, left out)."""
    saved = json.loads((run_dir / "results.json").read_text())["histories"]
    return {role: [{k: v for k, v in epoch.items() if k != "img_per_s"} for epoch in epochs]
            for role, epochs in saved.items()}


# ------------------------------------------------------------------ reproducibility and resume

def test_same_config_and_seed_give_identical_results(kd):
    kd("train", *TINY, "hydra.run.dir=outputs/a", "store_dir=outputs/store_a")
    kd("train", *TINY, "hydra.run.dir=outputs/b", "store_dir=outputs/store_b")
    first, second = histories(kd.cwd / "outputs/a"), histories(kd.cwd / "outputs/b")
    assert first == second  # equality of every per-epoch loss and accuracy, not closeness
    a, b = (pd.read_csv(kd.cwd / f"outputs/{x}/results.csv") for x in "ab")
    assert a["accuracy"].tolist() == b["accuracy"].tolist()

    # The same run into its finished folder has nothing to do, and leaves the folder's record alone: timed
    # otherwise, its .hydra/ files would no longer describe the results beside them.
    before = {p: p.read_bytes() for p in (kd.cwd / "outputs/a").rglob("*") if p.is_file()}
    proc = kd("train", *TINY, "hydra.run.dir=outputs/a", "store_dir=outputs/store_a", "measure.latency_runs=5")
    assert proc.stderr.strip().splitlines()[-1] == ("kd: outputs/a already holds this run's results; nothing to do "
                                                    "(another hydra.run.dir runs it again)")
    assert {p: p.read_bytes() for p in (kd.cwd / "outputs/a").rglob("*") if p.is_file()} == before


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(kd):
    # Augmentation on, so the restored random generators matter, and a teacher running every step.
    recipe = [*TINY, "student=light6", "train.epochs=3", "data.augment=true", "data.fraction=0.03"]
    kd("train", *recipe, "~student")
    kd("distill", *recipe, "hydra.run.dir=outputs/uninterrupted")

    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen([kd_executable(), "distill", *recipe], cwd=kd.cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        states = list((kd.cwd / "outputs" / "distill").glob("*/state/student_kd.pt"))
        if states:
            state = states[0]
            break
        time.sleep(0.05)
    assert state is not None, "the run ended before writing its first training state"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (state.parent.parent / "results.json").exists()
    (state.parent / f".{state.name}.k1ll3d.tmp").write_bytes(b"half")  # what a kill during a state write leaves

    resumed = kd("distill", *recipe, "resume=true")
    assert "resuming" in resumed.stderr + resumed.stdout
    assert histories(state.parent.parent)["student_kd"] == histories(kd.cwd / "outputs/uninterrupted")["student_kd"]
    assert not state.exists()  # a finished run drops its resumable state


def _as_from_a_terminal():
    """Signals as a command typed at a terminal gets them. A test suite started in the background (`&` in a
    script, as some CI runners do) ignores SIGINT, and its children inherit that: kd, as any Python program,
    then keeps running through Ctrl-C, as a background job should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.parametrize("stop, status, how", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_says_how_to_resume_in_one_line(kd, stop, status, how):
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen([kd_executable(), "train", *TINY, "train.epochs=50", "~student"], cwd=kd.cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(kd.cwd.glob("outputs/train/*/state/*.pt")):
        time.sleep(0.05)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert stderr.strip().splitlines() == [
        f"kd: {how}; rerun the same command with resume=true to continue from its last finished epoch, if one finished"]


@pytest.mark.parametrize("sweep_ends", ["finished", "interrupted"])
def test_ctrl_c_during_a_sweeps_summary_skips_it_in_one_line(tmp_path, monkeypatch, capsys, sweep_ends):
    """The summary and report take seconds after the jobs: a Ctrl-C there (the first, or a second one after
    the sweep's own) skips them with one line instead of a traceback, and the exit status says so."""
    from kd_cli import cli, sweep

    def sweep_that(*_, **__):
        def run():
            sweep.started_sweeps.append(tmp_path / "sweep")
            if sweep_ends == "interrupted":
                raise KeyboardInterrupt
        return lambda task: run

    def interrupted(sweep_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.hydra, "main", sweep_that)
    monkeypatch.setattr(sweep, "summarize", interrupted)
    monkeypatch.setattr(sweep, "started_sweeps", [])
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    monkeypatch.setattr(sys, "argv", ["kd", "distill", "-m", *TINY, "alpha=0.2,0.8"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    skipped = f"kd: interrupted; the summary of {tmp_path / 'sweep'} was skipped (`kd report {tmp_path / 'sweep'}` writes its report)"
    resume = "kd: interrupted; rerun the same command with resume=true to continue from its last finished epoch, if one finished"
    assert capsys.readouterr().err.splitlines() == ([resume] if sweep_ends == "interrupted" else []) + [skipped]


@pytest.mark.parametrize("stop, status, how", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")])
def test_a_run_stopped_before_it_started_has_nothing_to_resume(monkeypatch, capsys, stop, status, how):
    import kd_cli.preflight
    from kd_cli import cli

    def stopped(*_, **__):
        raise stop

    monkeypatch.setattr(kd_cli.preflight, "preflight", stopped)  # stopped while the command line is checked
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # kd's SIGTERM handler stays out of pytest
    monkeypatch.setattr(sys, "argv", ["kd", "distill"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == status
    assert capsys.readouterr().err.splitlines() == [f"kd: {how} before the run started; nothing was written"]


def test_a_terminated_sweep_writes_its_summary_and_resumes(kd):
    kd("train", *TINY, "~student", "train.epochs=4")
    env = {**os.environ, "CI": "1"}
    sweep_args = ["distill", "-m", *TINY, "train.epochs=4", "alpha=0.2,0.8"]
    proc = subprocess.Popen([kd_executable(), *sweep_args], cwd=kd.cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(kd.cwd.glob("outputs/distill-multirun/*/0/state/*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    sweep = next((kd.cwd / "outputs/distill-multirun").iterdir())
    assert pd.read_csv(sweep / "summary.csv")["status"].tolist() == ["unfinished", "not started"]  # stopped, not failed
    assert not (sweep / "0" / "error.txt").exists()

    resumed = kd(*sweep_args, "resume=true")
    assert f"resuming {sweep.relative_to(kd.cwd)}" in resumed.stderr
    assert pd.read_csv(sweep / "summary.csv")["status"].tolist() == ["ok", "ok"]


def test_rerun_sweep_skips_complete_jobs_and_reruns_failed_ones(kd):
    kd("train", *TINY, "~student")  # seed 1's teacher is missing from the store
    first = kd("distill", "-m", *TINY, "seed=0,1", check=False)
    assert first.returncode != 0
    sweep = next((kd.cwd / "outputs/distill-multirun").iterdir())
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["ok", "failed"]
    assert "no trained teacher" in summary.loc[1, "error"]
    done = (sweep / "0" / "results.json").read_bytes()

    kd("train", *TINY, "~student", "seed=1")  # the failed job's cause is fixed
    again = kd("distill", "-m", *TINY, "seed=0,1", "resume=true")
    assert f"resuming {sweep.relative_to(kd.cwd)}" in again.stderr
    assert (sweep / "0" / "results.json").read_bytes() == done  # skipped, untouched
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["ok", "ok"]
    assert "resume" not in summary.columns  # only the job run again records it: not a swept setting
    assert not (sweep / "1" / "error.txt").exists()


# ------------------------------------------------------------------ failures inside training

class _NanAt(CrossEntropy):
    """Labels-only loss that turns NaN at one (epoch, step): a model diverging mid-run."""

    def __init__(self, epoch: int, step: int):
        super().__init__()
        self.when, self.epoch, self.calls = (epoch, step), 0, 0

    def set_epoch(self, epoch):
        self.epoch, self.calls = epoch, 0

    def forward(self, student, teacher, targets, **_):
        self.calls += 1
        loss = super().forward(student, teacher, targets)
        return loss * float("nan") if (self.epoch, self.calls) == self.when else loss


def _small_fit(cfg, loss, state_path):
    data = load_data(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg.student, data.spec)
    return fit(model, loss, data, cfg, torch.device("cpu"), label="student", state_path=state_path)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_state(tmp_path):
    cfg = composed("train.epochs=3")
    state = tmp_path / "state.pt"
    with pytest.raises(KdError, match=r"student: the loss became NaN or inf in epoch 2, step 3; the last good state is in"):
        _small_fit(cfg, _NanAt(epoch=2, step=3), state)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_disk_full_while_checkpointing_keeps_the_previous_state(tmp_path, monkeypatch):
    cfg = composed("train.epochs=3")
    state = tmp_path / "state.pt"
    real_fsync, calls = os.fsync, []

    def fsync_fails_second_time(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a file's data, not a folder's entry
            calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("kd_cli.atomic.os.fsync", fsync_fails_second_time)
    with pytest.raises(KdError, match="state.pt: No space left on device; its previous version is intact"):
        _small_fit(cfg, CrossEntropy(), state)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


@pytest.mark.parametrize("error, refused", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_folder_that_cannot_be_synced_leaves_the_new_file_in_place(tmp_path, monkeypatch, error, refused):
    """Some network and FUSE file systems refuse to fsync a folder (EINVAL): the write has succeeded
    all the same. A real I/O error there is reported, without claiming the old version was kept."""
    from kd_cli.atomic import atomic_write_text

    real_fsync = os.fsync

    def folder_fsync_fails(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(error, os.strerror(error))
        real_fsync(fd)

    path = tmp_path / "results.csv"
    path.write_text("old\n")
    monkeypatch.setattr("kd_cli.atomic.os.fsync", folder_fsync_fails)
    if refused:
        with pytest.raises(KdError, match=f"{path} is written, but its folder could not be synced to disk"):
            atomic_write_text(path, "new\n")
    else:
        atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


# ------------------------------------------------------------------ bad input: one line, non-zero exit, nothing lost

def _bad_checkpoint(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.pt"
    spec_model = build_model(compose_model("mnist_teacher"), _spec(10))
    if kind == "other_dataset":
        save_checkpoint(path, spec_model, {"model": "mnist_teacher", "dataset": "mnist", "num_classes": 10})
    elif kind == "other_classes":
        save_checkpoint(path, build_model(compose_model("mnist_teacher"), _spec(100)),
                        {"model": "mnist_teacher", "dataset": "fashion_mnist", "num_classes": 100})
    elif kind == "other_arch":
        save_checkpoint(path, build_model(compose_model("mnist_student"), _spec(10)),
                        {"model": "mnist_student", "dataset": "fashion_mnist", "num_classes": 10})
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:5000])
    elif kind == "foreign":
        torch.save({"state_dict": spec_model.state_dict()}, path)
    elif kind == "pickle":
        path.write_bytes(b"\x80\x04\x95not a zip at all")
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "folder":
        path.mkdir()
    return path


def compose_model(arch):
    from omegaconf import OmegaConf

    return OmegaConf.create({"arch": arch, "checkpoint": None})


def _spec(classes):
    from kd_cli.models import ImageSpec

    return ImageSpec(1, 28, classes)


# Refused before anything runs (kd_cli.preflight): checked in-process, every grid combination included.
REFUSED_UPFRONT = [
    (["dataset=imagenet"], "unknown dataset 'imagenet'; choose one of: cifar10, cifar100, fashion_mnist, mnist"),
    (["student=resnet99"], "unknown student 'resnet99'; choose one of: conv10,"),
    (["loss=kdd"], "unknown loss 'kdd'; choose one of:"),
    (["scheme=nope"], "unknown scheme 'nope'; choose one of: born_again, multi_teacher, offline, online, self, ta"),
    (["alhpa=0.5"], "unknown key 'alhpa'; did you mean 'alpha'?"),
    # Added with +, a misspelt key would run with the config's value: the + is no way around the check.
    (["+alpah=0.5"], "unknown key 'alpah'; did you mean 'alpha'? (+alpah=... adds a key that kd does not read;"),
    (["-m", "+train.epoch=1,2"], "unknown key 'train.epoch'; did you mean 'train.epochs'? (+train.epoch=... adds"),
    (["experimnet=demo"], "unknown key 'experimnet'; did you mean 'experiment'?"),  # a config group, no key
    (["t=2"], "unknown key 't'; did you mean 'T'?"),
    (["loss.T=3"], "unknown key 'loss.T'; did you mean 'T'?"),  # a real key under another parent
    (["data.epochs=3"], "unknown key 'data.epochs'; did you mean 'train.epochs' or 'qat.epochs'?"),
    (["+loss.T=3"], "loss.T is no option of a loss: T is a setting of its own; write T=3"),
    # A feature loss's layers, on every pair of the chain, with the models' initial weights.
    (["loss=fitnets", "loss.student_layers=[features.99]"], "the student has no layer 'features.99'; valid paths"),
    (["-m", "loss=at", "alpha=0.2,0.6", "scheme=ta", "scheme.assistants=[conv4]", "loss.teacher_layers=[nope]"],
     "the teacher has no layer 'nope'"),
    (["loss=fitnets", "loss.student_layers=[features.0,features.2]"], "loss.student_layers has 2 layers and loss.teacher_layers 1"),
    (["hydra.sweep.dri=x"], "unknown key 'hydra.sweep.dri'; did you mean 'hydra.sweep.dir'?"),
    (["train.epochs=abc"], "train.epochs must be a whole number >= 1, got 'abc'"),
    (["data.augment=maybe"], "data.augment must be true or false, got 'maybe'"),
    (["train.optimizer=adamw"], "train.optimizer must be one of sgd, adam, got 'adamw'"),
    (["train.lr=${oops}"], "train.lr: Interpolation key 'oops' not found; fix the ${...} in that value"),
    (["quant=qatt"], "quant must be one of null, qat, got 'qatt'"),  # spelled as on the command line
    (["alpha=1.5"], "alpha must be in [0, 1]"),
    (["-m", "alpha=0.5,-1"], "alpha must be in [0, 1] (the weight of the distillation term), got -1"),
    (["T=0"], "T must be > 0"),
    (["loss=tf_kd", "loss.correct_prob=0.05"], "loss.correct_prob=0.05 is not above 1/10, so the virtual teacher would "
                                               "rate the true class no higher than the others; choose a value in (0.1, 1]"),
    (["loss=combo", "loss.terms={tf_kd:{weight:1,correct_prob:0.1}}"], "loss.correct_prob=0.1 is not above 1/10"),
    (["train.epochs=0"], "train.epochs must be a whole number >= 1, got 0"),
    (["train.batch_size=0"], "train.batch_size must be a whole number >= 2, got 0"),
    (["train.weight_decay=-1"], "train.weight_decay must be >= 0, got -1"),
    (["train.momentum=2"], "train.momentum must be in [0, 1), got 2"),
    (["train.optimizer=sgd", "train.momentum=0", "train.nesterov=true"], "train.nesterov=true needs train.momentum > 0"),
    (["seed=4294967296"], "seed must be at most 2147483647, got 4294967296"),
    (["train.gamma=0"], "train.gamma must be > 0"),
    (["train.milestones=[abc]"], "train.milestones must be a list of fractions of train.epochs in (0, 1), such as "
                                 "'train.milestones=[0.5,0.75]', got ['abc']"),
    (["train.milestones=[1.5]"], "train.milestones must be a list of fractions of train.epochs in (0, 1)"),
    (["teacher=torchvision", "teacher.name=resnet5"], "unknown torchvision model 'resnet5'; choose one of: alexnet,"),
    (["data.fraction=0"], "data.fraction must be in (0, 1], got 0"),
    (["data.fraction=1.2"], "data.fraction must be in (0, 1], got 1.2"),
    (["data.test_fraction=-1"], "data.test_fraction must be in (0, 1], got -1"),
    (["device=cuda"], "device=cuda was asked for but no CUDA GPU is visible"),
    (["data.augment=true", "train.teacher_cache=on"], "train.teacher_cache=on needs fixed inputs; set data.augment=false"),
    (["hydra.run.dir=results.csv/run"], "cannot write the run folder results.csv/run: results.csv is a file"),
]


@pytest.mark.parametrize("overrides, message", REFUSED_UPFRONT, ids=[" ".join(o) for o, _ in REFUSED_UPFRONT])
def test_refused_before_anything_is_written(tmp_path, monkeypatch, overrides, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.csv").write_text("a file standing where a folder is asked for\n")
    with pytest.raises(KdError) as refused:
        preflight("distill", [*TINY, *overrides], config_dir())
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_run_folder_of_another_config_is_refused_before_hydra_rewrites_it(tmp_path, monkeypatch):
    """hydra.run.dir= naming the folder of a finished run of another config is refused before Hydra rewrites
    the folder's .hydra/ files. A stopped run's states are checked by each fit, against the config that fit
    trains with (a teacher_recipe's teacher and QAT's fine-tuning save theirs under their own)."""
    from kd_cli.config import run_identity
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    this, other = run_identity(composed()), run_identity(composed("train.epochs=3"))
    for name, config in (("finished", other), ("same", this), ("measured_otherwise", this | {"measure": {"runs": 3}})):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("- train.epochs=3\n")
        (tmp_path / name / "results.json").write_text(json.dumps({"config": config, "rows": []}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"config": {"train"')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    refusals = {"finished": "finished already holds the results of a different config; choose another hydra.run.dir "
                            "(its results were left as they are)",
                "broken": "broken/results.json is unreadable (JSONDecodeError); delete it, or choose another hydra.run.dir"}
    for name, message in refusals.items():
        with pytest.raises(KdError) as refused:
            preflight("train", [*TINY, f"hydra.run.dir={name}"], config_dir())
        assert str(refused.value).endswith(message)
    assert preflight("train", [*TINY, "hydra.run.dir=same"], config_dir()) is not None  # a finished run of this config
    # measure.* times the models, trains nothing: a run from before it gained a key is still this run.
    assert preflight("train", [*TINY, "hydra.run.dir=measured_otherwise"], config_dir()) is not None
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_sweep_folder_of_another_sweep_is_refused_before_hydra_rewrites_it(tmp_path, monkeypatch):
    """hydra.sweep.dir= naming an earlier sweep: its jobs would each fail on the other jobs' results (after Hydra
    rewrote their .hydra/), and the summary would list the old results as this sweep's."""
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    # A job's overrides as Hydra's sweeper writes them: each key once, values as its parser prints them.
    common = [item.replace("1e-3", "0.001") for item in TINY if item != "train.epochs=2"] + ["train.epochs=1"]
    for number in (0, 1):
        overrides = [*common, f"seed={number}"]
        job = tmp_path / "sweep" / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
        (job / "results.json").write_text(json.dumps({"config": {}, "rows": []}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for sweep in (["seed=3,4"], ["seed=0,1", "data.fraction=0.1"], ["seed=1,0"]):
        with pytest.raises(KdError) as refused:
            preflight("train", ["-m", *TINY, *sweep, "train.epochs=1", "hydra.sweep.dir=sweep"], config_dir())
        assert "hydra.sweep.dir=sweep holds another sweep's results (sweep/" in str(refused.value), sweep
    # A sweep of fewer jobs would replace that sweep's multirun.yaml, by which resume=true finds it.
    for sweep in (["seed=0"], ["seed=1"]):
        with pytest.raises(KdError, match="hydra.sweep.dir=sweep holds a sweep of 2 jobs, more than the 1 of this command line"):
            preflight("train", ["-m", *TINY, *sweep, "train.epochs=1", "hydra.sweep.dir=sweep"], config_dir())
    # The same sweep again (resume=true, timed otherwise, on another device, or with more seeds after the first
    # two) meets its own jobs' results.
    for sweep in (["seed=0,1", "resume=true"], ["seed=0,1", "measure.latency_runs=5", "device=cpu"], ["seed=0,1,2"]):
        assert preflight("train", ["-m", *TINY, "train.epochs=1", *sweep, "hydra.sweep.dir=sweep"], config_dir()) is not None
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_full_disk_is_refused_before_hydra_writes_the_run_folder(tmp_path, monkeypatch):
    import shutil

    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(KdError, match=r"cannot write the run folder outputs/run: the disk holding \. is full \(4 kB "
                                      r"free\); free some space or choose another location with hydra.run.dir=PATH"):
        preflight("distill", [*TINY, "hydra.run.dir=outputs/run"], config_dir())
    assert list(tmp_path.iterdir()) == []


def test_only_a_command_that_stores_models_needs_a_writable_store(tmp_path, monkeypatch, kd):
    """`kd train` is refused up front; `kd distill` may read a store it cannot write to (a colleague's),
    and is stopped only before training a model it would have to store there."""
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.csv").write_text("a file standing where a folder is asked for\n")
    with pytest.raises(KdError, match="cannot write the model store results.csv/store: results.csv is a file, "
                                      "not a folder; choose another location with store_dir=PATH"):
        preflight("train", [*TINY, "store_dir=results.csv/store"], config_dir())
    assert preflight("distill", [*TINY, "store_dir=results.csv/store"], config_dir()) is not None
    (kd.cwd / "results.csv").write_text("a file standing where a folder is asked for\n")
    proc = kd("distill", *TINY, "store_dir=results.csv/store", "train_missing=true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("kd: error: cannot write the model store results.csv/store/")
    assert "epoch" not in proc.stdout + proc.stderr  # stopped before training anything


# Each through the installed command. Only the first is found by the run, once Hydra has made its folder.
FOUND_IN_RUN = (["seed=7"], "kd: error: no trained teacher mnist_teacher for fashion_mnist (seed 7, this recipe)")
FAILS = [
    FOUND_IN_RUN,
    (["dataset=cifar10", "data.root=empty", "data.download=false"], "kd: error: cifar10 not found in empty/cifar-10-batches-py"),
    (["-m", "seed=0,1", "dataset=cifar10", "data.root=empty", "data.download=false"], "kd: error: cifar10 not found in"),
    (["alhpa=0.5"], "kd: error: unknown key 'alhpa'; did you mean 'alpha'?"),  # the preflight's line reaches the user
]
# A teacher.checkpoint is read before anything runs: no failed run's folder is left behind.
CHECKPOINTS = [
    ("other_dataset", "is for dataset=mnist, not fashion_mnist"),
    ("other_classes", "is for num_classes=100, not 10"),
    ("other_arch", "is for model=mnist_student, not mnist_teacher"),
    ("truncated", "is truncated or corrupt"),
    ("foreign", "is not a kd checkpoint"),
    ("pickle", "is not a kd checkpoint"),
    ("text", "is not a checkpoint file (PyTorch writes zip archives; this one starts with b'"),
    ("folder", "is a folder; point at a checkpoint file (.pt) in it"),
    ("missing", "kd: error: teacher.checkpoint={path} does not exist; check the path"),
]


def test_bad_inputs_through_the_cli_are_one_line_and_lose_nothing(kd):
    kd("train", *TINY)
    teacher = next((kd.cwd / "outputs/store/fashion_mnist/mnist_teacher").glob("*.pt"))
    checkpoints = {kind: _bad_checkpoint(kind, kd.cwd, teacher) for kind, _ in CHECKPOINTS}
    before = {p: p.read_bytes() for p in kd.cwd.rglob("*") if p.is_file()}
    bad_teachers = [(["-m", "alpha=0.2,0.6", f"teacher.checkpoint={checkpoints['truncated']},{teacher}"], "is truncated")]
    bad_teachers += [([f"teacher.checkpoint={checkpoints[kind]}"], message.format(path=checkpoints[kind]))
                     for kind, message in CHECKPOINTS]
    run_folders = lambda: {p for p in kd.cwd.glob("outputs/distill*/*") if p.is_dir()}  # noqa: E731
    for overrides, message in FAILS + bad_teachers:
        folders = run_folders()
        proc = kd("distill", *TINY, *overrides, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, (overrides, proc.stderr)
        assert len(lines) == 1 and message in lines[0], (overrides, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
        if (overrides, message) != FOUND_IN_RUN:
            assert run_folders() == folders, overrides
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} changed"


def test_a_sweep_summary_that_cannot_be_written_is_one_line_after_the_jobs(kd):
    (kd.cwd / "sweep" / "summary.csv").mkdir(parents=True)  # a folder where the file goes: as a full disk would
    proc = kd("distill", *TINY, "loss=ce", "-m", "seed=0", "hydra.sweep.dir=sweep", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("kd: error: cannot write sweep/summary.csv: a folder has that name; "
                                                    "move it away or write elsewhere")
    assert (kd.cwd / "sweep" / "0" / "results.json").is_file()  # the job itself finished


def test_full_traceback_on_request(kd):
    proc = kd("distill", *TINY, "device=cuda", check=False)
    assert "Traceback" not in proc.stderr
    env_proc = subprocess.run([kd_executable(), "distill", *TINY, "device=cuda"], cwd=kd.cwd,
                              env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True)
    assert env_proc.returncode != 0 and "Traceback" in env_proc.stderr


def test_resume_finds_the_sweep_whatever_launcher_ran_it(tmp_path, monkeypatch, capsys):
    import yaml

    from kd_cli.cli import resume_target

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "outputs/distill-multirun/2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["alpha=0.1,0.5", "T=2"]}}}))
    same_sweep = ["-m", "alpha=0.1,0.5", "T=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "resume=true"]
    same_sweep_dir = [f"hydra.sweep.dir={sweep.relative_to(tmp_path)}"]
    assert resume_target("distill", same_sweep) == same_sweep_dir
    assert resume_target("distill", ["-m", "alpha=0.1,0.9", "T=2", "resume=true"]) == []
    assert resume_target("distill", ["-m", "alpha=0.1,0.5", "T=2"]) == []  # only with resume=true
    # In any order, but a key given twice takes its last value: T=3 T=2 is this sweep, T=2 T=3 is not.
    assert resume_target("distill", ["T=3", "T=2", "-m", "alpha=0.1,0.5", "resume=true"]) == same_sweep_dir
    assert resume_target("distill", ["T=2", "T=3", "-m", "alpha=0.1,0.5", "resume=true"]) == []
    # The same values in another order: Hydra would number the jobs otherwise, so the order is asked for.
    with pytest.raises(KdError, match=rf"^kd: error: resume=true: {sweep.relative_to(tmp_path)} swept alpha=0.1,0.5, in "
                                      r"that order, and Hydra numbers a sweep's jobs by it; give the values in that order"):
        resume_target("distill", ["-m", "alpha=0.5,0.1", "T=2", "resume=true"])
    assert resume_target("distill", ["-m", "alpha=0.5,0.1", "T=3", "resume=true"]) == []  # another sweep
    # A newer sweep in the other order does not hide an older one that matches exactly.
    newer = tmp_path / "outputs/distill-multirun/2026-01-02_00-00-00"
    newer.mkdir()
    (newer / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["alpha=0.5,0.1", "T=2"]}}}))
    assert resume_target("distill", ["-m", "alpha=0.1,0.5", "T=2", "resume=true"]) == same_sweep_dir
    assert resume_target("distill", ["-m", "alpha=0.5,0.1", "T=2", "resume=true"]) == [f"hydra.sweep.dir={newer.relative_to(tmp_path)}"]
    newer.joinpath("multirun.yaml").unlink()
    # An Optuna search is not a plan of jobs to finish: its next trials come from the study.
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["hparams_search=optuna"]}}}))
    assert resume_target("distill", ["-m", "hparams_search=optuna", "resume=true"]) == []
    assert "resume=true does not continue an hparams_search sweep" in capsys.readouterr().err


def test_written_files_get_the_mode_new_files_get_not_owner_only(tmp_path):
    """Results and checkpoints are readable by colleagues on a shared machine (mkstemp alone gives 0600)."""
    from kd_cli import atomic

    previous = os.umask(0o022)
    atomic._umask.cache_clear()
    try:
        atomic.atomic_write_text(tmp_path / "results.csv", "a\n")
        atomic.atomic_torch_save(tmp_path / "student.pt", {"x": 1})
    finally:
        os.umask(previous)
        atomic._umask.cache_clear()
    for name in ("results.csv", "student.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
