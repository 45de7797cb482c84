"""`make bench` end to end on a few images: both sides run in their own processes and bench.csv holds what the table says.

Speed itself is never asserted here (a shared CI machine cannot time anything); the figures are
checked for consistency only.
"""

import subprocess
import sys

import pandas as pd
import pytest

from kd_cli.bench.__main__ import CSV_COLUMNS
from kd_cli.bench.cifar10_files import write_fake_cifar10
from kd_cli.bench.sides import CASES, KdSide, SideProcess


def test_bench_writes_a_consistent_csv(tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, "-m", "kd_cli.bench", "--cases", "1", "--rounds", "2", "--images", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out)
    assert list(table.columns) == CSV_COLUMNS
    row = table.iloc[0]
    assert row["case"] == CASES["1"].name and row["device"].startswith("cpu")
    assert row["kd_img_per_s"] > 0 and row["plain_img_per_s"] > 0
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert 0 < row["kd_flops_per_s"] and 0 < row["peak_matmul_flops_per_s"]
    # Each round's line in the log, then the table; the warm-up logs kd's decisions once.
    assert proc.stderr.count("case 1 round") == 2
    assert proc.stderr.count("teacher cache: on") == 1
    assert "kd / plain" in proc.stdout and f"written: {out}" in proc.stdout


def test_a_side_that_fails_reports_its_error(tmp_path):
    root = write_fake_cifar10(tmp_path, 16)
    broken = CASES["1"].__class__(**{**vars(CASES["1"]), "student": "no_such_model"})
    with pytest.raises(RuntimeError, match="KdSide .* failed:(.|\n)*no_such_model"):
        SideProcess(KdSide, broken, root, "cpu")


def test_every_round_computes_its_own_teacher_cache(tmp_path, monkeypatch):
    """A sweep's next fit may take the previous fit's teacher outputs; a bench round, like one tutorial run, may not."""
    from kd_cli.engine import Teacher

    passes = []
    forward = Teacher._forward
    monkeypatch.setattr(Teacher, "_forward", lambda self, x: passes.append(len(x)) or forward(self, x))
    side = KdSide(CASES["1"], write_fake_cifar10(tmp_path, 300), "cpu")
    for _ in range(2):
        passes.clear()
        side.round()
        assert passes == [128, 128, 44]
