"""A stopped sweep's summary lists the jobs it never started, numbered as Hydra numbers them."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from kd_cli import sweep
from kd_cli.cli import config_dir
from kd_cli.config import register_model_groups


def _job(sweep_dir: Path, num: int, overrides: list[str], accuracy: float | None = None, error: str | None = None):
    """A job folder as Hydra and kd leave it: overrides, then results.json (ok) or error.txt (failed)."""
    (sweep_dir / str(num) / ".hydra").mkdir(parents=True)
    (sweep_dir / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if accuracy is not None:
        (sweep_dir / str(num) / "results.json").write_text(json.dumps({"command": "distill", "rows": [
            {"role": "student_scratch", "accuracy": 70.0}, {"role": "student_kd", "accuracy": accuracy}]}))
    if error is not None:
        (sweep_dir / str(num) / "error.txt").write_text(f"Traceback ...\n{error}\n")


GRID = [[f"alpha={a}", f"T={t}"] for a in (0.1, 0.5, 0.9) for t in (1, 4)]  # Hydra's order for alpha=0.1,0.5,0.9 T=1,4


def test_an_interrupted_sweep_lists_its_planned_jobs_as_not_started(tmp_path, capsys, monkeypatch):
    (tmp_path / sweep.PLAN).write_text(yaml.safe_dump(GRID))
    _job(tmp_path, 0, GRID[0], accuracy=80.0)
    _job(tmp_path, 1, GRID[1], error="kd: error: out of memory")
    _job(tmp_path, 2, [*GRID[2], "resume=true"])  # stopped mid-training, in a resumed sweep
    heatmaps = []
    monkeypatch.setattr(sweep, "write_heatmap", lambda frame, *args: heatmaps.append(frame.copy()) or args[-1])

    frame = sweep.summarize(tmp_path)

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["job"].tolist() == [0, 1, 2, 3, 4, 5]  # one row per planned job, in job order
    assert summary["status"].tolist() == ["ok", "failed", "unfinished", "not started", "not started", "not started"]
    assert list(zip(summary["alpha"], summary["T"])) == [(0.1, 1), (0.1, 4), (0.5, 1), (0.5, 4), (0.9, 1), (0.9, 4)]
    assert summary.columns.tolist()[:3] == ["job", "alpha", "T"] and "resume" not in summary.columns
    assert summary["accuracy"].tolist()[0] == 80.0 and summary["accuracy"].iloc[3:].isna().all()
    assert len(frame) == 6
    out = " ".join(capsys.readouterr().out.split())  # rich wraps a title wider than its table
    assert "6 jobs (3 not started)" in out and out.count("not started") == 4  # the title and three rows
    # The heatmap is what the started jobs gave: no cells for the jobs that never ran.
    (cells,) = heatmaps
    assert cells["job"].tolist() == ["0", "1", "2"]


def test_an_optuna_search_gets_no_heatmap_however_few_its_trials(tmp_path, monkeypatch):
    """Two trials fill half of their 2 x 2 'grid' by chance: a heatmap of it would be mostly empty cells,
    coloured by test accuracy where the search chose by validation accuracy; the report draws a scatter."""
    from kd_cli import plots

    trials = [["alpha=0.548", "T=7.26", "hparams_search=optuna"], ["alpha=0.603", "T=4.53", "hparams_search=optuna"]]
    for num, overrides in enumerate(trials):
        _job(tmp_path, num, overrides, accuracy=80.0 + num)
    (tmp_path / "optimization_results.yaml").write_text(yaml.safe_dump({"best_params": {"alpha": 0.603, "T": 4.53},
                                                                        "best_value": 81.0}))
    drawn = []
    monkeypatch.setattr(sweep, "write_heatmap", lambda frame, *args: drawn.append("sweep heatmap") or args[-1])
    monkeypatch.setattr(plots, "heatmap", lambda *args, **kwargs: drawn.append("report heatmap") or args[-2])
    monkeypatch.setattr(plots, "_scatter", lambda *args: drawn.append("report scatter") or args[-1])
    frame = pd.DataFrame([{"role": "student_kd", "alpha": 0.548, "T": 7.26, "accuracy": 80.0, "run": str(tmp_path / "0")},
                          {"role": "student_kd", "alpha": 0.603, "T": 4.53, "accuracy": 81.0, "run": str(tmp_path / "1")}])
    sweep.summarize(tmp_path)
    plots._two_key_plots(frame, ["alpha", "T"], tmp_path, searches={str(tmp_path)})
    assert "sweep heatmap" not in drawn and drawn[-1] == "report scatter"
    plots._two_key_plots(frame, ["alpha", "T"], tmp_path)  # the same two points from a grid sweep: a heatmap
    assert drawn[-1] == "report heatmap"


def test_a_resumed_sweep_that_finished_has_one_row_per_job(tmp_path, capsys):
    # The resumed run rewrote the plan with its own command line, resume=true included.
    plan = [[*job, "resume=true"] for job in GRID[:2]]
    (tmp_path / sweep.PLAN).write_text(yaml.safe_dump(plan))
    _job(tmp_path, 0, GRID[0], accuracy=80.0)  # finished before the stop, skipped by the resumed run
    _job(tmp_path, 1, [*GRID[1], "resume=true"], accuracy=81.0)
    sweep.summarize(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["job"].tolist() == [0, 1] and (summary["status"] == "ok").all()
    assert "resume" not in summary.columns and summary["T"].tolist() == [1, 4]
    out = " ".join(capsys.readouterr().out.split())
    assert "2 jobs" in out and "not started" not in out


def test_a_swept_value_the_loss_did_not_read_still_names_its_job(tmp_path, capsys):
    """alpha=0 T=1,2: each row leaves T empty (it was not read), and the summary keeps the job's T."""
    for num, T in enumerate((1, 2)):
        _job(tmp_path, num, ["alpha=0", f"T={T}"], accuracy=80.0)
        payload = json.loads((tmp_path / str(num) / "results.json").read_text())
        payload["rows"][1] |= {"alpha": 0.0, "T": None}
        (tmp_path / str(num) / "results.json").write_text(json.dumps(payload))
    sweep.summarize(tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv")["T"].tolist() == [1, 2]


def test_values_in_exponent_form_are_numbers_and_get_their_heatmap(tmp_path, monkeypatch):
    """`train.lr=1e-3,5e-4`: the config reads numbers (OmegaConf's YAML); PyYAML's 1.1 would read strings."""
    jobs = [[f"alpha={a}", f"train.lr={lr}"] for a in (0.5, 0.9) for lr in ("1e-3", "5e-4")]
    for num, overrides in enumerate(jobs):
        _job(tmp_path, num, overrides, accuracy=80.0 + num)
    heatmaps = []
    monkeypatch.setattr(sweep, "write_heatmap", lambda frame, *args: heatmaps.append(args[:2]) or args[-1])
    sweep.summarize(tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv")["train.lr"].tolist() == [0.001, 0.0005, 0.001, 0.0005]
    assert heatmaps == [("alpha", "train.lr")]


def test_an_empty_error_file_is_a_failed_job(tmp_path):
    """A full disk can leave error.txt empty: the job is still listed as failed."""
    _job(tmp_path, 0, ["alpha=0.3"], accuracy=80.0)
    _job(tmp_path, 1, ["alpha=0.7"])
    (tmp_path / "1" / "error.txt").write_text("")
    sweep.summarize(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["status"].tolist() == ["ok", "failed"] and summary["error"].iloc[1] == "(empty error.txt)"


def test_without_a_plan_only_started_jobs_are_listed(tmp_path):
    """An Optuna sweep (its trials are not known in advance) or a sweep started by an older kd."""
    _job(tmp_path, 0, ["alpha=0.3"], accuracy=80.0)
    _job(tmp_path, 1, ["alpha=0.7"])
    sweep.summarize(tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv")["status"].tolist() == ["ok", "unfinished"]


def test_a_sweep_stopped_before_its_first_job_lists_them_all(tmp_path, capsys):
    (tmp_path / sweep.PLAN).write_text(yaml.safe_dump(GRID[:2]))
    sweep.summarize(tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv")["status"].tolist() == ["not started"] * 2
    assert "2 jobs (2 not started)" in " ".join(capsys.readouterr().out.split())


def _hydra_multirun(conf: Path, sweep_dir: Path, overrides: list[str]) -> dict[int, list[str]]:
    """Run Hydra's own multirun of `kd distill` (basic sweeper and launcher, RecordSweep's callbacks
    included) with a task that trains nothing; return job number -> the overrides Hydra gave it."""
    launched = {}

    def task(cfg):
        launched[HydraConfig.get().job.num] = list(HydraConfig.get().overrides.task)

    register_model_groups()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        GlobalHydra.instance().hydra.multirun(config_name="sweep", task_function=task, with_log_configuration=False,
                                              overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}", "device=cpu"])
    return launched


@pytest.mark.parametrize("sweeper, overrides", [
    ({}, ["alpha=0.1,0.9", "T=1,4"]),  # the 2x2 grid
    # a sweep in the config's hydra.sweeper.params (Hydra puts it first), a range, a choice() and a
    # glob() over a config group, launched in batches of 3
    ({"params": {"seed": "0,1"}, "max_batch_size": 3}, ["T=range(1,3)", "alpha=choice(0.2,0.8)", "loss=glob([k*,ce])"]),
])
def test_the_plan_numbers_jobs_as_hydra_does(tmp_path, monkeypatch, sweeper, overrides):
    conf = shutil.copytree(config_dir(), tmp_path / "conf")
    (conf / "sweep.yaml").write_text(yaml.safe_dump({"defaults": ["distill", "_self_"], "hydra": {"sweeper": sweeper}}))
    monkeypatch.setattr(sweep, "started_sweeps", [])
    sweep_dir = tmp_path / "sweep"
    launched = _hydra_multirun(conf, sweep_dir, overrides)
    plan = yaml.safe_load((sweep_dir / sweep.PLAN).read_text())
    assert len(plan) == len(launched) >= 4 and sweep.started_sweeps == [sweep_dir]
    assert {num: job for num, job in enumerate(plan)} == launched
    for num, job in enumerate(plan):  # and each job folder records the same
        assert yaml.safe_load((sweep_dir / str(num) / ".hydra" / "overrides.yaml").read_text()) == job

    # Stopped after job 1: the jobs after it are listed with their own numbers and values.
    for num in range(2, len(plan)):
        shutil.rmtree(sweep_dir / str(num))
    summary = sweep.summarize(sweep_dir)
    assert summary["job"].tolist() == [str(num) for num in range(len(plan))]
    assert summary["status"].tolist() == ["unfinished"] * 2 + ["not started"] * (len(plan) - 2)
    for num, job in enumerate(plan):
        for key, _, value in (item.partition("=") for item in job):
            if key in summary.columns:  # the swept keys
                assert str(summary.iloc[num][key]) == value


def test_no_plan_for_a_sweeper_that_chooses_its_trials(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / sweep.PLAN).write_text(yaml.safe_dump(GRID))  # from an earlier run of this folder
    cfg = OmegaConf.create({"hydra": {
        "sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                    "params": {"alpha": "interval(0.0, 1.0)"}},
        "overrides": {"task": ["T=4"]}}})
    sweep.RecordSweep().on_multirun_start(cfg)
    assert not (tmp_path / sweep.PLAN).exists()


def test_the_report_of_a_stopped_sweep_names_the_jobs_it_never_reached(tmp_path, capsys):
    from kd_cli import report

    (tmp_path / "multirun.yaml").write_text("{}\n")  # what makes Hydra's folder a sweep for the report
    # The jobs are named by what tells them apart: not by the override every job of the sweep has.
    (tmp_path / sweep.PLAN).write_text(yaml.safe_dump([["dataset=fashion_mnist", *job] for job in GRID]))
    _job(tmp_path, 0, GRID[0], accuracy=80.0)
    _job(tmp_path, 1, GRID[1], error="kd: error: out of memory")
    finished = json.loads((tmp_path / "0" / "results.json").read_text())
    (tmp_path / "0" / "results.json").write_text(json.dumps({**finished, "config": {"alpha": 0.1, "T": 1, "seed": 0}}))

    whole = report.build_report(report.find_runs([tmp_path]))
    assert whole.not_started == [f"{tmp_path / str(n)}: alpha={a} T={t}"
                                 for n, (a, t) in enumerate([(0.5, 1), (0.5, 4), (0.9, 1), (0.9, 4)], 2)]
    assert report.runs_title(whole) == "2 runs (4 planned jobs not started)"
    assert f"not started {tmp_path / '5'}: alpha=0.9 T=4" in report.problem_lines(whole)
    assert "## Failed, unfinished or not started runs" in report.to_markdown(whole, [tmp_path])
    assert len(json.loads(report.to_json(whole))["not_started"]) == 4
    # A filter drops the jobs whose own overrides contradict it, and keeps those it says nothing about.
    assert [line.split(": ")[1] for line in report.build_report(report.find_runs([tmp_path]), ["T=4"]).not_started] \
        == ["alpha=0.5 T=4", "alpha=0.9 T=4"]
    assert len(report.build_report(report.find_runs([tmp_path]), ["seed=0"]).not_started) == 4
    assert report._contradicts({"loss": "kd"}, "loss.name", "dkd") and not report._contradicts({"loss": "kd"}, "loss.name", "kd")
    # A report on one job's folder is not a report on its sweep.
    assert report.build_report(report.find_runs([tmp_path / "0"]), sources=[tmp_path / "0"]).not_started == []
    assert len(report.build_report(report.find_runs([tmp_path]), sources=[tmp_path]).not_started) == 4
    # A filter that leaves no rows still names the planned jobs it matches; those whose overrides do
    # not set the key are not matches, and then there is nothing to report.
    report.print_report(report.build_report(report.find_runs([tmp_path]), ["alpha=0.9"]), "t")
    assert capsys.readouterr().out.count("not finished: not started") == 2
    with pytest.raises(report.ReportError, match="no run matches --filter seed=5 "):
        report.build_report(report.find_runs([tmp_path]), ["seed=5"])

    report.report_sweep(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "2 runs (4 planned jobs not started)" in out and "not finished: 5 jobs, each with its status" in out
