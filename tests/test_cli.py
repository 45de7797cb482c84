"""End to end through the installed `kd` command on real Fashion-MNIST subsets."""

import re
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, kd_executable
from kd_cli.errors import KdError

pytestmark = pytest.mark.usefixtures("fashion_mnist")


def results(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "results.csv")


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_train_distill_and_sweep(kd):
    kd("train", *TINY)
    train_dir = only_run_dir(kd.cwd / "outputs" / "train")
    table = results(train_dir)
    assert table["role"].tolist() == ["teacher", "student_scratch"]
    assert table["model"].tolist() == ["mnist_teacher", "mnist_student"]
    assert table["params"].tolist() == [1_422_378, 693_962]
    assert table["accuracy"].between(30, 100).all()  # 2 epochs on 3,000 images: well above chance (10%)
    assert (table["accuracy"] <= table["best_accuracy"]).all()
    assert (table["flops"] > 0).all() and (table["latency_ms"] > 0).all() and (table["train_img_per_s"] > 0).all()
    assert (table["size_mb"] - table["params"] * 4 / 2**20).abs().max() < 1e-3  # no buffers in these nets
    for checkpoint in table["checkpoint"]:
        assert (kd.cwd / checkpoint).is_file() and checkpoint.startswith("outputs/store/fashion_mnist/")
    for name in ("results.md", "results.json", "train.log"):
        assert (train_dir / name).is_file()
    assert "nan" not in (train_dir / "results.md").read_text()  # empty cells are '-'

    # Training again reuses the store instead of silently replacing it.
    again = kd("train", *TINY)
    assert "already in the model store" in again.stdout + again.stderr

    kd("distill", *TINY, "alpha=0.6", "T=4")
    distill_dir = only_run_dir(kd.cwd / "outputs" / "distill")
    saved_teacher_outputs, = (kd.cwd / "outputs" / "store" / "teacher_outputs").glob("*.pt")
    table = results(distill_dir).set_index("role")
    assert list(table.index) == ["teacher", "student_scratch", "student_kd"]
    kd_row, scratch, teacher = table.loc["student_kd"], table.loc["student_scratch"], table.loc["teacher"]
    assert (kd_row["alpha"], kd_row["T"], kd_row["loss"], kd_row["scheme"]) == (0.6, 4, "kd", "offline")
    assert teacher["loss"] == scratch["loss"] == "ce"  # as `kd train` reported them
    assert kd_row["gain_vs_scratch"] == pytest.approx(kd_row["accuracy"] - scratch["accuracy"], abs=0.011)
    assert kd_row["teacher_retained"] == pytest.approx(100 * kd_row["accuracy"] / teacher["accuracy"], abs=0.011)
    assert kd_row["compression"] == pytest.approx(teacher["size_mb"] / kd_row["size_mb"], rel=0.01)
    assert (distill_dir / "student.pt").is_file()
    # The stored models' rows are the ones `kd train` reported.
    trained = results(train_dir).set_index("role")
    assert teacher["accuracy"] == trained.loc["teacher", "accuracy"]
    assert scratch["accuracy"] == trained.loc["student_scratch", "accuracy"]

    sweep = kd("distill", *TINY, "alpha=0.1,0.9", "-m", "T=1,4")  # -m anywhere, T=1,4 still read
    sweep_dir = only_run_dir(kd.cwd / "outputs" / "distill-multirun")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4 and (summary["status"] == "ok").all()
    assert sorted(zip(summary["alpha"], summary["T"])) == [(0.1, 1), (0.1, 4), (0.9, 1), (0.9, 4)]
    assert (summary["role"] == "student_kd").all() and summary["accuracy"].between(10, 100).all()
    for job, row in summary.set_index("job").iterrows():
        job_row = results(sweep_dir / str(job)).set_index("role").loc["student_kd"]
        assert job_row["accuracy"] == row["accuracy"]
    assert (sweep_dir / "heatmap_accuracy.png").stat().st_size > 1000
    assert "sweep" in sweep.stdout and "summary.csv" in sweep.stdout + sweep.stderr
    assert "kd: warning" not in sweep.stderr  # kd reads both alpha and T
    # The first job takes the teacher outputs the single run saved; the others, the first job's.
    log = sweep.stdout + sweep.stderr
    assert log.count(f"taken from {saved_teacher_outputs.relative_to(kd.cwd)}") == 1
    assert log.count("taken from this process's previous fit") == 3


def test_loss_ce_trains_with_labels_only_and_matches_scratch(kd):
    """Same seed, same recipe, labels only: the distill command reproduces the scratch student exactly."""
    kd("train", *TINY)
    run = kd("distill", *TINY, "loss=ce", "T=3")
    run_dir = only_run_dir(kd.cwd / "outputs" / "distill")
    table = results(run_dir).set_index("role")
    assert table.loc["student_kd", "loss"] == "ce"
    assert table.loc["student_kd", ["alpha", "T"]].isna().all()  # labels only: neither is read, neither is shown
    assert table.loc["student_kd", "accuracy"] == table.loc["student_scratch", "accuracy"]
    # A setting that changes nothing is warned of once on the terminal, and kept in the run's log.
    warning = "kd: warning: loss=ce does not use T, so T=3 changes nothing"
    assert (run.stdout + run.stderr).count(warning) == 1
    assert warning in (run_dir / "distill.log").read_text()


def test_a_loss_without_a_teacher_needs_none_trained(kd):
    """tf_kd's virtual teacher (and ce) read no teacher: with an empty store, no teacher is asked for or trained."""
    kd("distill", *TINY, "loss=tf_kd")
    table = results(only_run_dir(kd.cwd / "outputs" / "distill"))
    assert list(table["role"]) == ["student_kd"]  # no teacher row; no scratch row either, the store has none
    assert table.loc[0, ["taught_by", "teacher_retained"]].isna().all()
    assert not (kd.cwd / "outputs" / "store").exists()


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_teacher_gives_the_train_command(kd):
    proc = kd("distill", *TINY, "alpha=0.6", check=False)
    line = one_line_error(proc)
    assert line.startswith("kd: error: no trained teacher mnist_teacher for fashion_mnist")
    assert f"run `kd train {' '.join(TINY)}` first, pass train_missing=true to train it here, or pass teacher.checkpoint=PATH" in line
    # A teacher of another recipe: the line trains it alone (a student of that recipe is no baseline).
    line = one_line_error(kd("distill", *TINY, "teacher_recipe={data:{fraction:0.1}}", check=False))
    recipe = [o.replace("data.fraction=0.05", "data.fraction=0.1") for o in TINY]
    assert f"run `kd train {' '.join(recipe)} '~student'` first" in line
    # A key that only the teacher_recipe sets is given too; qat.* is a setting of kd distill alone.
    line = one_line_error(kd("distill", *TINY, "teacher_recipe={train:{weight_decay:0.001,milestones:[0.3,0.6]}}",
                             "quant=qat", "qat.epochs=2", check=False))
    assert f"run `kd train {' '.join(TINY)} train.weight_decay=0.001 'train.milestones=[0.3,0.6]' '~student'` first" in line
    # A teacher the scheme takes from scheme.teachers: teacher.checkpoint would not give it.
    proc = kd("distill", *TINY, "scheme=multi_teacher", "scheme.teachers=[mnist_student]", check=False)
    assert proc.returncode == 1  # after the warning that TINY's teacher= is not read
    assert proc.stderr.strip().splitlines()[-1].endswith("first or pass train_missing=true to train it here"), proc.stderr


def test_train_command_keeps_the_recipe_and_drops_what_only_distill_takes(monkeypatch):
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from kd_cli import run
    from kd_cli.cli import config_dir
    from kd_cli.config import register_model_groups

    register_model_groups()
    overrides = [*TINY, "alpha=0.6", "loss=kd", "teacher.checkpoint=/tmp/teacher.pt", "train_missing=true"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("distill", overrides)
    task = SimpleNamespace(overrides=SimpleNamespace(task=overrides))
    monkeypatch.setattr(run.HydraConfig, "get", staticmethod(lambda: task))
    assert run.train_command(cfg) == f"kd train {' '.join(TINY)}"
    # A key given twice: once, where it first stood, with the value that took effect.
    again = [*overrides, "train.epochs=3"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("distill", again)
    task.overrides.task = again
    assert run.train_command(cfg) == "kd train " + " ".join(o.replace("train.epochs=2", "train.epochs=3") for o in TINY)


@pytest.mark.parametrize("override, message", [
    ("alpha=1.5", "kd: error: alpha must be in [0, 1] (the weight of the distillation term), got 1.5"),
    ("T=0", "kd: error: T must be > 0 (the softmax temperature), got 0"),
    ("+loss.gamma=1", "kd: error: loss=kd has no option 'gamma'; it takes no loss.* options"),
    ("loss.weight=2", "kd: error: loss=kd has no option 'weight'; it takes no loss.* options"),
    ("measure.latency_runs=0", "kd: error: measure.latency_runs must be a whole number >= 1, got 0"),
    ("experiment=quick_mnist,quick_tutorial", "kd: error: experiment= takes one experiment (each is several sweeps "
                                              "already), got quick_mnist,quick_tutorial; run them one after another"),
])
def test_bad_values_exit_with_one_line(kd, override, message):
    assert one_line_error(kd("distill", *TINY, override, check=False)) == message


def test_a_misspelt_loss_option_is_matched_against_the_chosen_loss(kd):
    line = one_line_error(kd("distill", *TINY, "loss=at", "loss.wieght=1", check=False))
    assert line == ("kd: error: loss=at has no option 'wieght' (did you mean 'weight'?); "
                    "its options are: p, student_layers, teacher_layers, weight")


def test_unknown_model_lists_the_catalogue(kd):
    line = one_line_error(kd("distill", "teacher=resnet99", check=False))
    assert line.startswith("kd: error: unknown teacher 'resnet99'; choose one of: conv10, conv2,") and "resnet18" in line


def test_errors_leave_earlier_results_untouched(kd):
    kd("train", *TINY)
    before = {p: p.read_bytes() for p in (kd.cwd / "outputs").rglob("*") if p.is_file()}
    kd("distill", *TINY, "alpha=2", check=False)
    kd("train", *TINY, "train.epochs=0", check=False)
    for path, content in before.items():
        assert path.read_bytes() == content


def test_help_lists_commands_and_groups(kd):
    assert "distill" in kd("--help").stdout
    help_text = kd("distill", "--help").stdout
    for group in ("dataset: cifar10, cifar100, fashion_mnist, mnist", "loss: at, cc, ce, combo,", "scheme: born_again, multi_teacher, offline, online, self, ta", "teacher:"):
        assert group in help_text
    assert "alpha: 0.9" in kd("distill", "--cfg", "job").stdout
    train_help = kd("train", "--help", "dataset=mnist").stdout
    assert train_help.startswith("kd train: train the teacher and the student from labels alone")
    assert "dataset: cifar10, cifar100, fashion_mnist, mnist (now: mnist)" in train_help
    assert "\n  loss:" not in train_help and "\n  scheme:" not in train_help and "\nseed: 0" in train_help
    assert one_line_error(kd("train", "loss=at", check=False)) == (
        "kd: error: 'loss' is a setting of kd distill, not of kd train, which trains the teacher and the student "
        "from labels alone")
    for line in ("--help", "distill --help"):  # a reader that stops early (| head) gets no traceback
        piped = subprocess.run(f"{kd_executable()} {line} | head -1", shell=True, capture_output=True, text=True)
        assert piped.stdout.startswith("kd") and piped.stderr == ""
    # Nor does Hydra's --info, which it prints through logging; `true` reads nothing, so every line meets the closed pipe.
    piped = subprocess.run(f"{kd_executable()} distill --info defaults | true", shell=True, capture_output=True, text=True)
    assert piped.stderr == ""
    unknown = kd("distil", check=False)
    assert unknown.returncode == 2 and "unknown command 'distil'" in unknown.stderr


def test_hydra_flags_go_anywhere_on_the_line(kd):
    from kd_cli.preflight import split_args

    assert split_args(["a=1", "--cfg", "job", "b=2", "--resolve", "-p=train", "c=3"]) == (
        ["--cfg", "job", "--resolve", "--package=train"], ["a=1", "b=2", "c=3"])
    assert split_args(["a=1", "-m", "b=1,2", "--config-dir", "./my conf"]) == (
        ["--multirun", "--config-dir", "./my conf"], ["a=1", "b=1,2"])
    assert split_args(["--cf=job", "a=1", "--res"]) == (["--cfg=job", "--resolve"], ["a=1"])  # argparse's prefixes
    assert split_args(["-sc", "install=bash"]) == (["--shell-completion"], ["install=bash"])
    for line, message in ((["--cfg", "job", "--info"], "--cfg and --info do not combine; use one at a time"),
                          (["a=1", "--multi", "--cfg", "job"], "-m and --cfg do not combine"),
                          (["alpha=0.3", "--cfg"], "--cfg takes a value: job, hydra, all"),
                          (["--shell-completion"], "--shell-completion takes what to do: install=bash"),
                          (["-cn", "nope"], "-cn is not taken: each kd command composes its own config from kd's conf/")):
        with pytest.raises(KdError, match=message):
            split_args(line)
    assert "alpha: 0.3" in kd("distill", "alpha=0.3", "--cfg", "job", "T=2").stdout
    misread = kd("distill", "--cfg", "jbo", check=False)  # a command line kd cannot parse: 2, as argparse's errors
    assert misread.returncode == 2 and one_line_error(misread) == "kd: error: --cfg takes a value: job, hydra, all"
    line = one_line_error(kd("distill", "alpha=0.1,0.2", "--cfg", "job", "-m", check=False))
    assert line.startswith("kd: error: -m and --cfg do not combine: --cfg is about one run; drop -m")
    line = one_line_error(kd("distill", "-m", "alpha=0.1,0.2", "--help", check=False))
    assert line.startswith("kd: error: --help shows one run's config; drop -m and give each key one value (")


def test_help_with_a_list_says_to_drop_m_only_when_given(kd):
    line = one_line_error(kd("distill", "--help", "T=1,2", check=False))
    assert line == "kd: error: --help shows one run's config; give each key one value (Ambiguous value for argument 'T=1,2')"


@pytest.mark.parametrize("args", [["--version"], ["distill", "dataset=fashion_mnist", "--cfg", "job"],
                                  ["train", "--info", "dataset=fashion_mnist"]])
def test_what_only_prints_ends_quietly_when_its_reader_has_gone(args):
    """`kd --version | true`: the pipe is closed before kd writes. As a shell tool: no traceback, and status
    141, which a shell also shows for a process killed by SIGPIPE (what Hydra's printing leaves to the signal)."""
    proc = subprocess.Popen([kd_executable(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() in (141, -signal.SIGPIPE) and stderr == "", stderr


def test_an_unknown_flag_is_refused_before_anything_is_looked_for(kd):
    proc = kd("train", "--multirn", "alpha=0.5", check=False)  # CIFAR-10, the default dataset, is not here
    assert proc.returncode == 2
    assert one_line_error(proc).startswith("kd: error: unknown flag --multirn; did you mean --multirun? (kd takes "
                                           "Hydra's flags: --cfg, ")
    assert "download" not in proc.stderr and not (kd.cwd / "data").exists()


def test_runs_without_a_torchvision_model_do_not_import_torchvision():
    """Importing it costs about 0.9 s at the start of every command (a typo's error included)."""
    import sys

    modules = "kd_cli.cli kd_cli.sweep kd_cli.preflight kd_cli.run kd_cli.schemes kd_cli.data kd_cli.measure"
    code = f"import sys; import {', '.join(modules.split())}; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_sweep_resumes_only_with_its_swept_keys_in_their_order(tmp_path, monkeypatch):
    """Hydra numbers a sweep's jobs by the order of its swept keys: another order would pair each job
    folder with another combination."""
    import yaml

    from kd_cli.cli import resume_target

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "outputs" / "distill-multirun" / "2026-11-24_10-00-00"
    sweep.mkdir(parents=True)
    recorded = ["train.epochs=1", "alpha=0.15,0.25", "T=3", "seed=0,1"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": recorded}}}))
    assert resume_target("distill", ["-m", "T=3", "alpha=0.15,0.25", "train.epochs=1", "seed=0,1", "resume=true"]) == [
        f"hydra.sweep.dir={Path('outputs/distill-multirun/2026-11-24_10-00-00')}"]  # unswept keys in any order
    with pytest.raises(KdError, match=re.escape("swept alpha, seed in that order, and Hydra numbers a sweep's jobs by it")):
        resume_target("distill", ["-m", "seed=0,1", "T=3", "alpha=0.15,0.25", "train.epochs=1", "resume=true"])
