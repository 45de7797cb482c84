"""Sweeps beyond one process: joblib and submitit_local launchers, the SLURM preset, the Optuna search."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import REPO, TINY, kd_executable
from kd_cli import sweep

LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    # submitit_local starts every job at once; one torch thread each keeps 2 cores from thrashing
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"],
}


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "distill-multirun").iterdir() if p.is_dir())


def kd_rows(job: Path) -> dict:
    rows = json.loads((job / "results.json").read_text())["rows"]
    return {r["role"]: r for r in rows}


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, fashion_mnist) -> Path:
    """Teachers and scratch students of seeds 0 and 1, trained once for every launcher's test."""
    cwd = tmp_path_factory.mktemp("store")
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run([kd_executable(), "train", "-m", *TINY, "seed=0,1"], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / "outputs" / "store"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_seeds_two_configs_and_a_failing_job(kd, launcher, trained_store):
    shutil.copytree(trained_store, kd.cwd / "outputs" / "store")
    # seed 2 was never trained: its jobs fail at run time (no teacher in the store), the others finish
    proc = kd("distill", "-m", *TINY, "alpha=0.1,0.9", "seed=0,1,2", *LAUNCHERS[launcher], check=False)
    assert proc.returncode != 0, proc.stdout
    (sweep_dir,) = sweep_dirs(kd.cwd)

    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 6
    failed = summary[summary["status"] == "failed"]
    assert sorted(failed["seed"]) == [2, 2] and len(summary[summary["status"] == "ok"]) == 4
    assert all(e.startswith("kd: error: no trained teacher mnist_teacher for fashion_mnist (seed 2")
               for e in failed["error"])

    report = pd.read_csv(sweep_dir / "report.csv")
    for alpha in (0.1, 0.9):
        row = report[(report["role"] == "student_kd") & (report["alpha"] == alpha) & (report["status"] == "ok")].iloc[0]
        jobs = [sweep_dir / str(j) for j in summary[(summary["alpha"] == alpha) & (summary["status"] == "ok")]["job"]]
        kd_acc = [kd_rows(j)["student_kd"]["accuracy"] for j in jobs]
        scratch = [kd_rows(j)["student_scratch"]["accuracy"] for j in jobs]
        diffs = [a - b for a, b in zip(kd_acc, scratch)]
        mean = sum(diffs) / 2
        half = 12.706205 * abs(diffs[0] - diffs[1]) / 2  # t(1) * sd / sqrt(2), sd of two values = |d0 - d1| / sqrt(2)
        assert (row["n"], row["seeds"]) == (2, "0,1")
        assert row["accuracy"] == pytest.approx(sum(kd_acc) / 2)
        assert row["gain"] == pytest.approx(mean)
        assert (row["gain_ci_low"], row["gain_ci_high"]) == (pytest.approx(mean - half, abs=1e-4),
                                                             pytest.approx(mean + half, abs=1e-4))
    assert (report["status"] == "failed").sum() == 2
    assert "report of sweep" in proc.stdout and "KD gain: mnist_student distilled (loss=kd, alpha=0.1, T=4)" in proc.stdout
    # The summary table gives each failed job's error; the report after it counts them instead of repeating them.
    assert proc.stdout.count("no trained teacher mnist_teacher") == 2
    assert "not finished: 2 jobs, each with its status and error in the summary above" in proc.stdout
    assert (sweep_dir / "report.md").is_file() and (sweep_dir / "report_pareto_size.png").stat().st_size > 1000


def test_slurm_preset_composes(kd):
    hydra_cfg = kd("distill", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60",
                   "--cfg", "hydra").stdout
    launcher = yaml.safe_load(hydra_cfg)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"]) == ("gpu", 1, 60)


def test_gpus_are_dealt_round_robin(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    callback = sweep.RecordSweep()
    for num, device in ((0, "auto"), (5, "auto"), (6, "cpu")):
        cfg = OmegaConf.create({"device": device, "hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num},
                                                            "launcher": {"cpus_per_task": 3}}})
        callback.on_job_start(cfg)
    assert chosen == [0, 1] and threads == [3, 3, 3]
    single = OmegaConf.create({"device": "auto", "hydra": {"mode": RunMode.RUN, "job": {"num": 0}}})
    callback.on_job_start(single)
    assert chosen == [0, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sweep.assign_gpu(3) is None



def test_a_swept_dataset_is_a_column_of_the_printed_summary(tmp_path, capsys):
    """`kd distill -m dataset=fashion_mnist,cifar10`: the printed table must say which job is which."""
    for job, dataset in enumerate(("fashion_mnist", "cifar10")):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"dataset={dataset}"]))
    (tmp_path / "0" / "results.json").write_text(json.dumps({"command": "distill", "rows": [
        {"role": "student_kd", "dataset": "fashion_mnist", "accuracy": 80.0}]}))
    (tmp_path / "1" / "error.txt").write_text("kd: error: could not download cifar10 into data\n")
    sweep.summarize(tmp_path)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "job" in line)
    assert "dataset" in header and "cifar10" in table and "fashion_mnist" in table

def _search_override() -> str:
    # `hparams_search=optuna` once conf/distill.yaml lists the group in its defaults (the lead's patch)
    defaults = yaml.safe_load((REPO / "conf" / "distill.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    return "hparams_search=optuna" if listed else "+hparams_search=optuna"


def test_optuna_search_space_composes(kd):
    composed = yaml.safe_load(kd("distill", _search_override(), "--cfg", "all").stdout)
    sweeper = composed["hydra"]["sweeper"]
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "maximize"
    assert sweeper["params"] == {"alpha": "interval(0.0, 1.0)", "T": "tag(log, interval(1.0, 16.0))"}
    assert composed["data"]["val_fraction"] == 0.1


@pytest.mark.usefixtures("fashion_mnist")
def test_optuna_three_trials_pick_by_validation_accuracy(kd):
    kd("train", *TINY, "data.val_fraction=0.1")
    proc = kd("distill", "-m", *TINY, _search_override(), "hydra.sweeper.n_trials=3",
              f"hydra.sweeper.storage=sqlite:///{kd.cwd}/optuna.db")
    (sweep_dir,) = sweep_dirs(kd.cwd)
    assert "alembic" not in proc.stdout + proc.stderr  # Optuna's database library announcing its plugins
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "results.json").exists())
    assert len(jobs) == 3
    trials = [kd_rows(j)["student_kd"] for j in jobs]
    assert all(0 <= t["alpha"] <= 1 and 1 <= t["T"] <= 16 for t in trials)
    assert best["best_value"] == pytest.approx(max(t["val_accuracy"] for t in trials))
    (winner,) = [t for t in trials if t["alpha"] == pytest.approx(best["best_params"]["alpha"])
                 and t["T"] == pytest.approx(best["best_params"]["T"])]
    assert winner["val_accuracy"] == pytest.approx(best["best_value"])  # chosen on validation, whatever the test set says
    report = json.loads((sweep_dir / "report.json").read_text())
    (search,) = report["optuna"]
    assert search["chosen_by"].startswith("validation accuracy on a held-out 0.1 of the training set")
    assert search["winner_test_accuracy"] == winner["accuracy"]
    assert "Optuna (3 trials" in proc.stdout
    # A later sweep continues the stored study with new trials: the preset's fixed sampler seed would draw the
    # first sweep's start-up trials again.
    proc = kd("distill", "-m", *TINY, _search_override(), "hydra.sweeper.n_trials=1",
              f"hydra.sweeper.storage=sqlite:///{kd.cwd}/optuna.db")
    assert "continuing Optuna study 'kd_distill' (3 trials in sqlite:///" in proc.stderr
    (later,) = [p for p in sweep_dirs(kd.cwd)[-1].iterdir() if (p / "results.json").exists()]
    assert (kd_rows(later)["student_kd"]["alpha"], kd_rows(later)["student_kd"]["T"]) not in [(t["alpha"], t["T"]) for t in trials]
    import optuna

    assert len(optuna.load_study(study_name="kd_distill", storage=f"sqlite:///{kd.cwd}/optuna.db").trials) == 4
