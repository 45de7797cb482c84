"""`kd report` on run folders written here, every printed number checked against a hand computation.

The t quantiles in the expected values are t_{0.975}: 4.302653 for 2 degrees of freedom, 12.706205 for 1.
"""

import io
import itertools
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import kd_executable
from kd_cli import report
from kd_cli.plots import pareto_front
from kd_cli.store import store_path

SIZES = {"mnist_teacher": (1_422_378, 5.4259, 3_232_640), "deepnn": (938_922, 3.5817, 140_700_000),
         "mnist_student": (693_962, 2.6473, 1_776_384)}


def config(command, seed, alpha=0.5, T=4.0, teacher="mnist_teacher", fraction=1.0, **extra):
    cfg = {"dataset": {"name": "fashion_mnist", "channels": 1}, "teacher": {"arch": teacher, "checkpoint": None},
           "student": {"arch": "mnist_student", "checkpoint": None}, "seed": seed, "device": "auto",
           "store_dir": "outputs/store", "overwrite": False, "resume": False,
           "data": {"root": "data", "download": True, "augment": False, "fraction": fraction, "test_fraction": 1.0},
           "train": {"epochs": 2, "batch_size": 128, "optimizer": "adam", "lr": 0.001},
           "measure": {"latency_runs": 3, "latency_warmup": 1}, "command": command, **extra}
    if command == "distill":
        cfg |= {"loss": {"name": "kd"}, "scheme": {"name": "offline"}, "alpha": alpha, "T": T}
    return cfg


def checkpoint(cfg, key):
    return str(store_path(OmegaConf.create(cfg), OmegaConf.create(cfg[key])))


def row(role, model, seed, accuracy, best=None, **extra):
    params, size, flops = SIZES[model]
    return {"role": role, "model": model, "dataset": "fashion_mnist", "scheme": None, "loss": None, "seed": seed,
            "alpha": None, "T": None, "accuracy": accuracy, "best_accuracy": best if best is not None else accuracy,
            "params": params, "helper_params": None, "size_mb": size, "flops": flops, "latency_ms": 0.1,
            "train_time_s": 1.0, "train_img_per_s": 1000.0, "gain_vs_scratch": None, "teacher_retained": None,
            "compression": None, "checkpoint": None, **extra}


def history(accuracies):
    return [{"epoch": i + 1, "loss": 1.0 / (i + 1), "train_accuracy": a - 1, "test_accuracy": a, "lr": 0.001,
             "img_per_s": 1000.0} for i, a in enumerate(accuracies)]


def write_run(folder: Path, cfg: dict, rows: list[dict] | None = None, error: str | None = None, overrides=(),
              unread=()):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if rows is not None:
        histories = {r["role"]: history([r["accuracy"] - 2, r["accuracy"]]) for r in rows}
        payload = {"command": cfg["command"], "kd_version": "0.1.0", "torch": "2.13.0", "device": "cpu",
                   "config": cfg, "unread": list(unread), "histories": histories, "rows": rows}
        (folder / "results.json").write_text(json.dumps(payload))
    if error is not None:
        (folder / "error.txt").write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{error}\n")


def distill_run(folder, seed, alpha, kd_acc, scratch_acc, teacher_acc, kd_best=None, teacher="mnist_teacher",
                fraction=1.0, with_scratch=True):
    cfg = config("distill", seed, alpha=alpha, teacher=teacher, fraction=fraction)
    rows = [row("teacher", teacher, seed, teacher_acc, checkpoint=checkpoint(cfg, "teacher"))]
    if with_scratch:
        rows.append(row("student_scratch", "mnist_student", seed, scratch_acc, loss="ce",
                        checkpoint=checkpoint(cfg, "student")))
    rows.append(row("student_kd", "mnist_student", seed, kd_acc, best=kd_best, loss="kd", scheme="offline",
                    alpha=alpha, T=4.0, compression=SIZES[teacher][1] / SIZES["mnist_student"][1],
                    checkpoint=str(folder / "student.pt")))
    write_run(folder, cfg, rows, overrides=[f"alpha={alpha}", f"seed={seed}"])


@pytest.fixture
def sweep(tmp_path):
    """alpha in {0.5, 0.9} x seeds {0, 1, 2}, each job with its scratch student; one failed and one unfinished job."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {overrides: {task: ['alpha=0.5,0.9', 'seed=0,1,2']}}\n")
    scratch = {0: 79.0, 1: 80.5, 2: 80.5}
    teacher = {0: 85.0, 1: 86.0, 2: 87.0}
    kd = {0.5: ([80.0, 81.0, 82.5], [80.5, 81.0, 83.0]), 0.9: ([83.0, 83.5, 84.0], [83.0, 83.5, 84.0])}
    job = 0
    for alpha, (last, best) in kd.items():
        for seed in range(3):
            distill_run(root / str(job), seed, alpha, last[seed], scratch[seed], teacher[seed], kd_best=best[seed])
            job += 1
    write_run(root / "6", config("distill", 3, alpha=0.9), error="kd: error: student_kd: the loss became NaN or inf in epoch 2, step 7",
              overrides=["alpha=0.9", "seed=3"])
    write_run(root / "7", config("distill", 3, alpha=0.5), overrides=["alpha=0.5", "seed=3"])
    (root / "7" / "state").mkdir()
    return root


def rows_of(frame: pd.DataFrame, **where) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        mask &= frame[key] == value
    return frame[mask]


def test_numbers_match_hand_computation(sweep, capsys):
    assert report.main([str(sweep), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    frame = pd.DataFrame(out["rows"])
    assert out["keys"] == ["loss", "alpha", "T"]

    teacher = rows_of(frame, role="teacher").iloc[0]
    # 85, 86, 87: mean 86, sample std 1; one teacher per seed although 6 jobs report it
    assert (teacher["n"], teacher["accuracy"], teacher["accuracy_std"]) == (3, pytest.approx(86.0), pytest.approx(1.0))
    scratch = rows_of(frame, role="student_scratch").iloc[0]
    # 79, 80.5, 80.5: mean 80, variance (1 + 0.25 + 0.25) / 2 = 0.75
    assert scratch["n"] == 3 and scratch["accuracy"] == pytest.approx(80.0)
    assert scratch["accuracy_std"] == pytest.approx(math.sqrt(0.75))

    low = rows_of(frame, role="student_kd", alpha=0.5, status="ok").iloc[0]
    # last epoch 80, 81, 82.5: mean 81.1667, variance (1.3611 + 0.0278 + 1.7778) / 2 = 1.58333
    assert low["n"] == 3 and low["seeds"] == "0,1,2"
    assert low["accuracy"] == pytest.approx(243.5 / 3)
    assert low["accuracy_std"] == pytest.approx(math.sqrt(1.58333333))
    # best epoch 80.5, 81, 83: mean 81.5, variance (1 + 0.25 + 2.25) / 2 = 1.75
    assert low["best_accuracy"] == pytest.approx(81.5) and low["best_accuracy_std"] == pytest.approx(math.sqrt(1.75))
    # paired differences 1.0, 0.5, 2.0: mean 1.16667, sd sqrt(0.58333) = 0.763763, se 0.440959,
    # half width 4.302653 * 0.440959 = 1.897294
    assert low["gain"] == pytest.approx(3.5 / 3)
    assert low["gain_ci_low"] == pytest.approx(3.5 / 3 - 1.897294, abs=1e-5)
    assert low["gain_ci_high"] == pytest.approx(3.5 / 3 + 1.897294, abs=1e-5)
    assert low["gain_n"] == 3 and low["gain_method"] == "paired by seed, t(2)"
    assert low["gain_verdict"].startswith("not distinguishable from zero")

    high = rows_of(frame, role="student_kd", alpha=0.9, status="ok").iloc[0]
    # 83, 83.5, 84 against 79, 80.5, 80.5: differences 4, 3, 3.5, mean 3.5, sd 0.5, half 4.302653 * 0.5 / sqrt(3) = 1.242068
    assert (high["accuracy"], high["accuracy_std"]) == (pytest.approx(83.5), pytest.approx(0.5))
    assert (high["gain_ci_low"], high["gain_ci_high"]) == (pytest.approx(2.257932, abs=1e-5), pytest.approx(4.742068, abs=1e-5))
    assert high["gain_verdict"].startswith("KD better")
    assert high["params"] == 693_962 and high["compression"] == pytest.approx(5.4259 / 2.6473)

    failed = rows_of(frame, status="failed").iloc[0]
    assert (failed["role"], failed["alpha"], failed["seeds"], failed["n"]) == ("student_kd", 0.9, "3", 0)
    assert failed["error"] == "kd: error: student_kd: the loss became NaN or inf in epoch 2, step 7"
    unfinished = rows_of(frame, status="unfinished").iloc[0]
    assert (unfinished["alpha"], unfinished["seeds"]) == (0.5, "3") and "resume=true" in unfinished["error"]
    assert len(frame) == 6


def test_a_stopped_run_that_finished_elsewhere_counts_once_as_finished(sweep, tmp_path, capsys):
    """Job 7 (alpha 0.5, seed 3) was stopped, then run to the end in another folder (a new sweep of the same
    grid): its "unfinished" row would stay in every pooled report for good. Job 6 failed and was not rerun."""
    distill_run(tmp_path / "finished", 3, 0.5, 84.0, 81.0, 88.0)
    built = report.build_report(report.find_runs([sweep, tmp_path / "finished"]))
    assert set(built.frame["status"]) == {"ok", "failed"}
    assert rows_of(built.frame, role="student_kd", alpha=0.5)["seeds"].tolist() == ["0,1,2,3"]
    assert [run.path for run in built.problems] == [sweep / "6"]
    report.print_report(built, "t")
    assert (f"left out: {sweep / '7'} (student_kd, seed 3) is unfinished; {tmp_path / 'finished'} ran its configuration "
            f"and seed to the end, which the table uses") in capsys.readouterr().out


def test_printed_table_and_sentences(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    for text in ("86.00 ± 1.00", "80.00 ± 0.87", "81.17 ± 1.26", "81.50 ± 1.32", "83.50 ± 0.50",
                 "+1.17 [-0.73, +3.06]", "+3.50 [+2.26, +4.74]", "693,962", "2.05"):
        assert text in printed, text
    assert ("gain over scratch +1.17 points, 95% CI [-0.73, +3.06] (paired by seed, t(2), n=3): "
            "not distinguishable from zero") in printed
    assert "gain over scratch +3.50 points, 95% CI [+2.26, +4.74] (paired by seed, t(2), n=3): KD better" in printed
    assert f"failed {sweep / '6'}: kd: error: student_kd: the loss became NaN or inf in epoch 2, step 7" in printed
    assert f"unfinished {sweep / '7'}" in printed

    md = (sweep / "report.md").read_text()
    assert "| student_kd      | mnist_student | kd     | 0.5     | 4   | 3   | 0,1,2   | 81.17 ± 1.26 | 81.50 ± 1.32    | 693,962 " in md
    assert f"- failed {sweep / '6'}: kd: error: student_kd: the loss became NaN or inf in epoch 2, step 7" in md
    csv = pd.read_csv(sweep / "report.csv")
    assert set(csv["status"]) == {"ok", "failed", "unfinished"} and len(csv) == 6
    for name in ("report_pareto_size.png", "report_pareto_flops.png", "report_curves/0.png"):
        assert (sweep / name).stat().st_size > 1000, name
    assert not (sweep / "report_alpha_T.png").exists()  # T was not swept: no alpha x T grid to show


def test_filter_on_a_list_valued_setting(tmp_path):
    for number, (weights, teachers) in enumerate((([3, 1], ["conv4", "deepnn"]), ([1, 1], ["conv4", "deepnn"]))):
        cfg = config("distill", 0)
        cfg["scheme"] = {"name": "multi_teacher", "weights": weights, "teachers": teachers}
        write_run(tmp_path / str(number), cfg, [row("student_kd", "mnist_student", 0, 80.0 + number, loss="kd",
                                                     scheme="multi_teacher", alpha=0.5, T=4.0)])
    runs = report.find_runs([tmp_path])
    for typed in ("scheme.weights=[3,1]", "scheme.weights=[3.0, 1]"):
        assert report.build_report(runs, [typed]).frame["accuracy"].tolist() == [80.0], typed
    assert len(report.build_report(runs, ["scheme.teachers=[conv4,deepnn]"]).frame) == 2
    with pytest.raises(report.ReportError, match=r"the runs have scheme.weights \[1,1\], \[3,1\]"):
        report.build_report(runs, ["scheme.weights=[3,2]"])


def multi_teacher_run(folder, teachers, T, ensemble_accuracy):
    cfg = config("distill", 0, T=T)
    cfg["scheme"] = {"name": "multi_teacher", "teachers": teachers, "weights": None}
    members = [row(f"teacher_{i}", "mnist_teacher" if name == "a" else "deepnn", 0, 90.0 if name == "a" else 80.0,
                   checkpoint=f"store/{name}.pt") for i, name in enumerate(teachers, 1)]
    ensemble = row("teacher", "mnist_teacher", 0, ensemble_accuracy, checkpoint="+".join(m["checkpoint"] for m in members))
    write_run(folder, cfg, [*members, ensemble, row("student_kd", "mnist_student", 0, 70.0 + T, loss="kd",
                                                    scheme="multi_teacher", alpha=0.5, T=T)])


def test_multi_teacher_one_row_per_member_and_per_ensemble_T(tmp_path):
    multi_teacher_run(tmp_path / "1", ["a", "b"], 1.0, 85.0)
    multi_teacher_run(tmp_path / "2", ["a", "b"], 8.0, 84.0)
    multi_teacher_run(tmp_path / "3", ["b", "a"], 1.0, 85.0)  # the same members, listed the other way round
    built = report.build_report(report.find_runs([tmp_path]))
    frame = built.frame.set_index("role")
    assert sorted(frame.loc[["teacher_1", "teacher_2"], "accuracy"]) == [80.0, 90.0]
    ensembles = frame.loc["teacher"].set_index(["T", "scheme.teachers"])["accuracy"].to_dict()
    assert ensembles == {(1.0, "[a,b]"): 85.0, (8.0, "[a,b]"): 84.0, (1.0, "[b,a]"): 85.0}


def test_a_stored_model_replaced_in_the_store_counts_in_its_newest_version(tmp_path):
    """overwrite=true trained the scratch student again at the same store path: one table, one baseline."""
    import os

    distill_run(tmp_path / "a_old", 0, 0.5, 81.0, 78.0, 88.0)
    distill_run(tmp_path / "b_new", 0, 0.5, 81.0, 80.0, 88.0)
    os.utime(tmp_path / "a_old" / "results.json", (1, 1))
    built = report.build_report(report.find_runs([tmp_path]))
    scratch = rows_of(built.frame, role="student_scratch")
    assert scratch["accuracy"].tolist() == [80.0] and scratch["n"].tolist() == [1]
    assert {(r["role"], Path(r["run"]).name, Path(r["newer"]).name) for r in built.repeats} >= {
        ("student_scratch", "a_old", "b_new")}


def test_rows_are_not_labelled_with_settings_the_run_did_not_use(tmp_path):
    for teacher in ("deepnn", "mnist_teacher"):  # loss=ce: no teacher ran, whichever teacher= says
        cfg = config("distill", 0, teacher=teacher)
        cfg["loss"] = {"name": "ce"}
        write_run(tmp_path / f"ce_{teacher}", cfg, [row("student_scratch", "mnist_student", 0, 78.0, loss="ce"),
                                                     row("student_kd", "mnist_student", 0, 78.0, loss="ce", scheme="offline")])
    # born_again from scratch: generation 0 is the scratch student, trained with the run's own data.fraction
    cfg = config("distill", 0, fraction=0.05, teacher_recipe={"data": {"fraction": 0.1}})
    cfg["scheme"] = {"name": "born_again", "start": "scratch", "generations": 1}
    write_run(tmp_path / "born_again", cfg, [row("teacher", "mnist_student", 0, 77.0),
                                             row("student_kd", "mnist_student", 0, 79.0, loss="kd", scheme="born_again")])
    # ... and a failed loss=ce run of another teacher= that a finished run of its configuration and seed replaced
    cfg = config("distill", 0, teacher="deepnn")
    cfg["loss"] = {"name": "ce"}
    cfg["student"]["arch"] = "mnist_student"
    write_run(tmp_path / "ce_failed", cfg, error="kd: error: stopped")
    built = report.build_report(report.find_runs([tmp_path]))
    frame = built.frame
    ce = rows_of(frame, role="student_kd", loss="ce")
    assert len(ce) == 1 and "teacher" not in frame.columns and set(frame["status"]) == {"ok"}
    assert {"run": str(tmp_path / "ce_failed"), "status": "failed"}.items() <= built.repeats[-1].items()
    assert rows_of(frame, role="teacher")["data.fraction"].tolist() == [0.05]


def test_a_run_that_failed_after_earlier_results_is_failed_in_report_and_summary(tmp_path):
    """A success removes error.txt: one beside results.json is a later attempt that failed (another config
    refused in the folder), whose results.json is not its own."""
    import os

    from kd_cli import sweep

    folder = tmp_path / "0"
    write_run(folder, config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0)],
              error="kd_cli.errors.KdError: kd: error: 0 already holds the results of a different config")
    os.utime(folder / "results.json", (1, 1))
    assert report.load_run(folder).status == "failed"
    assert [r["status"] for r in sweep._job_rows(folder, {})] == ["failed"]
    (folder / "error.txt").unlink()
    assert report.load_run(folder).status == "ok"


def test_planned_jobs_that_a_rerun_sweep_finished_are_left_out_not_listed_as_not_started(tmp_path, capsys):
    """A sweep stopped after its first job, then run again into a new folder to the end."""
    plan = [["alpha=0.1", "seed=0"], ["alpha=0.5", "seed=0"], ["alpha=0.9", "seed=0"]]
    for name, ran in (("stopped", 1), ("rerun", 3)):
        folder = tmp_path / name
        for number, overrides in enumerate(plan[:ran]):
            alpha = float(overrides[0].split("=")[1])
            distill_run(folder / str(number), 0, alpha, 80.0 + alpha, 78.0, 86.0)
            (folder / str(number) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / "multirun.yaml").write_text("hydra: {overrides: {task: ['alpha=0.1,0.5,0.9', 'seed=0']}}\n")
        (folder / "planned.yaml").write_text(yaml.safe_dump(plan))
    partial = report.build_report(report.find_runs([tmp_path / "stopped"]))
    assert len(partial.not_started) == 2  # the rerun is not part of this report
    built = report.build_report(report.find_runs([tmp_path]))
    assert built.not_started == [] and report.runs_title(built) == "4 runs"
    report.print_report(built, "t")
    printed = capsys.readouterr().out
    assert (f"{tmp_path / 'stopped' / '2'} (teacher+student_scratch+student_kd, seed 0) is not started; "
            f"{tmp_path / 'rerun' / '2'} ran its configuration and seed to the end") in printed


def test_a_one_epoch_runs_curves_mark_whole_epochs(tmp_path, monkeypatch):
    from kd_cli import plots

    folder = tmp_path / "run"
    write_run(folder, config("train", 0), [row("teacher", "mnist_teacher", 0, 80.0)])
    results = json.loads((folder / "results.json").read_text())
    results["histories"] = {"teacher": history([80.0])}
    (folder / "results.json").write_text(json.dumps(results))
    shown, save = [], plots._save

    def save_and_read_ticks(fig, path):
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            shown.append([tick for tick in ax.get_xticks() if low <= tick <= high])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", save_and_read_ticks)
    assert len(plots._curves(report.build_report(report.find_runs([folder])), tmp_path)) == 1
    assert shown == [[1.0], [1.0]]  # loss and accuracy, each marked at epoch 1 only


def test_a_column_of_mixed_types_sorts_numbers_by_value_then_text(tmp_path):
    """`--sort train.amp` over train.amp=auto,false, and negative numbers beside text, in one column."""
    for job, amp in enumerate(("auto", False)):
        distill_run(tmp_path / str(job), 0, 0.5, 80.0 + job, 78.0, 85.0)
        results = tmp_path / str(job) / "results.json"
        payload = json.loads(results.read_text())
        payload["config"]["train"]["amp"] = amp
        results.write_text(json.dumps(payload))
    frame = report.build_report(report.find_runs([tmp_path]), sort="train.amp").frame
    # The stored teacher and scratch student are one model for both runs (train.amp changes no model).
    assert frame["train.amp"].tolist() == [False, "auto", "auto", "auto"]  # False is 0: a number
    column = pd.Series([-1.5, "x", None, -3.0, 2], dtype=object)
    assert column.sort_values(key=report._sort_key).tolist() == [None, -3.0, -1.5, 2, "x"]


@pytest.mark.parametrize("content", ["best_params:\n  alpha: 0.5\n best_value: [", "best_params: 0.5\n", "[1, 2]\n"])
def test_a_damaged_optuna_results_file_names_no_winner(tmp_path, content):
    """Hydra's Optuna sweeper writes optimization_results.yaml in place: a stopped sweep can leave it cut short."""
    (tmp_path / "multirun.yaml").write_text("hydra: {overrides: {task: ['alpha=0.5']}}\n")
    (tmp_path / "optimization_results.yaml").write_text(content)
    distill_run(tmp_path / "0", 0, 0.5, 80.0, 78.0, 85.0)
    result = report.build_report(report.find_runs([tmp_path]))
    assert result.optuna == [] and len(result.frame) == 3


def test_filter_sort_and_formats(sweep, capsys, tmp_path):
    assert report.main([str(sweep), "--no-plots", "--format", "csv"]) == 0  # the sweep's own report
    assert f"report: {sweep / 'report.md'} (.csv, .json), 0 plots" in capsys.readouterr().err
    kept = {name: (sweep / name).read_bytes() for name in ("report.md", "report.csv", "report.json")}
    assert report.main([str(sweep), "--filter", "alpha=0.5", "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"unfinished {sweep / '7'}" in captured.out  # alpha=0.5
    assert f"failed {sweep / '6'}" not in captured.out  # alpha=0.9: filtered out like its row
    # A filtered report is a view: the sweep's own report stays; --out writes the view's files.
    assert "filtered: no file written (--out DIR writes the report files there)" in captured.err
    assert {name: (sweep / name).read_bytes() for name in kept} == kept
    assert report.main([str(sweep), "--filter", "alpha=0.5", "--no-plots", "--out", str(tmp_path / "view")]) == 0
    assert f"failed {sweep / '6'}" not in (tmp_path / "view" / "report.md").read_text()
    assert f"report: {tmp_path / 'view' / 'report.md'} (.csv, .json), 0 plots" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert report.main([str(sweep), "--no-plots", "--out", str(tmp_path / "a_file")]) == 1
    assert "a_file is a file, not a folder; choose another location with --out DIR" in capsys.readouterr().err

    assert report.main([str(sweep), "--filter", "alpha=0.9", "--format", "csv", "--no-plots"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame["role"]) == ["student_kd", "student_kd"] and list(frame["status"]) == ["ok", "failed"]
    assert frame.loc[0, "gain"] == pytest.approx(3.5)  # the pairs come from each run's own scratch student

    assert report.main([str(sweep), "--filter", "seed=0", "--format", "json", "--no-plots"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["role"], r["n"], r["accuracy"]) for r in rows] == [
        ("teacher", 1, 85.0), ("student_scratch", 1, 79.0), ("student_kd", 1, 80.0), ("student_kd", 1, 83.0)]
    assert rows[2]["gain"] == pytest.approx(1.0) and rows[2]["gain_ci_low"] is None

    assert report.main([str(sweep), "--sort", "-accuracy", "--format", "json", "--no-plots"]) == 0  # as --sort=-accuracy
    spaced = json.loads(capsys.readouterr().out)["rows"]
    assert report.main([str(sweep), "--sort=-accuracy", "--format", "json", "--no-plots"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["accuracy"] for r in rows[:4]] == [pytest.approx(86.0), pytest.approx(83.5), pytest.approx(243.5 / 3),
                                                 pytest.approx(80.0)]
    assert spaced == rows

    assert report.main([str(sweep), "--format", "md", "--no-plots"]) == 0
    assert capsys.readouterr().out.startswith("# kd report")

    assert report.main([str(sweep), "--filter", "colour=red"]) == 1
    assert "--filter colour: no run has that key" in capsys.readouterr().err
    assert report.main([str(sweep), "--filter", "sed=0"]) == 1
    assert "--filter sed: no run has that key; did you mean seed?" in capsys.readouterr().err
    # Nothing kept is an error, and an earlier report is not replaced by an empty one.
    before = (sweep / "report.md").read_text()
    assert report.main([str(sweep), "--filter", "alpha=0.7", "--filter", "seed=1", "--no-plots"]) == 1
    assert capsys.readouterr().err.strip() == ("kd: error: no run matches --filter alpha=0.7 --filter seed=1 "
                                               "(the runs have alpha 0.5, 0.9; seed 0, 1, 2, 3); nothing written")
    assert report.main([str(sweep), "--filter", "seed=0", "--filter", "seed=1"]) == 1
    assert "(the runs have seed 0, 1, 2, 3); nothing written" in capsys.readouterr().err  # the key once
    assert (sweep / "report.md").read_text() == before
    assert report.main([str(sweep), "--sort", "nope"]) == 1
    for empty in ("", "accuracy,", "-"):
        assert report.main([str(sweep), f"--sort={empty}", "--no-plots"]) == 1
        assert f"--sort takes column names, comma-separated, a leading - for descending (e.g. --sort=-accuracy), got {empty!r}" in capsys.readouterr().err
    assert report.main([str(sweep / "missing")]) == 2


def test_unpaired_seeds_use_welch_and_store_lookup(tmp_path, capsys):
    """Scratch students from `kd train` runs; distilled runs without their own scratch row."""
    for seed, accuracy in {0: 79.0, 1: 80.5, 2: 80.5}.items():
        cfg = config("train", seed)
        rows = [row("teacher", "mnist_teacher", seed, 85.0 + seed, checkpoint=checkpoint(cfg, "teacher")),
                row("student_scratch", "mnist_student", seed, accuracy, loss="ce", checkpoint=checkpoint(cfg, "student"))]
        write_run(tmp_path / "train" / str(seed), cfg, rows)
    # alpha 0.5, seeds 0 and 1: paired through the store path with the train runs' students.
    distill_run(tmp_path / "distill" / "a", 0, 0.5, 81.0, None, 85.0, with_scratch=False)
    distill_run(tmp_path / "distill" / "b", 1, 0.5, 82.0, None, 86.0, with_scratch=False)
    # alpha 0.7, seeds 3 and 4: no scratch student of those seeds, so unpaired against seeds 0-2.
    distill_run(tmp_path / "distill" / "c", 3, 0.7, 82.0, None, 85.0, with_scratch=False)
    distill_run(tmp_path / "distill" / "d", 4, 0.7, 84.0, None, 85.0, with_scratch=False)

    assert report.main([str(tmp_path / "train"), str(tmp_path / "distill"), "--out", str(tmp_path / "rep"),
                        "--format", "json", "--no-plots"]) == 0
    frame = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    paired = rows_of(frame, role="student_kd", alpha=0.5).iloc[0]
    # differences 81 - 79 = 2, 82 - 80.5 = 1.5: mean 1.75, sd 0.353553, se 0.25, half 12.706205 * 0.25
    assert paired["gain"] == pytest.approx(1.75) and paired["gain_method"] == "paired by seed, t(1)"
    assert (paired["gain_ci_low"], paired["gain_ci_high"]) == (pytest.approx(1.75 - 3.176551, abs=1e-5),
                                                               pytest.approx(1.75 + 3.176551, abs=1e-5))
    welch = rows_of(frame, role="student_kd", alpha=0.7).iloc[0]
    # kd 82, 84 (var 2, n 2) vs scratch 79, 80.5, 80.5 (var 0.75, n 3): gain 3, se sqrt(2/2 + 0.75/3) = 1.118034,
    # Welch df 1.5625 / (1 + 0.03125) = 1.515 -> 1 (rounded down): half 12.706205 * 1.118034 = 14.205969
    assert welch["gain"] == pytest.approx(3.0) and welch["gain_method"] == "unpaired (Welch), df 1.5"
    assert (welch["gain_ci_low"], welch["gain_ci_high"]) == (pytest.approx(-11.205969, abs=1e-5),
                                                             pytest.approx(17.205969, abs=1e-5))
    assert rows_of(frame, role="student_scratch").iloc[0]["n"] == 3
    assert (tmp_path / "rep" / "report.csv").exists()


def test_scope_fraction_and_teacher_plots(tmp_path, capsys):
    """Teachers x data fractions: the scratch student's row does not split by teacher, the teacher's does."""
    accuracies = {("mnist_teacher", 0.5): 82.0, ("mnist_teacher", 1.0): 84.0, ("deepnn", 0.5): 81.0, ("deepnn", 1.0): 83.0}
    job = 0
    for (teacher, fraction), kd_acc in accuracies.items():
        for seed in (0, 1):
            distill_run(tmp_path / str(job), seed, 0.5, kd_acc + seed, 78.0 + 2 * fraction + seed, 86.0, teacher=teacher,
                        fraction=fraction)
            job += 1
    assert report.main([str(tmp_path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    frame = pd.DataFrame(out["rows"])
    assert out["keys"] == ["teacher", "data.fraction", "loss", "alpha", "T"]
    assert len(rows_of(frame, role="teacher")) == 4
    scratch = rows_of(frame, role="student_scratch")
    assert sorted(scratch["data.fraction"]) == [0.5, 1.0] and list(scratch["n"]) == [2, 2]
    assert scratch["teacher"].isna().all()
    kd = rows_of(frame, role="student_kd", teacher="deepnn")
    # kd 81, 82 vs scratch 79, 80 at fraction 0.5: differences 2, 2 -> gain 2 with zero spread
    assert rows_of(kd, **{"data.fraction": 0.5}).iloc[0]["gain"] == pytest.approx(2.0)
    for name in ("report_accuracy_vs_fraction.png", "report_student_accuracy_vs_teacher_size.png",
                 "report_pareto_size.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_a_key_empty_in_some_rows_still_splits_the_plots(tmp_path, monkeypatch):
    """An alpha x T grid with the store's teacher beside the same grid with a teacher.checkpoint file:
    two heatmaps, not one whose cells the second grid overwrites."""
    from kd_cli import plots

    grid = [{"role": "student_kd", "model": "lightnn", "teacher.checkpoint": checkpoint_file, "alpha": alpha, "T": T,
             "accuracy": base + i} for checkpoint_file, base in ((None, 80.0), ("/teachers/a.pt", 60.0))
            for i, (alpha, T) in enumerate(itertools.product((0.25, 0.75), (2.0, 4.0)))]
    drawn = []
    monkeypatch.setattr(plots, "heatmap", lambda part, *args, **kwargs: drawn.append(part["accuracy"].tolist()) or args[-1])
    plots._two_key_plots(pd.DataFrame(grid), ["teacher.checkpoint", "alpha", "T"], tmp_path)
    assert sorted(drawn) == [[60.0, 61.0, 62.0, 63.0], [80.0, 81.0, 82.0, 83.0]]


def test_through_the_kd_command(sweep):
    proc = subprocess.run([kd_executable(), "report", str(sweep), "--no-plots"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "+3.50 [+2.26, +4.74]" in proc.stdout and "report.md" in proc.stderr
    assert "report" in subprocess.run([kd_executable(), "--help"], capture_output=True, text=True).stdout


def test_a_reader_that_stops_early_gets_no_traceback(sweep):
    """`kd report --format csv | head -1`: the pipe closes before kd writes."""
    proc = subprocess.Popen([kd_executable(), "report", str(sweep), "--no-plots", "--format", "csv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_t_quantiles():
    assert report.t975(1) == 12.706205 and report.t975(2) == 4.302653 and report.t975(2.9) == 4.302653
    assert report.t975(30) == 2.042272
    assert report.t975(31) == pytest.approx(2.039513, abs=1e-6)
    assert report.t975(100) == pytest.approx(1.983972, abs=1e-6)
    with pytest.raises(ValueError):
        report.t975(0.5)
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 41), 60, 120, 1000):
        assert report.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-6)


def test_pareto_front():
    # (cost, accuracy): the 2-cost 79% point and the 3-cost 84% point are beaten by the 2-cost 85% one
    assert pareto_front([(1, 80), (2, 85), (3, 84), (2, 79), (4, 90)]) == [0, 1, 4]


def test_measurement_folders_of_deploy_commands_are_not_runs(tmp_path, capsys):
    """`kd report outputs` after `kd bench-model` / `kd quantize`: their results.json rows are models, not runs."""
    distill_run(tmp_path / "distill" / "a", 0, 0.5, 80.0, 78.0, 85.0)
    bench = tmp_path / "bench-model" / "light6"
    bench.mkdir(parents=True)
    (bench / "results.json").write_text(json.dumps(
        {"command": "bench-model", "model": "light6", "rows": [{"model": "light6", "precision": "fp32", "latency_ms": 1.0}]}))
    assert report.main([str(tmp_path), "--no-plots", "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert "light6" not in set(frame["model"]) and "mnist_student" in set(frame["model"])
    assert report.main([str(bench), "--no-plots"]) == 1
    assert f"kd: error: {bench} holds only kd bench-model measurements, which their own results.md shows; kd report " \
           f"reads the runs of kd train and kd distill" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--no-plots"]) == 1
    assert "no kd train or distill runs under" in capsys.readouterr().err



def test_teachers_from_different_files_are_not_pooled_as_seeds(tmp_path):
    """`kd distill -m teacher.checkpoint=a.pt,b.pt`: two teachers, one seed each, not one teacher with n=2."""
    for name, teacher_acc, kd_acc in (("short.pt", 80.0, 78.0), ("long.pt", 90.0, 82.0)):
        cfg = config("distill", 0)
        cfg["teacher"]["checkpoint"] = f"/teachers/{name}"
        rows = [row("teacher", "mnist_teacher", 0, teacher_acc, checkpoint=f"/teachers/{name}"),
                row("student_kd", "mnist_student", 0, kd_acc, loss="kd", scheme="offline", alpha=0.5, T=4.0,
                    checkpoint=str(tmp_path / name / "student.pt"))]
        write_run(tmp_path / name, cfg, rows, overrides=[f"teacher.checkpoint=/teachers/{name}"])
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert "teacher.checkpoint" in frame.columns
    assert len(frame) == 4 and set(frame["n"]) == {1}
    kd = rows_of(frame, role="student_kd", **{"teacher.checkpoint": "/teachers/long.pt"})
    assert kd["accuracy"].tolist() == [82.0]


@pytest.mark.parametrize("augment", [True, False])
def test_dataset_settings_split_configurations_as_the_model_store_keys_them(tmp_path, augment):
    """`dataset.crop_padding=2,4` with augmentation trains two models (two store keys): two rows, not one
    row with the other's runs left out as repeats. Without augmentation the crop is not read: one model."""
    for padding, accuracy in ((2, 80.0), (4, 84.0)):
        for seed in (0, 1):
            cfg = config("distill", seed)
            cfg["data"]["augment"] = augment
            cfg["dataset"] |= {"crop_padding": padding, "folder": f"elsewhere{padding}"}  # where files are: no matter
            rows = [row("student_kd", "mnist_student", seed, accuracy + seed, loss="kd", scheme="offline", alpha=0.5,
                        T=4.0, checkpoint=str(tmp_path / f"{padding}{seed}" / "student.pt"))]
            write_run(tmp_path / f"{padding}{seed}", cfg, rows, overrides=[f"dataset.crop_padding={padding}", f"seed={seed}"])
    result = report.build_report(report.find_runs([tmp_path]))
    if augment:
        assert result.frame["accuracy"].tolist() == [80.5, 84.5] and set(result.frame["n"]) == {2}
        assert result.frame["dataset.crop_padding"].tolist() == [2, 4] and not result.repeats
    else:  # one configuration: each seed's second run repeats it
        assert len(result.frame) == 1 and result.frame["n"].tolist() == [2] and len(result.repeats) == 2
        assert "dataset.crop_padding" not in result.frame


def test_the_gain_is_over_the_scratch_students_the_table_shows_not_replaced_ones(tmp_path):
    """Scratch students retrained with overwrite=true replace the old ones at the same store paths: the
    gains of students distilled without a scratch row of their own are over the new ones too."""
    def train(folder, seed, accuracy, age_s):
        cfg = config("train", seed)
        write_run(folder, cfg, [row("teacher", "mnist_teacher", seed, 85.0 + seed, checkpoint=checkpoint(cfg, "teacher")),
                                row("student_scratch", "mnist_student", seed, accuracy, loss="ce",
                                    checkpoint=checkpoint(cfg, "student"))])
        os.utime(folder / "results.json", (time.time() - age_s,) * 2)

    for seed in (0, 1):
        train(tmp_path / "train-multirun" / "s" / str(seed), seed, 70.0 + seed, age_s=300)  # replaced
        train(tmp_path / "train" / str(seed), seed, 80.0 + seed, age_s=100)
        distill_run(tmp_path / "distill" / str(seed), seed, 0.5, 82.0 + 1.5 * seed, None, 85.0 + seed, with_scratch=False)
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert rows_of(frame, role="student_scratch")["accuracy"].tolist() == [80.5]
    kd = rows_of(frame, role="student_kd").iloc[0]
    assert kd["gain"] == pytest.approx(2.25) and kd["gain_ci_low"] < 0 < kd["gain_ci_high"]


def test_a_stored_models_latency_is_the_median_of_every_runs_timing(tmp_path):
    """Every run that uses a stored teacher times it again; on a busy machine one timing can be 10x the others."""
    for job, (alpha, teacher_ms) in enumerate(((0.1, 118.6), (0.5, 14.6), (0.9, 10.6))):
        cfg = config("distill", 0, alpha=alpha)
        rows = [row("teacher", "mnist_teacher", 0, 85.0, checkpoint=checkpoint(cfg, "teacher"), latency_ms=teacher_ms),
                row("student_kd", "mnist_student", 0, 80.0 + job, loss="kd", scheme="offline", alpha=alpha, T=4.0,
                    checkpoint=str(tmp_path / str(job) / "student.pt"))]
        write_run(tmp_path / str(job), cfg, rows, overrides=[f"alpha={alpha}"])
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert rows_of(frame, role="teacher")["latency_ms"].tolist() == [14.6]
    assert rows_of(frame, role="student_kd")["latency_ms"].tolist() == [0.1] * 3


def test_a_rerun_of_one_seed_counts_once_the_newest(tmp_path, capsys):
    """The same distillation run twice (seed 0): one experiment, not two seeds with a zero-width interval."""
    import os

    for name, kd_acc in (("first", 81.0), ("again", 82.0)):
        distill_run(tmp_path / name, 0, 0.5, kd_acc, 80.0, 85.0)
    os.utime(tmp_path / "first" / "results.json", (1_000_000, 1_000_000))  # the older run
    built = report.build_report(report.find_runs([tmp_path]))
    kd = rows_of(built.frame, role="student_kd")
    assert kd["n"].tolist() == [1] and kd["accuracy"].tolist() == [82.0]
    assert kd["gain_method"].tolist() == ["one seed"] and kd["gain"].tolist() == [2.0]
    assert [(r["run"], r["newer"], r["seed"]) for r in built.repeats] == [(str(tmp_path / "first"), str(tmp_path / "again"), 0)]
    report.print_report(built, "t")
    assert f"left out: {tmp_path / 'first'} (student_kd, seed 0) repeats the configuration and seed of {tmp_path / 'again'}" in capsys.readouterr().out


def test_every_part_of_a_split_report_names_the_scheme_of_its_rows(tmp_path, capsys):
    """Rows of one student and loss, told apart by their scheme: each part of the printed table repeats it
    before keys of less weight (a combo's term, a scheme's option)."""
    schemes = {"offline": {}, "self": {"exits": ["features.3"]}, "born_again": {"generations": 2, "start": "scratch"},
               "online": {"peers": ["conv4"]}}
    for number, ((scheme, options), dkd) in enumerate(itertools.product(schemes.items(), (1.0, 2.0))):
        cfg = config("distill", 0)
        cfg["scheme"] = {"name": scheme, **options}
        cfg["loss"] = {"name": "combo", "terms": {"dkd": dkd, "kd": 1.0}, "student_layers": ["features.3"]}
        write_run(tmp_path / str(number), cfg, [row("student_kd", "mnist_student", 0, 80.0 + number, loss="combo",
                                                    scheme=scheme, alpha=0.5, T=4.0)])
    report.print_report(report.build_report(report.find_runs([tmp_path])), "t")
    printed = capsys.readouterr().out
    headers = [line for line in printed.splitlines() if line.startswith("┃") and "role" in line]
    assert "(part 2 of" in printed and len(headers) > 1
    assert all("scheme" in header.split("┃")[3] for header in headers), printed  # right after role and model


def test_a_swept_dataset_is_a_column_of_the_printed_table(tmp_path, capsys):
    for dataset, accuracy in (("fashion_mnist", 80.0), ("cifar10", 60.0)):
        cfg = config("distill", 0)
        cfg["dataset"]["name"] = dataset
        rows = [row("student_kd", "mnist_student", 0, accuracy, dataset=dataset, loss="kd", alpha=0.5, T=4.0)]
        write_run(tmp_path / dataset, cfg, rows, overrides=[f"dataset={dataset}"])
    report.print_report(report.build_report(report.find_runs([tmp_path])), "t")
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "role" in line)
    assert "dataset" in header and "cifar10" in table and "fashion_mnist" in table


def test_schemes_without_the_configured_teacher_do_not_show_it(tmp_path):
    """scheme=self has no teacher, and online with scheme.peers trains those peers: their rows must not
    name the config's default teacher=. Online without peers trains a peer of the teacher's architecture."""
    for folder, scheme, peers, accuracy in (("offline", "offline", None, 80.0), ("self", "self", None, 79.0),
                                            ("online", "online", None, 78.0), ("peers", "online", ["deepnn"], 77.0)):
        cfg = config("distill", 0)
        cfg["scheme"] = {"name": scheme, **({"peers": peers} if scheme == "online" else {})}
        rows = [row("student_kd", "mnist_student", 0, accuracy, loss="kd", scheme=scheme, alpha=0.5, T=4.0)]
        if scheme == "offline":  # the teacher that taught it, as kd distill reports it
            rows.insert(0, row("teacher", "mnist_teacher", 0, 85.0))
        write_run(tmp_path / folder, cfg, rows)
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert rows_of(frame, scheme="offline")["teacher"].tolist() == ["mnist_teacher"]
    assert rows_of(frame, scheme="self")["teacher"].isna().all()
    online = frame[frame["scheme"] == "online"].set_index("accuracy")["teacher"]
    assert online[78.0] == "mnist_teacher" and pd.isna(online[77.0])

def test_each_ensemble_is_a_row_and_each_stored_member_or_link_one(tmp_path):
    """A sweep over multi_teacher's weights makes two ensembles of the same stored members; a chain's
    assistant, trained once with fixed link settings, serves every job of an alpha sweep."""
    members = {"teacher_1": ("mnist_teacher", 85.0), "teacher_2": ("deepnn", 80.0)}
    for job, (weights, ensemble) in enumerate((([1, 0], 85.0), ([0, 1], 80.0))):
        cfg = config("distill", 0)
        cfg["scheme"] = {"name": "multi_teacher", "teachers": ["mnist_teacher", "deepnn"], "weights": weights,
                         "confidence": False}
        rows = [row(role, model, 0, accuracy, checkpoint=f"store/{model}.pt") for role, (model, accuracy) in members.items()]
        rows += [row("teacher", "mnist_teacher", 0, ensemble, checkpoint="store/mnist_teacher.pt+store/deepnn.pt"),
                 row("student_kd", "mnist_student", 0, 79.0 + job, loss="kd", scheme="multi_teacher", alpha=0.5, T=4.0)]
        write_run(tmp_path / "mt" / str(job), cfg, rows, overrides=[f"scheme.weights=[{weights[0]},{weights[1]}]"])
    for job, alpha in enumerate((0.3, 0.7)):
        cfg = config("distill", 0, alpha=alpha)
        cfg["scheme"] = {"name": "ta", "assistants": ["deepnn"], "link_alpha": 0.5, "link_T": 4.0}
        rows = [row("assistant_1", "deepnn", 0, 82.0, loss="kd", scheme="ta", alpha=0.5, T=4.0, checkpoint="store/ta.pt"),
                row("student_kd", "mnist_student", 0, 78.0 + job, loss="kd", scheme="ta", alpha=alpha, T=4.0)]
        write_run(tmp_path / "ta" / str(job), cfg, rows, overrides=[f"alpha={alpha}"])
    frame = report.build_report(report.find_runs([tmp_path])).frame
    ensembles = rows_of(frame, role="teacher", scheme="multi_teacher")
    assert sorted(zip(ensembles["scheme.weights"], ensembles["accuracy"])) == [("[0,1]", 80.0), ("[1,0]", 85.0)]  # as typed
    for role in ("teacher_1", "teacher_2", "assistant_1"):
        assert len(rows_of(frame, role=role)) == 1, role
    # The same stored deepnn as the teacher of an offline run: one model, one row.
    write_run(tmp_path / "offline", config("distill", 0, teacher="deepnn"),
              [row("teacher", "deepnn", 0, 80.0, checkpoint="store/deepnn.pt"),
               row("student_kd", "mnist_student", 0, 77.0, loss="kd", alpha=0.5, T=4.0)])
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert len(frame[(frame["model"] == "deepnn") & frame["role"].str.startswith("teacher")]) == 1


def test_csv_floats_are_written_without_binary_noise():
    from kd_cli.results import csv_text, markdown_table

    frame = pd.DataFrame({"gain": [-7.530000000000001, None], "params": [585130.0, None]})  # gaps make ints floats
    assert csv_text(frame) == "gain,params\n-7.53,585130\n,\n"
    assert "nan" not in markdown_table(frame)


def test_settings_that_cannot_change_a_result_do_not_split_seeds(tmp_path):
    """A preset's run (train_missing=true, teacher cache on) and a hand-typed one are two seeds of one experiment."""
    distill_run(tmp_path / "by_hand", 0, 0.5, 81.0, 80.0, 85.0)
    distill_run(tmp_path / "preset", 1, 0.5, 83.0, 80.5, 86.0)
    results = json.loads((tmp_path / "preset" / "results.json").read_text())
    results["config"] |= {"train_missing": True, "train": {**results["config"]["train"], "teacher_cache": "off", "threads": 1}}
    (tmp_path / "preset" / "results.json").write_text(json.dumps(results))
    (tmp_path / "preset" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(results["config"]))
    kd = rows_of(report.build_report(report.find_runs([tmp_path])).frame, role="student_kd")
    assert kd["n"].tolist() == [2] and kd["accuracy"].tolist() == [82.0]


def test_settings_a_run_did_not_read_do_not_split_seeds(tmp_path):
    """kd warned that train.momentum with Adam changes nothing: seeds with and without it are one experiment,
    told by what each run recorded or, for a run that recorded nothing (an older kd), worked out anew."""
    from kd_cli.bench.sides import compose_config
    from kd_cli.config import ignored_settings

    for seed, extra, recorded in ((0, [], True), (1, ["train.momentum=0.5"], True), (2, ["train.momentum=0.7"], False)):
        overrides = ["loss=kd", "alpha=0.5", "T=4", "train.optimizer=adam", f"seed={seed}", *extra]
        composed = compose_config("distill", overrides)
        cfg = OmegaConf.to_container(composed, resolve=True)
        write_run(tmp_path / str(seed), cfg, [row("student_kd", "mnist_student", seed, 80.0 + seed, loss="kd",
                                                  scheme="offline", alpha=0.5, T=4.0)],
                  overrides=overrides, unread=sorted(ignored_settings(composed)))  # as run.Run.finish records it
        if not recorded:
            results = json.loads((tmp_path / str(seed) / "results.json").read_text())
            del results["unread"]
            (tmp_path / str(seed) / "results.json").write_text(json.dumps(results))
    kd = rows_of(report.build_report(report.find_runs([tmp_path])).frame, role="student_kd")
    assert kd["n"].tolist() == [3] and kd["accuracy"].tolist() == [81.0]
    assert "train.momentum" not in kd.columns


def test_a_failed_run_leaves_empty_the_settings_its_loss_does_not_read(tmp_path):
    """As a finished run's row does (run.Run.distill_columns): loss=at reads no T, loss=kd at alpha 0 neither."""
    from kd_cli.bench.sides import compose_config

    for name, overrides in (("at", ["loss=at", "alpha=0.9", "T=4"]), ("kd_alpha0", ["loss=kd", "alpha=0", "T=4"]),
                            ("kd", ["loss=kd", "alpha=0.5", "T=4"])):
        cfg = OmegaConf.to_container(compose_config("distill", overrides), resolve=True)
        write_run(tmp_path / name, cfg, error="kd: error: stopped", overrides=overrides)
    frame = report.build_report(report.find_runs([tmp_path])).frame.set_index("run")
    settings = {Path(run).name: (row["loss"], row["alpha"], row["T"]) for run, row in frame.iterrows()}
    assert settings["at"][:2] == ("at", 0.9) and math.isnan(settings["at"][2])
    assert settings["kd_alpha0"][:2] == ("kd", 0.0) and math.isnan(settings["kd_alpha0"][2])
    assert settings["kd"] == ("kd", 0.5, 4.0)


def test_an_empty_alpha_or_T_is_not_filled_in_from_the_config(tmp_path):
    """loss=at reads no T, and its row leaves T empty: a report where T varies between runs must not
    show the T=4 of that run's config in its place."""
    for folder, loss, alpha, T, accuracy in (("at", "at", 0.9, 4.0, 80.0), ("kd", "kd", 0.5, 2.0, 81.0)):
        cfg = config("distill", 0, alpha=alpha, T=T)
        cfg["loss"]["name"] = loss
        rows = [row("student_kd", "mnist_student", 0, accuracy, loss=loss, scheme="offline", alpha=alpha,
                    T=T if loss == "kd" else None)]
        write_run(tmp_path / folder, cfg, rows)
    frame = report.build_report(report.find_runs([tmp_path])).frame.set_index("loss")
    assert "T" in frame and frame.loc["kd", "T"] == 2.0 and math.isnan(frame.loc["at", "T"])
    assert list(frame["alpha"]) == [0.9, 0.5]
    # Nor does an empty alpha or T make a column of its own: not in a report of `kd train` runs.
    train = tmp_path / "train"
    write_run(train, config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0), row("student_scratch", "mnist_student", 0, 80.0)])
    assert report.build_report(report.find_runs([train])).keys == []


def test_a_filter_that_fixes_alpha_keeps_the_columns_in_their_order(tmp_path):
    for alpha in (0.1, 0.9):
        for T in (1.0, 4.0):
            cfg = config("distill", 0, alpha=alpha, T=T, fraction=0.5 if T == 1.0 else 1.0)
            rows = [row("student_kd", "mnist_student", 0, 80.0 + alpha + T, loss="kd", alpha=alpha, T=T)]
            write_run(tmp_path / f"{alpha}-{T}", cfg, rows)
    runs = report.find_runs([tmp_path])
    assert report.build_report(runs).keys == ["data.fraction", "loss", "alpha", "T"]
    assert report.build_report(runs, ["alpha=0.9"]).keys == ["data.fraction", "loss", "alpha", "T"]
    assert report.build_report(runs, ["T=4"]).keys == ["loss", "alpha", "T"]


def test_sentences_write_values_as_they_are_typed_and_count_in_words():
    entry = {"scheme.teachers": ("deepnn", "light6"), "alpha": 0.5, "T": float("nan"), "loss": "kd"}
    assert report._describe_config(entry, ["scheme.teachers", "alpha", "T", "loss"]) == (
        "scheme.teachers=[deepnn,light6], alpha=0.5, loss=kd")
    assert report._count(1, "planned job") == "1 planned job" and report._count(2, "run") == "2 runs"


def test_a_heatmap_of_alpha_and_T_leaves_out_rows_without_a_T(tmp_path):
    """An alpha x T grid reported beside a loss that reads no T: the grid gets its heatmap, no crash."""
    for job, (loss, alpha, T) in enumerate([("kd", 0.25, 2.0), ("kd", 0.25, 4.0), ("kd", 0.75, 2.0), ("kd", 0.75, 4.0),
                                            ("at", 0.25, None)]):
        cfg = config("distill", 0, alpha=alpha, T=T or 4.0)
        cfg["loss"]["name"] = loss
        write_run(tmp_path / str(job), cfg, [row("student_kd", "mnist_student", 0, 80.0 + job, loss=loss, alpha=alpha, T=T)])
    written = report.write_report(report.build_report(report.find_runs([tmp_path])), tmp_path, [tmp_path])
    assert (tmp_path / "report_alpha_T.png") in written


def test_a_teacher_trained_with_teacher_recipe_is_reported_at_its_own_recipe(tmp_path):
    """Distilled on 5% of the data from a teacher that saw 10% (teacher_recipe): that teacher is not
    the 5% teacher of another run with the same seed, and its row says 10%."""
    distill_run(tmp_path / "plain", 0, 0.5, 80.0, 78.0, 85.0, fraction=0.05)
    cfg = config("distill", 0, fraction=0.05, teacher_recipe={"data": {"fraction": 0.1}})
    rows = [row("teacher", "mnist_teacher", 0, 88.0, checkpoint="store/teacher-10pc.pt"),
            row("student_kd", "mnist_student", 0, 81.0, loss="kd", scheme="offline", alpha=0.5, T=4.0)]
    write_run(tmp_path / "recipe", cfg, rows)
    built = report.build_report(report.find_runs([tmp_path]))
    teachers = rows_of(built.frame, role="teacher").set_index("data.fraction")
    assert teachers["accuracy"].to_dict() == {0.05: 85.0, 0.1: 88.0} and list(teachers["n"]) == [1, 1]
    assert built.repeats == []


def test_kd_report_does_not_import_torch(tmp_path):
    """Importing torch costs about 2 s: `kd report` and its --help read and write tables, no tensors."""
    import sys

    write_run(tmp_path / "run", config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0)])
    code = "import sys; from kd_cli.report import main; main(sys.argv[1:]); print('torch' in sys.modules, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--no-plots"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1] == "False", proc.stderr


@pytest.mark.parametrize("change, reason", [
    (lambda payload: [], "[] is not a JSON object"),
    (lambda payload: None, "null is not a JSON object"),
    (lambda payload: payload | {"rows": "x"}, "'rows' is not a list of rows, each with a role"),
    (lambda payload: {}, "'rows' is not a list of rows, each with a role"),
    (lambda payload: payload | {"rows": [{"accuracy": 80.0}]}, "'rows' is not a list of rows, each with a role"),
    (lambda payload: payload | {"rows": [payload["rows"][0] | {"accuracy": "59.4%"}]}, "teacher's accuracy is '59.4%', not a number"),
    (lambda payload: payload | {"histories": "x"}, "'histories' is not an object"),
])
def test_a_results_file_edited_into_another_shape_is_a_failed_run_not_a_traceback(tmp_path, change, reason):
    write_run(tmp_path / "run", config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0)])
    results = tmp_path / "run" / "results.json"
    results.write_text(json.dumps(change(json.loads(results.read_text()))))
    (run,) = report.find_runs([tmp_path])
    assert (run.status, run.error) == ("failed", f"results.json is unreadable ({reason})")
    report.build_report([run])


def test_a_filter_reads_numbers_as_python_does(tmp_path):
    write_run(tmp_path / "run", config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0)])
    runs = report.find_runs([tmp_path])
    for typed in ("train.lr=1e-3", "train.lr=1.0e-3", "train.lr=0.001"):  # YAML 1.1 reads 1e-3 as a string
        assert len(report.build_report(runs, [typed]).frame) == 1, typed


def test_the_single_seed_hint_fits_how_the_runs_were_made(tmp_path):
    for folder in ("distill-multirun/s/0", "experiments/quick_mnist/2026-11-24_10-00-00/part1/0"):
        distill_run(tmp_path / folder, 0, 0.5, 80.0, 78.0, 85.0)
        (line,) = report.gain_sentences(report.build_report(report.find_runs([tmp_path / folder])))
        more = ("run the experiment again with seed=1, and `kd report outputs/experiments/quick_mnist` pools its folders"
                if "experiments" in folder else "-m seed=0,1,2")
        assert line.endswith(f"from a single seed; run more seeds for a confidence interval ({more})"), line


def test_status_error_and_run_are_always_the_last_columns(sweep, tmp_path):
    write_run(tmp_path / "ok", config("train", 0), [row("teacher", "mnist_teacher", 0, 85.0)])
    for runs, filters in ((report.find_runs([sweep]), []), (report.find_runs([sweep]), ["role=student_kd"]),
                          (report.find_runs([tmp_path / "ok"]), [])):  # the last: no run failed
        assert list(report.build_report(runs, filters).frame.columns[-3:]) == ["status", "error", "run"], filters


def test_pareto_plot_of_runs_with_long_labels_warns_nothing(tmp_path):
    """A report mixing sweeps labels a Pareto point with every key it varies; matplotlib must not complain."""
    import warnings

    from kd_cli.plots import _pareto_plots

    keys = [f"train.some_long_setting_{i}" for i in range(8)]
    frame = pd.DataFrame([{"role": role, "model": "lightnn", "size_mb": size, "flops": 1e6 * size, "accuracy": acc,
                           **{k: 0.0005 for k in keys}} for role, size, acc in
                          (("student_scratch", 0.8, 86.0), ("student_kd", 0.8, 85.0), ("teacher", 3.6, 82.0))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = _pareto_plots(frame, keys, tmp_path)
    assert [p.name for p in paths] == ["report_pareto_size.png", "report_pareto_flops.png"]


def test_rows_come_in_the_order_a_chain_runs(tmp_path):
    """Teachers, the models in the middle by their number, the scratch baseline, what trained beside the
    distilled student, then the distilled student: not every numbered role after student_kd."""
    cfg = config("distill", 0)
    cfg["scheme"] = {"name": "ta", "assistants": ["conv8"] * 10, "link_alpha": 0.5, "link_T": 4.0}
    roles = ["student_kd", "assistant_10", "student_scratch", "assistant_2", "teacher", "assistant_1"]
    write_run(tmp_path / "ta", cfg, [row(role, "mnist_student", 0, 80.0 + number, checkpoint=f"store/{role}.pt")
                                     for number, role in enumerate(roles)])
    cfg = config("distill", 0)
    cfg["scheme"] = {"name": "online", "peers": ["conv4", "conv6"]}
    write_run(tmp_path / "online", cfg, [row(role, "mnist_student", 0, 70.0) for role in ("peer_2", "student_kd", "peer_1")])
    frame = report.build_report(report.find_runs([tmp_path])).frame
    assert frame["role"].tolist() == ["teacher", "assistant_1", "assistant_2", "assistant_10", "student_scratch",
                                      "peer_1", "peer_2", "student_kd", "student_kd"]
