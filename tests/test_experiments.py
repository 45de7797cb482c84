"""Seed experiments as presets: every preset composes and checks; the quick ones run end to end."""

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_cli.cli import config_dir
from kd_cli.config import register_model_groups
from kd_cli.errors import KdError
from kd_cli.experiments import published_table
from kd_cli.preflight import preflight

PRESETS = sorted(p.stem for p in Path(config_dir(), "experiment").glob("*.yaml") if p.stem != "demo")
QUICK = [name for name in PRESETS if name.startswith("quick_")]
FULL = [name for name in PRESETS if not name.startswith("quick_")]
# The longest quick runs (3-4 min each on 2 cores) run in `make test-all`: the teacher-assistant chain and the
# MNIST models have end-to-end tests of their own in the default run.
LONGEST = ("quick_teacher_assistant", "quick_mnist")


@pytest.fixture(autouse=True)
def model_groups():
    """student=mnist_student and the like: the CLI registers the model catalogue as config groups before composing."""
    register_model_groups()


def test_every_seed_experiment_has_a_quick_variant():
    assert sorted(FULL) == ["alpha_t_grid", "data_fraction", "distilled_teacher", "mnist", "teacher_assistant",
                            "teacher_free", "tutorial"]
    assert sorted(QUICK) == sorted(f"quick_{name}" for name in FULL)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_every_part_passes_preflight(name, capsys, datasets_looked_for):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("distill", [f"experiment={name}"])
    preset = cfg.preset
    assert preset.name == name and preset.source and preset.runs and preset.published
    assert cfg.train_missing is True
    for part in preset.runs:
        preflight("distill", [f"experiment={name}", *part.split(), "-m"], config_dir())  # raises on any bad combination
    assert datasets_looked_for == {cfg.dataset.name}
    assert "warning" not in capsys.readouterr().err  # no preset sweeps a value its loss ignores
    for entry in preset.published:
        assert entry.label and "match" in entry and "role" in entry.match


def test_full_preset_prints_its_plan(kd):
    plan = kd("distill", "experiment=teacher_assistant", "--cfg", "job").stdout
    assert "scheme=ta scheme.assistants=[conv4],[conv6],[conv8]" in plan
    assert "label: TA size 6" in plan and "value: 72.5" in plan
    assert not (kd.cwd / "outputs").exists()  # --cfg runs nothing


def test_an_override_of_what_the_preset_sweeps_is_refused(kd):
    proc = kd("distill", "experiment=quick_data_fraction", "data.fraction=0.05", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("kd: error: experiment=quick_data_fraction sets data.fraction itself (data.fraction=0.01,0.03,0.1); "
                                   "drop data.fraction=0.05 from the command line, or run the sweep you want with `kd distill -m ...`")
    assert not (kd.cwd / "outputs").exists()


def test_a_preset_with_its_own_sweeps_under_m_is_refused(kd):
    """Hydra would run one plain job per value, silently without the preset's parts and table."""
    proc = kd("distill", "-m", "experiment=quick_tutorial", "seed=0,1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("kd: error: experiment=quick_tutorial runs its own sweeps: drop -m (and any list of "
                                   "values); to repeat it with another seed, run `kd distill experiment=quick_tutorial seed=1`")
    assert not (kd.cwd / "outputs").exists()


@pytest.mark.parametrize("flag", ["-m", "--multirun", "--multi"])  # argparse reads a prefix of --multirun as it
def test_every_spelling_of_m_is_refused_with_a_preset(flag):
    from kd_cli.experiments import preset_of

    with pytest.raises(KdError, match="runs its own sweeps: drop -m"):
        preset_of(["experiment=quick_tutorial", flag, "seed=0,1"], OmegaConf.create({"preset": {"runs": [{}]}}))


def record(role, accuracy, **config):
    return {"role": role, "accuracy": accuracy, "status": "ok", "_config": config, **{k: v for k, v in config.items() if "." not in k}}


def test_published_table_means_and_best_configuration():
    records = [
        record("teacher", 90.0), record("student_scratch", 80.0),
        record("student_kd", 81.0, alpha=0.5, T=4.0, seed=0), record("student_kd", 83.0, alpha=0.5, T=4.0, seed=1),
        record("student_kd", 84.0, alpha=0.9, T=4.0, seed=0), record("student_kd", 81.0, alpha=0.9, T=4.0, seed=1),
        {"role": "student_kd", "status": "failed", "_config": {}},
    ]
    table = published_table(records, [
        {"label": "teacher", "value": 91.0, "match": {"role": "teacher"}},
        {"label": "KD at alpha 0.5", "value": 82.5, "match": {"role": "student_kd", "alpha": 0.5}},
        {"label": "best KD", "value": None, "pick": "max", "match": {"role": "student_kd"}},
        {"label": "never run", "value": 70.0, "match": {"role": "student_kd", "alpha": 0.1}},
    ]).set_index("result")
    assert table.loc["teacher", ["published", "measured", "difference", "n"]].tolist() == [91.0, 90.0, -1.0, 1]
    assert table.loc["KD at alpha 0.5", ["measured", "difference", "n"]].tolist() == [82.0, -0.5, 2]
    assert table.loc["best KD", "measured"] == 82.5 and table.loc["best KD", "best_at"] == "alpha=0.9"
    assert pd.isna(table.loc["never run", "measured"]) and table.loc["never run", "n"] == 0


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One model store for all quick presets, as a user's would be: teachers are shared where recipes agree."""
    return tmp_path_factory.mktemp("store")


# The longest presets on less data (77-143 s each on a 2-core Intel Xeon, most of it teachers):
# every part still runs and every published figure still finds its rows. quick_tutorial and
# quick_data_fraction keep sharing one teacher (the store has it for whichever runs second).
SMALLER = {name: ["data.fraction=0.02", "data.test_fraction=0.1"] for name in ("quick_alpha_t_grid", "quick_teacher_assistant")}
SMALLER |= {"quick_tutorial": ["data.fraction=0.05"], "quick_data_fraction": ["teacher_recipe.data.fraction=0.05"]}


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LONGEST else n for n in QUICK])
def test_quick_preset_runs_end_to_end(kd, shared_store, name):
    extra = SMALLER.get(name, [])
    proc = kd("distill", f"experiment={name}", f"store_dir={shared_store}", *extra)
    (folder,) = (kd.cwd / "outputs" / "experiments" / name).iterdir()
    table = pd.read_csv(folder / "experiment.csv")
    assert {"result", "published", "measured"} <= set(table.columns)
    assert table["measured"].notna().all(), table  # every published figure found its rows
    assert table["measured"].between(10, 100).all()
    assert (folder / "experiment.png").stat().st_size > 1000 and (folder / "report.md").is_file()
    summary = json.loads((folder / "experiment.json").read_text())
    assert summary["name"] == name and len(summary["table"]) == len(table)
    command = " ".join(["kd distill", f"experiment={name}", f"store_dir={shared_store}", *extra])
    assert f"Command: `{command}`" in (folder / "experiment.md").read_text()
    assert "published" in proc.stdout and "measured" in proc.stdout


def test_a_resumed_experiment_keeps_the_command_line_it_continues(tmp_path, monkeypatch):
    from kd_cli import experiments

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiments, "_run_part", lambda command: 0)  # every job already finished
    monkeypatch.setattr(experiments, "write_experiment", lambda folder, preset: None)
    preset = preflight("distill", ["experiment=quick_mnist", "seed=1"], config_dir()).preset
    earlier = experiments.ROOT / "quick_mnist" / "2026-01-01_00-00-00"
    earlier.mkdir(parents=True)
    started = json.dumps({"name": "quick_mnist", "args": ["experiment=quick_mnist", "seed=1"], "runs": list(preset.runs)})
    (earlier / "experiment.json").write_text(started)
    assert experiments.run_experiment(["seed=1", "experiment=quick_mnist", "resume=true"], preset, config_dir()) == 0
    assert (earlier / "experiment.json").read_text() == started


def test_hydra_sweep_dir_places_the_experiment(tmp_path, monkeypatch):
    from kd_cli import experiments

    monkeypatch.chdir(tmp_path)
    commands = []
    monkeypatch.setattr(experiments, "_run_part", lambda command: commands.append(command) or 0)
    monkeypatch.setattr(experiments, "write_experiment", lambda folder, preset: None)
    args = ["experiment=quick_mnist", f"hydra.sweep.dir={tmp_path / 'mine'}"]
    preset = preflight("distill", args, config_dir()).preset
    assert experiments.run_experiment(args, preset, config_dir()) == 0
    assert json.loads((tmp_path / "mine" / "experiment.json").read_text())["args"] == args
    assert [c for c in commands[0] if c.startswith("hydra.sweep.dir=")] == [f"hydra.sweep.dir={tmp_path / 'mine' / 'part1'}"]
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(KdError, match="use hydra.sweep.dir=PATH for the experiment's folder"):
        experiments.run_experiment(["experiment=quick_mnist", "hydra.run.dir=x"], preset, config_dir())


def test_a_run_that_swaps_the_documents_models_says_so_beside_the_table(tmp_path, capsys):
    from test_report import config, row, write_run

    from kd_cli.experiments import write_experiment

    args = ["experiment=mnist", "teacher=deepnn", "dataset=fashion_mnist"]
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "mnist", "args": args, "runs": []}))
    write_run(tmp_path / "part1" / "0", config("distill", 0), [row("teacher", "deepnn", 0, 85.0)])
    preset = preflight("distill", ["experiment=mnist"], config_dir()).preset
    write_experiment(tmp_path, preset)
    said = "This run sets teacher=deepnn dataset=fashion_mnist: the published figures, and the labels of their rows"
    assert said in capsys.readouterr().out and said in (tmp_path / "experiment.md").read_text()
    assert said in json.loads((tmp_path / "experiment.json").read_text())["note"]


def test_resume_finds_the_experiment_of_the_same_line_in_any_order(tmp_path, monkeypatch, capsys):
    from kd_cli import experiments

    monkeypatch.chdir(tmp_path)
    earlier = experiments.ROOT / "quick_mnist" / "2026-01-01_00-00-00"
    earlier.mkdir(parents=True)
    (earlier / "experiment.json").write_text(json.dumps({"args": ["experiment=quick_mnist", "seed=1", "seed=2"]}))
    assert experiments._folder("quick_mnist", ["seed=2", "experiment=quick_mnist", "resume=true"]) == earlier
    assert experiments._folder("quick_mnist", ["seed=2", "seed=1", "experiment=quick_mnist", "resume=true"]) != earlier
    assert "no earlier run of this experiment line" in capsys.readouterr().err


def test_the_published_vs_measured_figure_labels_bars_as_the_table_gives_them(tmp_path, monkeypatch):
    """87.25 beside a published 87.25, not 87.2: the figure is read against the document's numbers."""
    from matplotlib.axes import Axes

    from kd_cli import plots

    labels, annotate = [], Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *args, **kw: labels.append(text) or annotate(self, text, *args, **kw))
    table = pd.DataFrame({"result": ["scratch", "KD"], "published": [87.25, None], "measured": [70.4, 89.0]})
    plots.published_vs_measured(table, "t", tmp_path / "experiment.png")
    assert labels == ["87.25", "70.4", "89"]


def test_an_experiment_without_its_dataset_stops_before_making_its_folder(kd):
    """Each retry would otherwise add an experiment folder of failed jobs, and suggest resume=true."""
    proc = kd("distill", "experiment=tutorial", "data.download=false", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("kd: error: cifar10 not found in data/cifar-10-batches-py; set data.root=DIR to a "
                                   "folder that has 'cifar-10-batches-py', or data.download=true with internet access")
    assert not (kd.cwd / "outputs").exists() and not (kd.cwd / "data").exists()
