"""kd export / quantize / bench-model, measure.int8 and quant=qat, on a distilled Fashion-MNIST student."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import FASHION, TINY, kd_executable
from kd_cli.data import read_idx, stratified_subset
from kd_cli.deploy.quantize import quantize
from kd_cli.errors import KdError
from kd_cli.measure import count_flops, count_params, latency_stats, model_costs, size_mb
from kd_cli.models import ImageSpec, build_model
from kd_cli.store import load_checkpoint

pytestmark = [pytest.mark.usefixtures("fashion_mnist"),
              pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")]
ONE_EPOCH = [*TINY, "train.epochs=1"]
FASHION_SPEC = ImageSpec(channels=1, size=28, num_classes=10)


def run_kd(cwd: Path, *args, check=True):
    env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([kd_executable(), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"kd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kd: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, fashion_mnist):
    """A teacher and scratch student (trained with measure.int8=true), then a KD student: its run folder."""
    cwd = tmp_path_factory.mktemp("deploy")
    run_kd(cwd, "train", *ONE_EPOCH, "measure.int8=true")
    run_kd(cwd, "distill", *ONE_EPOCH)
    (run_dir,) = (cwd / "outputs" / "distill").iterdir()
    return run_dir


def fashion_test_images(n: int) -> torch.Tensor:
    """The first `n` Fashion-MNIST test images, read straight from the files (not through kd), uint8 N x 1 x 28 x 28."""
    return torch.from_numpy(read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n].copy())[:, None]


def load_student(path: Path) -> nn.Module:
    payload = load_checkpoint(path)
    model = build_model(OmegaConf.create(payload["meta"]["model_cfg"]), FASHION_SPEC)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def test_export_round_trip(distilled):
    import onnxruntime

    proc = run_kd(distilled.parent, "export", f"run={distilled}")
    out = distilled / "export"
    info = json.loads((out / "mnist_student.json").read_text())
    assert f"wrote {out / 'mnist_student.onnx'}" in proc.stdout
    assert info["input"]["shape"] == ["batch", 1, 28, 28] and info["output"]["shape"] == ["batch", 10]
    assert info["normalization"]["mean"] == [0.286] and info["normalization"]["std"] == [0.353]
    assert info["class_names"][0] == "T-shirt/top" and len(info["class_names"]) == 10
    recorded = pd.read_csv(distilled / "results.csv").set_index("role").loc["student_kd"]
    assert info["accuracy"]["recorded"] == pytest.approx(recorded["accuracy"], abs=0.01)
    assert info["accuracy"]["onnxruntime"] == pytest.approx(info["accuracy"]["pytorch"], abs=0.2)
    assert info["size"]["params"] == 693_962 and info["size"]["onnx_bytes"] == (out / "mnist_student.onnx").stat().st_size

    # Our own check, independent of kd's: real test images, normalised as the JSON says, batch size not 2.
    mean, std = info["normalization"]["mean"][0], info["normalization"]["std"][0]
    x = (fashion_test_images(100).float() / 255 - mean) / std
    with torch.inference_mode():
        want = load_student(distilled / "student.pt")(x)
        program = torch.export.load(out / "mnist_student.pt2").module()
        torch.testing.assert_close(program(x), want, rtol=1e-4, atol=1e-4)
    session = onnxruntime.InferenceSession(str(out / "mnist_student.onnx"), providers=["CPUExecutionProvider"])
    assert [session.get_inputs()[0].shape, session.get_outputs()[0].shape] == [["batch", 1, 28, 28], ["batch", 10]]
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_quantize_run_reports_size_accuracy_and_latency(distilled, monkeypatch):
    proc = run_kd(distilled.parent, "quantize", f"run={distilled}", "calibration=256", "threads=1")
    out = distilled / "quantize"
    table = pd.read_csv(out / "results.csv").set_index("role")
    fp32, int8 = table.loc["student_kd"], table.loc["student_kd_ptq"]
    recorded = pd.read_csv(distilled / "results.csv").set_index("role").loc["student_kd"]
    for column in ("scheme", "taught_by", "loss", "alpha", "T"):  # as its row in the run's own table
        assert fp32[column] == int8[column] == recorded[column], column
    assert fp32["size_mb"] / int8["size_mb"] >= 3.5
    assert fp32["params"] == int8["params"] == 693_962 and fp32["flops"] == int8["flops"]
    assert fp32["latency_ms"] > 0 and int8["latency_ms"] > 0
    details = json.loads((out / "results.json").read_text())
    assert details["quantization"] == "static" and details["calibration_images"] == 256
    assert details["accuracy_change"] == pytest.approx(int8["accuracy"] - fp32["accuracy"], abs=0.011)
    assert "accuracy" in proc.stdout and "points" in proc.stdout and "x smaller" in proc.stdout
    assert (out / "results.md").is_file()

    # The written int8 model is the one measured: loaded without kd, it scores the row's accuracy.
    model = torch.jit.load(out / "mnist_student_int8.torchscript.pt")
    images = torch.from_numpy(read_idx(FASHION / "t10k-images-idx3-ubyte.gz").copy())[:, None]
    labels = torch.from_numpy(read_idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    picked = stratified_subset(labels, 0.1, 0)  # TINY's data.test_fraction, as kd picks it
    with torch.inference_mode():
        predicted = model((images[picked].float() / 255 - 0.286) / 0.353).argmax(1)
    assert 100 * (predicted == labels[picked]).float().mean().item() == pytest.approx(int8["accuracy"], abs=0.011)

    # Stopped while measuring a new int8 model, kd quantize leaves the previous model and its results together.
    from kd_cli.deploy import quantize as command

    measured = command.table_row

    def failing(source, role, *args):
        if role.endswith("_ptq"):
            raise KdError("stopped while measuring")
        return measured(source, role, *args)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(command, "table_row", failing)
    with pytest.raises(KdError, match="stopped while measuring"):
        command.main([f"run={distilled}", "calibration=8", "threads=1"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # So does a results file that cannot be replaced: the int8 model is not written without it.
    monkeypatch.setattr(command, "table_row", measured)
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    with pytest.raises(KdError, match="results.md: a folder has that name"):
        command.main([f"run={distilled}", "calibration=8", "threads=1"])
    (out / "results.md").rmdir()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v for k, v in before.items() if k != "results.md"}


def test_quantize_times_with_the_runs_measure_threads_unless_told_otherwise(distilled, tmp_path, monkeypatch):
    from kd_cli.deploy import quantize as command

    loaded = command.load_source

    def run_timed_with_one_thread(options, prog):
        source = loaded(options, prog)
        source.cfg.measure.threads = 1
        return source

    monkeypatch.setattr(command, "load_source", run_timed_with_one_thread)
    previous = torch.get_num_threads()
    try:
        for given, expected in (([], 1), (["threads=2"], 2)):
            torch.set_num_threads(3 - expected)
            command.main([f"run={distilled}", "calibration=8", f"out={tmp_path}", *given])
            details = json.loads((tmp_path / "results.json").read_text())
            assert details["device_name"].endswith(f"torch threads: {expected}")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("arch", ["lightnn", "light6", "conv4", "mnist_student"])
def test_int8_conv_students_are_at_least_3_5x_smaller(arch):
    model = build_model(OmegaConf.create({"arch": arch}), FASHION_SPEC).eval()
    int8 = quantize(model, [torch.randn(16, 1, 28, 28)])
    assert size_mb(model) / size_mb(int8) >= 3.5
    assert count_flops(int8, (1, 28, 28)) == count_flops(model, (1, 28, 28))
    # BatchNorm folds into the layer before it: at most its scale and shift disappear.
    batchnorm = sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters())
    assert count_params(model) - batchnorm <= count_params(int8) <= count_params(model)


def test_measure_int8_columns(distilled):
    table = pd.read_csv(next((distilled.parent.parent / "train").iterdir()) / "results.csv").set_index("role")
    assert (table["size_mb"] / table["int8_size_mb"] >= 3.5).all()
    assert (table["int8_latency_ms"] > 0).all()
    # Off by default: the distill run has no int8 columns.
    assert "int8_size_mb" not in pd.read_csv(distilled / "results.csv").dropna(axis=1, how="all").columns

    measure = OmegaConf.create({"latency_runs": 2, "latency_warmup": 1, "int8": True})
    lightnn = build_model(OmegaConf.create({"arch": "lightnn"}), FASHION_SPEC).eval()
    costs = model_costs(lightnn, (1, 28, 28), torch.device("cpu"), measure)
    assert costs["size_mb"] / costs["int8_size_mb"] >= 3.5
    # An int8 model is its own int8 version: one size, and one latency, timed once.
    int8 = quantize(lightnn, [torch.randn(8, 1, 28, 28)])
    costs = model_costs(int8, (1, 28, 28), torch.device("cpu"), measure)
    assert (costs["int8_size_mb"], costs["int8_latency_ms"]) == (costs["size_mb"], costs["latency_ms"])


def test_the_table_times_models_with_measure_threads_and_says_when_a_timing_is_unsteady(tmp_path, monkeypatch, caplog):
    """measure.threads (train.threads unless set) is the thread count while timing; a 90th percentile over
    twice the median, or a median over twice the fastest pass (passes descheduled by other processes), is
    said, not silently reported as the latency."""
    from kd_cli import measure, run

    measure_cfg = OmegaConf.create({"latency_runs": 3, "latency_warmup": 0, "threads": 1})
    seen = []
    monkeypatch.setattr(run, "model_costs", lambda *args: seen.append(torch.get_num_threads()) or {})
    threads = torch.get_num_threads()
    run.Run(OmegaConf.create({"measure": measure_cfg}), tmp_path, torch.device("cpu"), None).costs("teacher", None, None)
    assert seen == [1] and torch.get_num_threads() == threads

    lightnn = build_model(OmegaConf.create({"arch": "lightnn"}), FASHION_SPEC)
    advice = "; one thread times it more steadily (measure.threads=1; threads=1 for kd quantize and kd bench-model)"
    for fastest, median, p90, threads, warned in ((0.28, 0.3, 48.0, None, advice),
                                                  (0.28, 0.3, 48.0, 1, ""),  # nothing to advise: already one thread
                                                  (0.14, 72.0, 75.0, None, advice),  # busy for most of the runs
                                                  (0.3, 0.33, 0.92, None, None),  # sub-millisecond jitter of an idle machine
                                                  (0.1, 0.33, 0.4, None, None)):
        caplog.clear()
        monkeypatch.setattr(measure, "latency_stats", lambda *args: {"min_ms": fastest, "median_ms": median, "p90_ms": p90})
        measured = measure.model_costs(lightnn, (1, 28, 28), torch.device("cpu"), OmegaConf.merge(measure_cfg, {"threads": threads}), "teacher")
        assert measured["latency_ms"] == median
        line = (f"teacher: latency unsteady (fastest {fastest:.3g} ms, median {median:.3g} ms, 90th percentile {p90:.3g} ms), "
                f"likely other processes on the machine")
        assert (line + warned in caplog.text) if warned is not None else "unsteady" not in caplog.text


def test_a_model_for_one_image_size_or_a_dataset_path_is_one_line():
    from kd_cli.deploy.bench_model import _dataset

    with pytest.raises(KdError, match=r"torchvision.vit_b_32 cannot run on 3x32x32 images \(.*\); choose a model that"):
        build_model(OmegaConf.create({"arch": "torchvision", "name": "vit_b_32"}), ImageSpec(3, 32, 10))
    with pytest.raises(KdError, match="unknown dataset '../base'; choose one of: cifar10, cifar100, fashion_mnist, mnist"):
        _dataset("../base")


def test_a_stored_model_learnt_from_labels_is_quantized_in_a_row_that_says_so(tmp_path):
    from types import SimpleNamespace

    from kd_cli.deploy.quantize import trained_how

    # A kd train model from the store: its row in kd train's table says ce, and no run's results.json is beside it.
    assert trained_how(SimpleNamespace(role="student_scratch", checkpoint=tmp_path / "seed0-abc.pt")) == {"loss": "ce"}
    assert trained_how(SimpleNamespace(role="teacher", checkpoint=tmp_path / "seed0-abc.pt")) == {"loss": "ce"}


def test_distill_quant_qat_end_to_end(distilled):
    """kd distill quant=qat: the KD student, then its int8 rows (post-training, and QAT with the teacher)."""
    cwd = distilled.parent.parent.parent
    run_kd(cwd, "distill", *ONE_EPOCH, "quant=qat", "qat.calibration_images=256", "hydra.run.dir=outputs/qat")
    table = pd.read_csv(cwd / "outputs" / "qat" / "results.csv").set_index("role")
    assert list(table.index) == ["teacher", "student_scratch", "student_kd", "student_kd_ptq", "student_kd_qat"]
    fp32 = table.loc["student_kd"]
    for role in ("student_kd_ptq", "student_kd_qat"):
        row = table.loc[role]
        assert 10 < row["accuracy"] <= 100 and fp32["size_mb"] / row["size_mb"] >= 3.5
        assert (row["model"], row["loss"], row["alpha"], row["T"], row["params"]) == (
            "mnist_student", "kd", fp32["alpha"], fp32["T"], fp32["params"])
        model = torch.jit.load(cwd / row["checkpoint"])
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert table.loc["student_kd_qat", "train_time_s"] > 0 and pd.isna(table.loc["student_kd_ptq", "train_time_s"])


def test_bench_model_reports_device_and_warmup(tmp_path):
    proc = run_kd(tmp_path, "bench-model", "mnist_student", "dataset=fashion_mnist", "runs=3", "warmup=2", "batch=8")
    table = pd.read_csv(tmp_path / "outputs" / "bench-model" / "mnist_student-fashion_mnist" / "results.csv")
    # A conv net: fp32 in both memory layouts, then int8 (whose convolutions run channels_last); GPU rows after.
    assert table[["precision", "layout", "device"]].values.tolist()[:3] == [
        ["fp32", "nchw", "cpu"], ["fp32", "channels_last", "cpu"], ["int8", "channels_last", "cpu"]]
    assert (table["warmup"] == 2).all() and (table["runs"] == 3).all() and (table["batch_size"] == 8).all()
    assert (table["latency_ms"] <= table["latency_p90_ms"]).all() and (table["img_per_s"] > 0).all()
    assert table.loc[0, "params"] == 693_962 and "fp32 on cpu: " in proc.stdout


def test_bench_model_names_the_torchvision_classifier_it_built():
    from kd_cli.deploy import bench_model

    dataset = bench_model._dataset("fashion_mnist")
    assert bench_model._catalogue_model("torchvision", dataset)[1] == "torchvision.resnet18"
    model, label = bench_model._catalogue_model("torchvision.mobilenet_v2", dataset)
    assert label == "torchvision.mobilenet_v2" and type(model).__name__ == "MobileNetV2"


@pytest.mark.parametrize("conv", [True, False])
def test_bench_model_layouts(tmp_path, monkeypatch, conv):
    from kd_cli.deploy import bench_model

    head = [nn.Flatten(), nn.Linear(4 * 26 * 26 if conv else 28 * 28, 10)]
    # Two convolutions: a weight with one input channel counts as NCHW and channels_last alike.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.ReLU(), *head) if conv else nn.Sequential(*head)
    monkeypatch.setattr(bench_model, "_catalogue_model", lambda name, dataset: (model, name))
    bench_model.main(["tiny", "dataset=fashion_mnist", "device=cpu", "runs=2", "warmup=1", "batch=4",
                      f"out={tmp_path}"])
    table = pd.read_csv(tmp_path / "results.csv")
    if conv:
        assert table[["precision", "layout"]].values.tolist() == [
            ["fp32", "nchw"], ["fp32", "channels_last"], ["int8", "channels_last"]]
        # The channels_last row timed a copy: the model quantized after it was still NCHW.
        assert model[1].weight.is_contiguous() and not model[1].weight.is_contiguous(memory_format=torch.channels_last)
    else:  # no convolution, so no layout to choose: one fp32 row, and dynamic int8
        assert table[["precision", "layout"]].values.tolist() == [["fp32", "nchw"], ["int8", "nchw"]]
    assert (table["size_mb"].iloc[:-1] == table.loc[0, "size_mb"]).all() and (table["runs"] == 2).all()


def test_latency_excludes_warmup():
    class SlowStart(nn.Module):
        """Slow for its first 3 calls, as a first call is (allocation, kernel choice); instant afterwards."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls <= 3:
                time.sleep(0.05)
            return x

    model = SlowStart()
    stats = latency_stats(model, (1, 2, 2), torch.device("cpu"), runs=5, warmup=3)
    assert model.calls == 8 and stats["p90_ms"] < 25


@pytest.mark.parametrize("arch", ["lightnn", "mnist_student"])  # static and dynamic int8
def test_an_int8_model_is_timed_as_the_torchscript_file_a_user_loads(arch, monkeypatch):
    """The FX module kd quantizes calls each layer from Python; the file kd writes is what ships."""
    class Counted(nn.Module):
        def __init__(self, loaded_file):
            super().__init__()
            self.loaded_file, self.calls = loaded_file, 0

        def forward(self, x):
            self.calls += 1
            return self.loaded_file(x)

    int8 = quantize(build_model(OmegaConf.create({"arch": arch}), FASHION_SPEC).eval(), [torch.randn(8, 1, 28, 28)])
    loaded, real_load = [], torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda f: loaded.append(Counted(real_load(f))) or loaded[-1])
    stats = latency_stats(int8, (1, 28, 28), torch.device("cpu"), runs=3, warmup=1)
    assert len(loaded) == 1 and loaded[0].calls == 4 and stats["median_ms"] > 0
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded[0].loaded_file(x), int8(x), rtol=0, atol=0)


def test_unsupported_models_are_refused_in_one_line():
    with pytest.raises(KdError, match="no convolution or linear layer"):
        quantize(nn.Sequential(nn.Flatten()), [torch.randn(2, 1, 4, 4)])

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(KdError, match="cannot be quantized by PyTorch's FX graph mode") as error:
        quantize(DataDependent(), [torch.randn(2, 1, 8, 8)])
    assert "\n" not in str(error.value)


def test_bad_inputs_give_one_line(tmp_path, distilled, capsys, monkeypatch):
    # Through the installed command once: exit status 1, one line on stderr, nothing written.
    line = one_line_error(run_kd(tmp_path, "export", "run=missing", check=False))
    assert "run folder missing does not exist" in line

    from kd_cli.deploy import main

    def error_line(command, *argv) -> str:
        assert main(command, list(argv)) == 1
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kd: error: "), captured.err
        return lines[0]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert "holds no student.pt" in error_line("quantize", "run=empty")
    for job in ("0", "1"):  # a sweep folder, whose jobs hold the students
        (tmp_path / "sweep" / job).mkdir(parents=True)
        (tmp_path / "sweep" / job / "student.pt").write_bytes(b"")
    assert (f"sweep holds runs, not one run; pass run= one of them, e.g. run={Path('sweep') / '0'} "
            f"(those with a student.pt: 0, 1)") in error_line("export", "run=sweep")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((distilled / "student.pt").read_bytes()[:2000])
    for command in (["export", f"student.checkpoint={corrupt}"], ["quantize", f"student.checkpoint={corrupt}"],
                    ["bench-model", str(corrupt)]):
        assert "is truncated or corrupt" in error_line(*command)
    assert "did you mean 'calibration'" in error_line("quantize", f"run={distilled}", "calibraton=9")
    assert "neither an existing run folder" in error_line("bench-model", "no_such_model")
    assert "needs run=PATH" in error_line("export")
    # A file where a folder belongs, and the other way round; a model named twice.
    assert (f"run= takes a run folder and {distilled / 'student.pt'} is a file; pass "
            f"student.checkpoint={distilled / 'student.pt'}") in error_line("export", f"run={distilled / 'student.pt'}")
    assert f"student.checkpoint={distilled} is a folder; pass run={distilled}" in error_line(
        "quantize", f"student.checkpoint={distilled}")
    assert f"measures one model: light6 or run={distilled}; drop one" in error_line("bench-model", "light6", f"run={distilled}")
    (tmp_path / "a_file").write_text("")
    assert "a_file is a file, not a folder; choose another location with out=PATH" in error_line(
        "export", f"run={distilled}", "out=a_file")
    assert not (tmp_path / "outputs").exists()



def test_qat_refuses_hooks_whose_feature_fusion_changes_or_tracing_removes():
    from kd_cli.deploy.qat import unusable_paths
    from kd_cli.deploy.quantize import prepare_qat

    light6 = build_model(OmegaConf.create({"arch": "light6", "checkpoint": None}), ImageSpec(1, 28, 10))
    # features.0-2 are Conv, BN, ReLU: fused into one ConvBnReLU2d at features.0
    paths = ["features.0", "features.0:in", "features.2", "features.5", "features.6", *light6.kd_layers["stages"]]
    assert unusable_paths(paths, prepare_qat(light6, torch.randn(2, 1, 28, 28))) == ["features.0", "features.2"]
    # resnet18's stages are containers: traced through, their modules are never called, and a hook would never fire.
    resnet = build_model(OmegaConf.create({"arch": "resnet18", "checkpoint": None}), ImageSpec(1, 28, 10))
    stages = resnet.kd_layers["stages"]
    assert unusable_paths(stages, prepare_qat(resnet, torch.randn(2, 1, 28, 28))) == stages


def test_a_student_distilled_without_a_teacher_keeps_its_role():
    """scheme=online and scheme=self record no teacher; their student is still the run's student_kd."""
    from kd_cli.deploy.source import Source

    spec = {"arch": "lightnn"}
    cfg = OmegaConf.create({"student": {"arch": "lightnn", "checkpoint": None}})
    roles = [Source(None, cfg, {"model_cfg": spec, **meta}, Path("m.pt")).role
             for meta in ({"loss": "dml"}, {"loss": "self"}, {"loss": "kd", "teacher": "t.pt"}, {})]
    assert roles == ["student_kd", "student_kd", "student_kd", "student_scratch"]


def test_bench_model_of_a_run_writes_where_out_says_whatever_the_run_folder_holds(distilled, tmp_path):
    from kd_cli.deploy import bench_model

    blocked = distilled / "bench-model"  # a file where the default output folder would go
    blocked.write_text("")
    try:
        bench_model.main([f"run={distilled}", f"out={tmp_path / 'bench'}", "runs=1", "warmup=0", "batch=2", "device=cpu"])
    finally:
        blocked.unlink()
    assert (tmp_path / "bench" / "results.csv").is_file()


def test_quant_qat_refuses_a_fused_hooked_layer_before_the_student_trains(distilled):
    """classifier.2 is a ReLU that quantization fuses into the Linear before it: refused before the fp32 KD student trains."""
    cwd = distilled.parent.parent.parent
    proc = run_kd(cwd, "distill", *ONE_EPOCH, "quant=qat", "loss=rkd", "loss.student_layers=[classifier.2]",
                  "loss.teacher_layers=[classifier.2]", "hydra.run.dir=outputs/qat_refused", check=False)
    assert one_line_error(proc) == (
        "kd: error: quant=qat: loss=rkd hooks student layer(s) classifier.2, which quantization fuses with its "
        "neighbours or traces through, so the loss would not see that feature; choose other loss.student_layers (such "
        "as pooling layers or a block's last ReLU) or set quant=null")
    assert "student_kd" not in proc.stdout and not (cwd / "outputs" / "qat_refused" / "state").exists()


def test_quant_qat_leaves_the_fp32_kd_student_as_it_is_without_it(distilled):
    """quant=qat adds int8 rows: the fp32 student_kd (lightnn, which has dropout) trains exactly as without it."""
    cwd = distilled.parent.parent.parent
    recipe = [*ONE_EPOCH, "student=lightnn", "train_missing=true", "qat.calibration_images=64"]
    run_kd(cwd, "distill", *recipe, "hydra.run.dir=outputs/fp32_only")
    run_kd(cwd, "distill", *recipe, "quant=qat", "hydra.run.dir=outputs/with_qat")
    without, with_qat = ([{k: v for k, v in epoch.items() if k != "img_per_s"}  # a timing, the rest exact
                          for epoch in json.loads((cwd / "outputs" / run / "results.json").read_text())["histories"]["student_kd"]]
                         for run in ("fp32_only", "with_qat"))
    assert with_qat == without
