"""`kd train` and `kd distill` as plain functions of a composed config, callable from tests."""

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import kd_cli
from kd_cli.config import RUN_ONLY, run_identity, validate
from kd_cli.data import ImageData, load_data, normalize
from kd_cli.engine import FitResult, fit, resolve_device, seed_everything
from kd_cli.errors import KdError
from kd_cli.losses import build_loss
from kd_cli.losses.hinton import CrossEntropy
from kd_cli.measure import model_costs
from kd_cli.models import build_model, model_label
from kd_cli.provenance import record_run
from kd_cli.results import add_comparisons, print_table, results_frame, write_results
from kd_cli.store import load_checkpoint, load_into, model_spec, recipe, save_checkpoint, store_path

log = logging.getLogger(__name__)

# Overrides that only `kd distill` understands; dropped when suggesting the matching `kd train`.
_DISTILL_ONLY = ("loss", "alpha", "T", "scheme", "teacher.checkpoint", "resume", "hparams_search")


def completed_results(run_dir: Path, cfg) -> bool:
    """True when `run_dir` already holds this very run's results (a re-run sweep skips it)."""
    results = Path(run_dir) / "results.json"
    if not results.exists():
        return False
    done = json.loads(results.read_text())
    if {k: v for k, v in done.get("config", {}).items() if k not in RUN_ONLY} != run_identity(cfg):
        raise KdError(f"{run_dir} already holds the results of a different config; choose another hydra.run.dir "
                      f"(nothing was overwritten)")
    return True


def completed_objective(run_dir: Path) -> float | None:
    rows = json.loads((Path(run_dir) / "results.json").read_text())["rows"]
    return next((r.get("val_accuracy") for r in rows if r["role"] == "student_kd"), None)


@dataclass
class Run:
    cfg: object
    run_dir: Path
    device: torch.device
    data: ImageData

    @classmethod
    def start(cls, cfg, run_dir) -> "Run":
        validate(cfg)
        device = resolve_device(cfg.device)
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; cuDNN must not pick kernels by timing.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        record_run(run_dir, device)
        data = load_data(cfg).to(device)
        log.info("%s on %s: %d training / %d test images, %d classes, run directory %s",
                 cfg.dataset.name, device, len(data.train_y), len(data.test_y), data.spec.num_classes, run_dir)
        return cls(cfg, Path(run_dir), device, data)

    def new_model(self, model_cfg) -> torch.nn.Module:
        # Seeding right before building gives scratch and distilled students the same initial weights.
        seed_everything(self.cfg.seed)
        return build_model(model_cfg, self.data.spec).to(self.device)

    def state_path(self, role: str) -> Path:
        return self.run_dir / "state" / f"{role}.pt"

    def meta(self, model_cfg, result: FitResult) -> dict:
        return {
            "model": model_label(model_cfg), "model_cfg": model_spec(model_cfg), "dataset": self.cfg.dataset.name,
            "num_classes": self.data.spec.num_classes, "seed": self.cfg.seed, "recipe": recipe(self.cfg),
            "config": run_identity(self.cfg),
            "metrics": {k: getattr(result, k) for k in ("accuracy", "best_accuracy", "val_accuracy", "train_time_s",
                                                        "train_img_per_s") if getattr(result, k) is not None},
            "history": result.history,
        }

    def row(self, role: str, model, model_cfg, meta: dict, checkpoint: Path, **columns) -> dict:
        shape = (self.data.spec.channels, self.data.spec.size, self.data.spec.size)
        metrics = {k: round(v, 2) for k, v in meta["metrics"].items()}
        return {"role": role, "model": model_label(model_cfg), "dataset": self.cfg.dataset.name,
                "seed": self.cfg.seed, **columns, **metrics,
                **model_costs(model, shape, self.device, self.cfg.measure), "checkpoint": str(checkpoint)}

    def load(self, model_cfg, path: Path):
        model = self.new_model(model_cfg)
        meta = load_into(model, load_checkpoint(path), path, model_cfg, self.cfg)
        return model.to(self.device), meta

    def finish(self, rows: list[dict], histories: dict) -> None:
        add_comparisons(rows)
        frame = results_frame(rows)
        details = {"command": self.cfg.command, "kd_version": kd_cli.__version__, "torch": torch.__version__,
                   "device": str(self.device), "config": OmegaConf.to_container(self.cfg, resolve=True),
                   "histories": histories}
        write_results(self.run_dir, frame, details)
        print_table(frame, title=f"kd {self.cfg.command}: {self.cfg.dataset.name}, seed {self.cfg.seed}")
        log.info("results: %s (.csv, .md, .json)", self.run_dir / "results")
        state_dir = self.run_dir / "state"
        if state_dir.is_dir():  # the run is complete: its resumable training states are no longer needed
            for state in state_dir.glob("*.pt"):
                state.unlink()
            state_dir.rmdir()


def run_train(cfg, run_dir: Path) -> float | None:
    """Train the teacher and the student from labels alone, into the model store (or reuse them)."""
    if completed_results(run_dir, cfg):
        log.info("%s already holds this run's results; nothing to do", run_dir)
        return None
    run = Run.start(cfg, run_dir)
    rows, histories = [], {}
    for role, key in (("teacher", "teacher"), ("student_scratch", "student")):
        if key not in cfg:  # `kd train ~student` trains the teacher only
            continue
        model_cfg = cfg[key]
        path = store_path(cfg, model_cfg)
        if path.exists() and not cfg.overwrite:
            model, meta = run.load(model_cfg, path)
            log.info("%s: %s is already in the model store (%s); reusing it, overwrite=true retrains it",
                     role, model_label(model_cfg), path)
        else:
            model = run.new_model(model_cfg)
            loss_fn = CrossEntropy()
            result = fit(model, loss_fn, run.data, cfg, run.device, label=role, state_path=run.state_path(role))
            meta = run.meta(model_cfg, result)
            save_checkpoint(path, model, meta)
        histories[role] = meta["history"]
        rows.append(run.row(role, model, model_cfg, meta, path, loss="ce"))
    run.finish(rows, histories)


def _train_command(cfg) -> str:
    """The `kd train` line with this run's recipe, so the teacher it stores is the one looked for."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called without Hydra (tests, notebooks)
        overrides = []
    kept = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in _DISTILL_ONLY
            and not o.startswith("teacher.checkpoint")]
    val_fraction = cfg.data.get("val_fraction", 0)
    if val_fraction and not any(o.startswith("data.val_fraction=") for o in kept):
        kept.append(f"data.val_fraction={val_fraction}")  # set by hparams_search=optuna, part of the recipe
    return " ".join(["kd train", *map(shlex.quote, kept)])


def run_distill(cfg, run_dir: Path) -> float | None:
    """Train the student from the stored teacher with `cfg.loss`; report teacher, scratch and KD rows.

    Returns the student's validation accuracy (None without `data.val_fraction`): the objective a
    hyperparameter sweeper maximises, so a search never looks at the test set.
    """
    if cfg.scheme.name != "offline":
        raise KdError(f"scheme={cfg.scheme.name} is not available; choose offline")
    if completed_results(run_dir, cfg):
        log.info("%s already holds this run's results; nothing to do", run_dir)
        return completed_objective(run_dir)
    loss_fn = build_loss(cfg)
    run = Run.start(cfg, run_dir)
    teacher_path = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else store_path(cfg, cfg.teacher)
    if cfg.teacher.checkpoint and not teacher_path.exists():
        raise KdError(f"teacher.checkpoint={teacher_path} does not exist; check the path")
    if not teacher_path.exists():
        raise KdError(
            f"no trained teacher {model_label(cfg.teacher)} for {cfg.dataset.name} (seed {cfg.seed}, this recipe) "
            f"at {teacher_path}; run `{_train_command(cfg)}` first, or pass teacher.checkpoint=PATH"
        )
    teacher, teacher_meta = run.load(cfg.teacher, teacher_path)
    rows = [run.row("teacher", teacher, cfg.teacher, teacher_meta, teacher_path)]
    histories = {"teacher": teacher_meta["history"]}

    scratch_path = store_path(cfg, cfg.student)
    if scratch_path.exists():
        scratch, scratch_meta = run.load(cfg.student, scratch_path)
        rows.append(run.row("student_scratch", scratch, cfg.student, scratch_meta, scratch_path, loss="ce"))
        histories["student_scratch"] = scratch_meta["history"]
    else:
        log.info("no scratch %s in the store for this recipe; `%s` adds it (and gain_vs_scratch)",
                 model_label(cfg.student), _train_command(cfg))

    student = run.new_model(cfg.student)
    loss_fn.attach(student, teacher, normalize(run.data.train_x[:2], run.data), len(run.data.train_y))
    result = fit(student, loss_fn, run.data, cfg, run.device, teacher=teacher, label="student_kd",
                 state_path=run.state_path("student_kd"))
    meta = run.meta(cfg.student, result) | {"loss": cfg.loss.name, "alpha": cfg.alpha, "T": cfg.T,
                                            "teacher": str(teacher_path)}
    checkpoint = run.run_dir / "student.pt"
    save_checkpoint(checkpoint, student, meta, helpers=loss_fn.state_dict())
    histories["student_kd"] = result.history
    helper_params = sum(p.numel() for p in loss_fn.parameters())
    rows.append(run.row("student_kd", student, cfg.student, meta, checkpoint, scheme=cfg.scheme.name,
                        loss=cfg.loss.name, alpha=cfg.alpha, T=cfg.T, helper_params=helper_params))
    run.finish(rows, histories)
    return result.val_accuracy
