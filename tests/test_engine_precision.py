"""Precision and threads: what `train.amp`, `train.teacher_precision` and `train.threads` do on the CPU.

`auto` is decided by the hardware (whether the CPU has native bf16), never by timing; the capability
check is monkeypatched here, so these tests run the same on any CPU (bf16 autocast works everywhere,
emulated where it is not native). No wall-clock assertions.
"""

import copy
import logging
import os
import subprocess
import sys

import pytest
from conftest import seeded_kd_setup
import torch
from omegaconf import OmegaConf

from kd_cli import engine
from kd_cli.bench.sides import compose_config, tutorial_overrides
from kd_cli.bench.tutorial import ALPHA, T
from kd_cli.config import validate
from kd_cli.data import load_data, normalize
from kd_cli.engine import Teacher, fit, seed_everything, student_precision
from kd_cli.errors import KdError
from kd_cli.losses import build_loss
from kd_cli.models import build_model
from kd_cli.store import recipe

STEPS, BATCH = 4, 8
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def native_bf16(monkeypatch, has: bool) -> None:
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: has)


def distill_config(root, *extra):
    overrides = [*tutorial_overrides(root, "cpu", 1, augment=False, batch_size=BATCH), "student=lightnn",
                 "teacher=deepnn", "loss=kd", f"alpha={ALPHA}", f"T={T}", *extra]
    return compose_config("distill", overrides)


def run_fit(cfg):
    """One epoch of KD; returns (dtype of the student's logits in each step, each step's loss, threads seen)."""
    data, student, teacher, loss_fn = seeded_kd_setup(cfg)
    loss_fn.attach(student, teacher, normalize(data.train_x[:2], data), len(data.train_y))
    logit_dtypes, losses, threads = [], [], []
    student.classifier[-1].register_forward_hook(lambda m, i, out: logit_dtypes.append(out.dtype) if m.training else None)

    def record(module, inputs, out):
        losses.append(out.detach())
        threads.append(torch.get_num_threads())

    loss_fn.register_forward_hook(record)
    fit(student, loss_fn, data, cfg, CPU, teacher=teacher)
    return logit_dtypes, losses, threads


def test_amp_auto_stays_fp32_on_a_cpu_without_native_bf16(cifar, monkeypatch, caplog):
    native_bf16(monkeypatch, False)
    with caplog.at_level(logging.INFO, logger="kd_cli.engine"):
        dtypes, losses, _ = run_fit(distill_config(cifar))
    assert dtypes == [torch.float32] * STEPS
    assert all(loss.dtype == torch.float32 for loss in losses)
    assert "student trains in fp32 (this CPU lacks native bf16" in caplog.text
    assert "teacher precision: fp32 (this CPU lacks native bf16" in caplog.text


def test_amp_auto_runs_the_student_in_bf16_and_the_loss_in_fp32_with_native_bf16(cifar, monkeypatch, caplog):
    native_bf16(monkeypatch, True)
    with caplog.at_level(logging.INFO, logger="kd_cli.engine"):
        dtypes, losses, _ = run_fit(distill_config(cifar))
    assert dtypes == [torch.bfloat16] * STEPS
    assert len(losses) == STEPS and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert "student trains in bf16 (this CPU has native bf16; train.amp=false for fp32)" in caplog.text
    assert caplog.text.count("student trains in") == 1  # once per fit, not per step


@pytest.mark.parametrize("amp, native, expected", [(False, True, "fp32"), (True, False, "bf16"), ("auto", True, "bf16"),
                                                   ("auto", False, "fp32")])
def test_student_precision_follows_train_amp_and_the_hardware(monkeypatch, amp, native, expected):
    native_bf16(monkeypatch, native)
    assert student_precision(OmegaConf.create({"amp": amp}), CPU) == expected


@pytest.mark.parametrize("features, native", [
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_bf16": False}, False),  # Ice Lake: emulated
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True}, True),  # Zen 4, Cooper Lake
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True}, True),  # AMX
    ({"architecture": "x86_64", "avx2": True}, False),
    ({"architecture": "arm64", "neon": True, "bf16": True}, True),
    ({"architecture": "arm64", "neon": True, "bf16": False}, False),
])
def test_native_bf16_means_bf16_instructions_not_avx512_alone(monkeypatch, features, native):
    # oneDNN's own check says yes to any AVX-512 CPU, and there bf16 is emulated, 3x slower than fp32.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: not native, raising=False)
    assert engine.cpu_has_native_bf16() is native


def test_the_loss_is_computed_from_fp32_outputs_under_bf16(cifar, monkeypatch):
    """CPU autocast leaves log_softmax / softmax in the input's dtype, so the engine hands the loss fp32 outputs."""
    native_bf16(monkeypatch, True)
    seen = []
    cfg = distill_config(cifar)
    data = load_data(cfg)
    student, teacher = build_model(cfg.student, data.spec), build_model(cfg.teacher, data.spec)
    loss_fn = build_loss(cfg)
    loss_fn.attach(student, teacher, normalize(data.train_x[:2], data), len(data.train_y))
    loss_fn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0]["logits"].dtype, args[1]["logits"].dtype, torch.is_autocast_enabled("cpu"))),
        with_kwargs=True)
    fit(student, loss_fn, data, cfg, CPU, teacher=teacher)
    assert seen == [(torch.float32, torch.float32, False)] * STEPS


def test_bf16_teacher_cache_is_half_size_and_gives_the_fp32_losses_closely(cifar, monkeypatch):
    native_bf16(monkeypatch, True)
    cfg_bf16 = distill_config(cifar, "train.teacher_cache=on")
    cfg_fp32 = distill_config(cifar, "train.teacher_cache=on", "train.teacher_precision=fp32")
    data = load_data(cfg_bf16)
    seed_everything(1)
    teacher_model = build_model(cfg_bf16.teacher, data.spec)
    bf16 = Teacher(copy.deepcopy(teacher_model), [], data, cfg_bf16, CPU, augment=False)
    fp32 = Teacher(copy.deepcopy(teacher_model), [], data, cfg_fp32, CPU, augment=False)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    assert bf16.cache["logits"].dtype == torch.bfloat16 and fp32.cache["logits"].dtype == torch.float32

    idx = torch.tensor([5, 0, STEPS * BATCH - 1, 5])
    x = normalize(data.train_x[idx], data)
    handed = bf16(x, idx)["logits"]
    assert handed.dtype == torch.float32
    torch.testing.assert_close(handed, bf16.cache["logits"][idx].float(), rtol=0, atol=0)
    seed_everything(0)
    student = build_model(cfg_bf16.student, data.spec).eval()
    loss_fn = build_loss(cfg_bf16)
    with torch.no_grad():
        student_out = {"logits": student(x)}
        loss_bf16 = loss_fn(student_out, bf16(x, idx), data.train_y[idx])
        loss_fp32 = loss_fn(student_out, fp32(x, idx), data.train_y[idx])
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "two", True])
def test_train_threads_must_be_a_whole_number_of_at_least_one(cifar, threads):
    cfg = distill_config(cifar)
    cfg.train.threads = threads
    with pytest.raises(KdError, match="train.threads"):
        validate(cfg)


def test_train_threads_sets_the_thread_count_for_the_fit_only(cifar, monkeypatch):
    native_bf16(monkeypatch, False)
    before = torch.get_num_threads()
    _, _, threads = run_fit(distill_config(cifar, "train.threads=2"))
    assert threads == [2] * STEPS
    assert torch.get_num_threads() == before
    _, _, threads = run_fit(distill_config(cifar))  # null: torch's setting, untouched
    assert threads == [before] * STEPS


def test_runtime_keys_do_not_change_the_store_recipe(cifar):
    base = distill_config(cifar)
    changed = distill_config(cifar, "train.threads=1", "train.amp=false", "train.teacher_precision=bf16")
    assert recipe(base) == recipe(changed)
    assert "threads" not in recipe(base)["train"] and "amp" not in recipe(base)["train"]


# Run in a fresh process: in a long one (the test suite), whether malloc hands the same block out
# again depends on what other allocations split it, but whether freed memory is kept does not.
_RSS_DROP_ON_FREE = """
import os, sys, torch
from kd_cli import engine
if sys.argv[1] == "keep":
    assert engine.keep_freed_memory()
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
held = resident()
del block
print(held - resident())
"""


def _has_glibc_mallopt() -> bool:  # asked without calling it: the suite's own malloc settings stay as they are
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")


@pytest.mark.skipif(not _has_glibc_mallopt(), reason="glibc's mallopt is not available here")
@pytest.mark.parametrize("setting", ["default", "keep"])
def test_freed_memory_is_kept_for_reuse_only_after_keep_freed_memory(setting):
    """What a CPU fit sets up: a freed 256 MB block stays in the process for the next batch to reuse.

    By glibc's default, blocks over 32 MB are mmapped and handed back to the kernel on free, so the
    next one of the same size is page-faulted in and zeroed anew.
    """
    # glibc's default: no malloc tuning from the environment, no other allocator preloaded.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    proc = subprocess.run([sys.executable, "-c", _RSS_DROP_ON_FREE, setting], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    returned_to_kernel = int(proc.stdout)
    if setting == "keep":
        assert returned_to_kernel < 2**20
    else:
        assert returned_to_kernel > 250 * 2**20


def test_a_cache_too_big_to_keep_leaves_the_teacher_in_the_precision_of_a_teacher_run_every_step(cifar, monkeypatch, caplog):
    """On CUDA, auto computes a cache in fp32 (once) but runs an every-step teacher in bf16.

    The CPU teacher here is given CUDA's rule: a cache turned down for its size must not leave the
    teacher in the cache's fp32 for every step of the fit.
    """
    cuda_rule = Teacher._choose_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(Teacher, "_choose_precision",
                        staticmethod(lambda train_cfg, device, cached: cuda_rule(train_cfg, torch.device("cuda"), cached)))
    cfg = distill_config(cifar, "train.teacher_cache_max_mb=0.0001")
    data = load_data(cfg)
    teacher_model = build_model(cfg.teacher, data.spec)
    with caplog.at_level(logging.INFO, logger="kd_cli.engine"):
        teacher = Teacher(teacher_model, [], data, cfg, CPU, augment=False)
    assert teacher.cache is None and teacher.precision == "bf16"
    assert "teacher precision: bf16 (this GPU has bf16" in caplog.text
    assert "teacher precision: fp32" not in caplog.text

    kept = distill_config(cifar)
    assert Teacher(copy.deepcopy(teacher_model), [], data, kept, CPU, augment=False).precision == "fp32"
