"""Every method end to end through the installed `kd`, by running the methods-table command of
docs/methods.md itself on a tiny Fashion-MNIST recipe (one seed, one epoch, 300 images).

One module-scoped run trains the teacher once and distils every method in one multirun process;
the per-method tests then read that method's job.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import kd_executable
from kd_cli.losses import LOSSES, build_loss
from kd_cli.models import ImageSpec, build_model

pytestmark = pytest.mark.usefixtures("fashion_mnist")

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "methods.md").read_text()
COMMAND = re.search(r"```bash\n# the methods table\n(.*?)```", DOC, re.S).group(1)
TINY_RECIPE = ("dataset=fashion_mnist teacher=deepnn student=lightnn data.fraction=0.005 data.test_fraction=0.01 "
               "train.epochs=1 train.optimizer=adam train.lr=1e-3 train.weight_decay=0 "
               "measure.latency_runs=2 measure.latency_warmup=1")
TRAIN_IMAGES = 300  # 0.5% of Fashion-MNIST's 60,000, stratified
LIGHTNN_PARAMS = 206_010
DOC_METHODS = re.search(r"loss=(ce,[a-z_,]+)", COMMAND).group(1).split(",")


def kd_env() -> dict:
    path = f"{Path(kd_executable()).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "CI": "1", "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory):
    """The documented command with the tiny recipe and one seed; returns (folder, printed table)."""
    script = re.sub(r'^RECIPE=".*"$', f'RECIPE="{TINY_RECIPE}"', COMMAND, flags=re.M).replace("seed=0,1,2", "seed=0")
    assert script != COMMAND and "seed=0,1,2" not in script
    cwd = tmp_path_factory.mktemp("methods")
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=kd_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"the methods command failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return cwd, proc.stdout


def job_of(cwd: Path, method: str) -> Path:
    sweep = cwd / "outputs" / "methods" / ("combo" if method == "combo" else "main")
    summary = pd.read_csv(sweep / "summary.csv")
    row = summary[summary["loss"] == method]
    assert len(row) == 1, summary[["job", "loss", "status"]]
    assert row["status"].item() == "ok", row.get("error")
    return sweep / str(row["job"].item())


def expected_helper_params(method: str) -> int:
    spec = ImageSpec(1, 28, 10)
    options = yaml.safe_load((REPO / "conf" / "loss" / f"{method}.yaml").read_text())
    if method == "combo":
        options["terms"] = {"kd": 1.0, "at": 1000}
    loss = build_loss(OmegaConf.create({"loss": options, "alpha": 0.5, "T": 4.0}))
    student = build_model(OmegaConf.create({"arch": "lightnn"}), spec)
    teacher = build_model(OmegaConf.create({"arch": "deepnn"}), spec)
    loss.attach(student, teacher, torch.zeros(2, 1, 28, 28), TRAIN_IMAGES)
    return sum(p.numel() for p in loss.parameters())


def test_the_documented_command_covers_every_method():
    assert sorted(DOC_METHODS) == sorted(n for n in LOSSES if n != "combo")
    assert "loss=combo" in COMMAND


@pytest.mark.parametrize("method", [m for m in DOC_METHODS if m != "kd"] + ["combo"])
def test_distill_with_each_method(methods_run, method):
    cwd, _ = methods_run
    job = job_of(cwd, method)
    table = pd.read_csv(job / "results.csv").set_index("role")
    row = table.loc["student_kd"]
    assert row["loss"] == method
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    reads = build_loss(cfg).uses  # alpha and T are shown only where the method reads them
    assert row["alpha"] == 0.5 if "alpha" in reads else pd.isna(row["alpha"])
    assert row["T"] == cfg.T if "T" in reads else pd.isna(row["T"])
    assert ("alpha" in reads) == (method != "ce")
    # Helpers train with the student but are not part of it.
    assert row["params"] == LIGHTNN_PARAMS and row["size_mb"] == table.loc["student_scratch", "size_mb"]
    assert row["flops"] == table.loc["student_scratch", "flops"]
    assert row["helper_params"] == expected_helper_params(method)
    assert 0 < row["accuracy"] <= 100
    history = json.loads((job / "results.json").read_text())["histories"]["student_kd"]
    assert all(torch.isfinite(torch.tensor(epoch["loss"])) for epoch in history)
    checkpoint = torch.load(job / "student.pt", weights_only=True)
    helper_keys = set(checkpoint["helpers"])
    assert bool(helper_keys) == (row["helper_params"] > 0 or method == "crd")
    log_text = (job / "distill.log").read_text()
    # tf_kd's virtual teacher needs no teacher network: the teacher never runs, so nothing is cached.
    assert ("teacher cache" in log_text) == (method not in ("tf_kd", "ce"))
    assert ("teacher" in table.index) == (method not in ("tf_kd", "ce"))  # nor is it loaded for the table


def test_crd_logs_and_checkpoints_its_memory(methods_run):
    job = job_of(methods_run[0], "crd")
    assert f"crd: memory banks of 2 x {TRAIN_IMAGES} x 128 floats" in (job / "distill.log").read_text()
    helpers = torch.load(job / "student.pt", weights_only=True)["helpers"]
    assert helpers["memory_student"].shape == (TRAIN_IMAGES, 128) and (helpers["normalizers"] > 0).all()


def test_the_documented_summary_lists_every_method(methods_run):
    _, printed = methods_run
    for method in DOC_METHODS:
        assert re.search(rf"^\| {method}\s+\|\s+1 \|", printed, re.M), method
    assert re.search(r"^\| combo \{kd:1.0,at:1000\}\s+\|\s+1 \|", printed, re.M)
    assert "failed:" not in printed


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, message", [
    (["loss=feature_mse", "loss.student_layers=[features.2]", "loss.teacher_layers=[features.9]"],
     "kd: error: loss=feature_mse: student layer 'features.2' and teacher layer 'features.9' have 14x14 and 7x7 maps"),
    (["loss=at", "loss.student_layers=[features.7,features.5]"],
     "kd: error: the student has no layer 'features.7'; valid paths (add ':in' for a layer's input): features, features.0"),
])
def test_a_bad_pairing_stops_before_training_with_one_line(methods_run, overrides, message):
    cwd, _ = methods_run
    recipe = TINY_RECIPE.split()
    proc = subprocess.run([kd_executable(), "distill", *recipe, "alpha=0.5", *overrides], cwd=cwd, env=kd_env(),
                          capture_output=True, text=True)
    assert one_line_error(proc).startswith(message)
