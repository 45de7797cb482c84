"""One `kd` run: its config, folder, device and data, and the models it obtains, trains and reports.

Schemes are written against this class: `stored()` gives a model trained from labels (from the
model store, or trained into it), `distill()` trains one student from one teacher, `row()` measures
a model for the results table, `finish()` writes the table.
"""

import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

import kd_cli
from kd_cli.atomic import check_writable
from kd_cli.config import (RUN_ONLY, distill_columns, ignored_settings, leaf_keys, run_identity, teacher_config,
                            validate)
from kd_cli.data import ImageData, load_data, normalize
from kd_cli.engine import FitResult, evaluate, fit, num_threads, resolve_device, seed_everything
from kd_cli.errors import KdError
from kd_cli.losses import DistillationLoss
from kd_cli.losses.hinton import CrossEntropy
from kd_cli.measure import model_costs
from kd_cli.models import build_model, model_label
from kd_cli.preflight import run_warnings
from kd_cli.provenance import record_run
from kd_cli.results import add_comparisons, print_table, results_frame, write_results
from kd_cli.store import (STUDENT_FILE, load_checkpoint, load_into, making, model_spec, named_file, recipe,
                           save_checkpoint, store_path)
from kd_cli.sweep import override_value

log = logging.getLogger(__name__)

# Overrides that only `kd distill` understands; dropped when suggesting the matching `kd train`.
_DISTILL_ONLY = ("loss", "alpha", "T", "scheme", "teacher.checkpoint", "resume", "hparams_search", "train_missing",
                 "quant", "qat", "teacher_recipe")


def completed_results(run_dir: Path, cfg) -> bool:
    """True when `run_dir` already holds this very run's results (a re-run sweep skips it)."""
    results = Path(run_dir) / "results.json"
    if not results.exists():
        return False
    try:
        done = json.loads(results.read_text())
    except (OSError, ValueError) as e:
        raise KdError(f"{results} is unreadable ({type(e).__name__}); delete it, or choose another hydra.run.dir") from None
    if {k: v for k, v in done.get("config", {}).items() if k not in RUN_ONLY} != run_identity(cfg):
        raise KdError(f"{run_dir} already holds the results of a different config; choose another "
                      f"{_run_folder_option()} (its results were left as they are)")
    return True


def _run_folder_option() -> str:
    """The option that placed this run's folder: a sweep's job folder comes from hydra.sweep.dir."""
    try:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # preflight, before Hydra starts: a single run's folder
        multirun = False
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


def check_run_folder(run_dir: Path, cfg) -> bool:
    """Refuse a run folder (hydra.run.dir=) that holds another config's results before Hydra starts the
    run, which rewrites the folder's .hydra/ files; True when it holds this config's, and there is
    nothing to run. (Its training states are checked by each fit, against the config that fit trains
    with: a teacher_recipe's teacher, QAT's fine-tuning.)"""
    return completed_results(run_dir, OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))


def finished_run_folder(cfg) -> str | None:
    """hydra.run.dir, when it names a folder that holds this run's results already: there is nothing to
    run, and Hydra would rewrite the folder's .hydra/ record (with another measure.*, say) all the same."""
    run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=False)
    return run_dir if isinstance(run_dir, str) and Path(run_dir).is_dir() and check_run_folder(Path(run_dir), cfg) else None


def train_command(cfg, model_cfg=None, recipe_keys=()) -> str:
    """The `kd train` line with this run's recipe, so the model it stores is the one looked for.

    With `model_cfg`, the line trains that model as the teacher (a multi-teacher member, say).
    `recipe_keys`: the data.* / train.* keys a teacher_recipe set, given whether typed or not.
    """
    overrides = _task_overrides()
    keys = [o.lstrip("+~").split("=")[0] for o in overrides]
    kept = [o for o, key in zip(overrides, keys) if key not in _DISTILL_ONLY and key.split(".")[0] not in _DISTILL_ONLY]
    # The recipe as `cfg` has it: a teacher_recipe may have changed data.* or train.* values.
    kept = [f"{key}={_typed(OmegaConf.select(cfg, key))}" if key.startswith(("data.", "train.")) and
            override_value(value) != OmegaConf.select(cfg, key) else f"{key}={value}"
            for key, _, value in (o.partition("=") for o in kept)]
    kept += [f"{key}={_typed(OmegaConf.select(cfg, key))}" for key in recipe_keys]
    # A key given twice is given once, with the value that took effect.
    kept = list({o.partition("=")[0]: o for o in kept}.values())
    if model_cfg is not None:
        kept = [o for o in kept if not o.startswith(("teacher=", "teacher.", "student=", "student."))]
        kept += [f"teacher={model_cfg.arch}", "~student"]
    val_fraction = cfg.data.get("val_fraction", 0)
    if val_fraction and not any(o.startswith("data.val_fraction=") for o in kept):
        kept.append(f"data.val_fraction={val_fraction}")  # set by hparams_search=optuna, part of the recipe
    return " ".join(["kd train", *map(shlex.quote, kept)])


def _task_overrides() -> list[str]:
    """This run's command-line overrides (a sweep job's own values)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # called without Hydra (tests, notebooks)
        return []


def _log_to_file(message: str) -> None:
    """`message` into the run's log file only: the terminal had preflight's warnings, for the whole
    command line, before the run began."""
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _typed(value) -> str:
    """A config value as a command line types it: null, true, [0.5,0.75] (Python's None or a spaced list would not parse back)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | bool) or value is None else str(value)


@dataclass
class Run:
    cfg: object
    run_dir: Path
    device: torch.device
    data: ImageData
    recipe_keys: tuple = ()  # the data.* / train.* keys a teacher_recipe set (for a teacher's run)

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
        for line in run_warnings(cfg, _task_overrides()):
            _log_to_file(line)
        data = load_data(cfg).to(device)
        log.info("%s on %s: %d training / %d test images, %d classes, run directory %s",
                 cfg.dataset.name, device, len(data.train_y), len(data.test_y), data.spec.num_classes, run_dir)
        return cls(cfg, Path(run_dir), device, data)

    def new_model(self, model_cfg, seed_offset: int = 0) -> torch.nn.Module:
        # Seeding right before building gives scratch and distilled students the same initial weights;
        # an offset gives models trained side by side (mutual-learning peers) different ones.
        seed_everything(self.cfg.seed + seed_offset)
        return build_model(model_cfg, self.data.spec).to(self.device)

    def example(self) -> torch.Tensor:
        """Two normalised training images: enough to trace feature shapes."""
        return normalize(self.data.train_x[:2], self.data)

    def state_path(self, role: str) -> Path:
        return self.run_dir / "state" / f"{role}.pt"

    def meta(self, model_cfg, result: FitResult) -> dict:
        return {
            "model": model_label(model_cfg), "model_cfg": model_spec(model_cfg), "dataset": self.cfg.dataset.name,
            "num_classes": self.data.spec.num_classes, "seed": self.cfg.seed, "recipe": recipe(self.cfg),
            "config": OmegaConf.to_container(self.cfg, resolve=True),  # whole: kd quantize reads its measure.*
            "metrics": {k: getattr(result, k) for k in ("accuracy", "best_accuracy", "val_accuracy", "train_time_s",
                                                        "train_img_per_s") if getattr(result, k) is not None},
            "history": result.history,
        }

    def row(self, role: str, model, model_cfg, meta: dict, checkpoint: Path | str | None, **columns) -> dict:
        """The results-table row of `model`; `model_cfg` may be the label itself for composite models."""
        shape = (self.data.spec.channels, self.data.spec.size, self.data.spec.size)
        metrics = {k: round(v, 2) for k, v in meta["metrics"].items()}
        label = model_cfg if isinstance(model_cfg, str) else model_label(model_cfg)
        # A checkpoint's own seed: a teacher.checkpoint may have been trained with another seed than this run's.
        return {"role": role, "model": label, "dataset": self.cfg.dataset.name,
                "seed": meta.get("seed", self.cfg.seed), **columns, **metrics,
                **self.costs(role, model, shape),
                "checkpoint": str(checkpoint) if checkpoint else None}

    def costs(self, role: str, model, shape) -> dict:
        with num_threads(self.cfg.measure.get("threads")):
            return model_costs(model, shape, self.device, self.cfg.measure, role)

    def load(self, model_cfg, path: Path):
        model = self.new_model(model_cfg)
        meta = load_into(model, load_checkpoint(path), path, model_cfg, self.cfg)
        return model.to(self.device), meta

    def load_or_make(self, model_cfg, path: Path, make, remake: bool = False):
        """(model, meta, made): the model the store holds at `path`, or the one `make()` trains and stores
        there (also with `remake`). Making holds the entry's lock, so that parallel jobs needing the
        same model wait and load it rather than train it again."""
        if path.exists() and not remake:
            return *self.load(model_cfg, path), False
        check_writable(path.parent, "the model store", "store_dir=PATH")  # before the training it would lose
        with making(path) as waited:
            if path.exists() and (waited or not remake):  # made meanwhile by the job it waited for
                log.info("%s was made meanwhile by another job; loading it", path)
                return *self.load(model_cfg, path), False
            return *make(), True

    def train_from_labels(self, model_cfg, role: str, path: Path):
        """Train `model_cfg` with cross-entropy alone and store it at `path`."""
        model = self.new_model(model_cfg)
        # One state file per model: a multi-teacher run trains several teachers one after another.
        state = self.state_path(f"{role}-{model_label(model_cfg)}")
        result = fit(model, CrossEntropy(), self.data, self.cfg, self.device, label=role, state_path=state)
        meta = self.meta(model_cfg, result)
        save_checkpoint(path, model, meta)
        return model, meta

    def stored(self, model_cfg, role: str, required: bool = True, alone: bool = False, configured: bool = False):
        """(model, meta, path) of `model_cfg` trained from labels with this recipe, or None.

        Found in the model store; when missing, trained into it if `train_missing=true`, else an
        error naming the `kd train` command (or None when not `required`); with `alone`, one that
        trains no student beside it (a teacher_recipe's: a student of that recipe is no run's baseline).
        `configured`: the model is the run's `teacher=`, which teacher.checkpoint can give instead.
        """
        path = store_path(self.cfg, model_cfg)
        if path.exists() or self.cfg.get("train_missing"):
            def train():
                log.info("%s: %s is not in the model store; training it from labels (train_missing=true)",
                         role, model_label(model_cfg))
                return self.train_from_labels(model_cfg, role, path)

            model, meta, made = self.load_or_make(model_cfg, path, train)
            if not made:
                log.info("%s: %s from the model store (%s)", role, model_label(model_cfg), path)
            return model, meta, path
        if not required:
            log.info("no scratch %s in the store for this recipe; `%s` adds it (and gain_vs_scratch), "
                     "or pass train_missing=true", model_label(model_cfg), train_command(self.cfg))
            return None
        other = None if model_spec(model_cfg) == model_spec(self.cfg.teacher) else model_cfg
        command = train_command(self.cfg, other, self.recipe_keys) + (" '~student'" if alone and other is None else "")
        here = "pass train_missing=true to train it here"
        others = f", {here}, or pass teacher.checkpoint=PATH" if configured else f" or {here}"
        raise KdError(f"no trained {role} {model_label(model_cfg)} for {self.cfg.dataset.name} (seed {self.cfg.seed}, "
                      f"this recipe) at {path}; run `{command}` first{others}")

    def require_stored(self, model_cfgs: list, role: str) -> None:
        """Refuse, before any is loaded, a list of models of which the store lacks some, naming every one:
        `stored` stops at the first missing one, after loading those before it."""
        missing = [m for m in model_cfgs if not store_path(self.cfg, m).exists()]
        if not missing or self.cfg.get("train_missing"):
            return
        names = ", ".join(model_label(m) for m in missing)
        commands = " and ".join(f"`{train_command(self.cfg, m, self.recipe_keys)}`" for m in missing)
        raise KdError(f"no trained {role} {names} for {self.cfg.dataset.name} (seed {self.cfg.seed}, this recipe) in "
                      f"{self.cfg.store_dir}; run {commands} first or pass train_missing=true to train "
                      f"{'it' if len(missing) == 1 else 'them'} here")

    def teacher(self):
        """(model, meta, path) of the configured teacher: `teacher.checkpoint`, or the model store.

        `teacher_recipe` changes the recipe the teacher was (or is) trained with, e.g.
        `{data: {fraction: 1.0}}` to distil on a fraction of the data from a teacher that saw all of it.
        """
        if not self.cfg.teacher.checkpoint:
            if not self.cfg.get("teacher_recipe"):
                return self.stored(self.cfg.teacher, "teacher", configured=True)
            cfg = teacher_config(self.cfg)
            log.info("teacher: %s, trained with teacher_recipe=%s over this run's recipe", model_label(cfg.teacher),
                     json.dumps(OmegaConf.to_container(self.cfg.teacher_recipe, resolve=True)).replace(" ", ""))
            data = load_data(cfg).to(self.device) if recipe(cfg) != recipe(self.cfg) else self.data
            changed = tuple(leaf_keys(OmegaConf.to_container(self.cfg.teacher_recipe)))
            return Run(cfg, self.run_dir, self.device, data, changed).stored(cfg.teacher, "teacher", alone=True,
                                                                              configured=True)
        path = named_file("teacher.checkpoint", self.cfg.teacher.checkpoint)
        model, meta = self.load(self.cfg.teacher, path)
        return model, self._scored_here(model, meta, path), path

    def _scored_here(self, model, meta: dict, path: Path) -> dict:
        """`meta` with the teacher file's accuracy on this run's test split. The accuracy it records is from
        the run that trained it, whose data.test_fraction may have picked other test images: the teacher's
        row and the students' teacher_retained would then compare two test sets."""
        theirs = (meta.get("config") or {}).get("data", {}).get("test_fraction")
        if theirs == self.cfg.data.test_fraction:
            return meta
        accuracy = evaluate(model, self.data)
        log.info("teacher.checkpoint %s was scored on the test split of data.test_fraction=%s; on this run's "
                 "(data.test_fraction=%s) it scores %.2f%%", path, theirs, self.cfg.data.test_fraction, accuracy)
        metrics = {k: v for k, v in meta["metrics"].items() if k != "best_accuracy"}  # the best of its epochs, there
        return {**meta, "metrics": {**metrics, "accuracy": accuracy}}

    def scratch_row(self, rows: list, histories: dict) -> None:
        """Add the scratch student (the no-KD baseline) when the store has it or may train it."""
        found = self.stored(self.cfg.student, "student_scratch", required=False)
        if found:
            model, meta, path = found
            rows.append(self.row("student_scratch", model, self.cfg.student, meta, path, loss="ce"))
            histories["student_scratch"] = meta["history"]

    def distill(self, student_cfg, teacher_model: torch.nn.Module | None, loss_fn: DistillationLoss, role: str,
                checkpoint: Path, seed_offset: int = 0, **meta_extra):
        """Train `student_cfg` from `teacher_model` with `loss_fn`; save it (and the loss's helpers) to `checkpoint`."""
        student = self.new_model(student_cfg, seed_offset)
        loss_fn.attach(student, teacher_model, self.example(), len(self.data.train_y))
        if role == "student_kd" and self.cfg.get("quant") == "qat":
            from kd_cli.deploy.qat import check_hooked_layers

            # The layers are known now, and nothing has trained. Preparing a copy draws random numbers, which
            # the student's training must not see: its dropout masks would differ from a run without quant=qat.
            with torch.random.fork_rng(devices=[]):
                check_hooked_layers(student, loss_fn, self.example())
        result = fit(student, loss_fn, self.data, self.cfg, self.device, teacher=teacher_model, label=role,
                     state_path=self.state_path(role), teacher_outputs_folder=Path(self.cfg.store_dir) / "teacher_outputs")
        meta = self.meta(student_cfg, result) | meta_extra
        save_checkpoint(checkpoint, student, meta, helpers=loss_fn.state_dict())
        return student, meta, result

    @property
    def student_path(self) -> Path:
        return self.run_dir / STUDENT_FILE

    def distill_student(self, teacher_model: torch.nn.Module | None, loss_fn: DistillationLoss, histories: dict,
                        **meta_extra):
        """Distil the configured student into `student_path` and add its history to `histories`."""
        meta_extra = {"loss": self.cfg.loss.name, "alpha": self.cfg.alpha, "T": self.cfg.T} | meta_extra
        student, meta, result = self.distill(self.cfg.student, teacher_model, loss_fn, "student_kd", self.student_path,
                                             **meta_extra)
        histories["student_kd"] = result.history
        return student, meta, result

    def distill_columns(self) -> dict:
        """The scheme, loss, alpha and T columns of the rows this run's own distillation produced."""
        return distill_columns(self.cfg)

    def student_kd_row(self, student, meta: dict, loss_fn: DistillationLoss, **columns) -> dict:
        """The distilled student's row; `helper_params` counts what its loss trained beside it (regressors, peers, exits)."""
        return self.row("student_kd", student, self.cfg.student, meta, self.student_path, **self.distill_columns(),
                        helper_params=sum(p.numel() for p in loss_fn.parameters()), **columns)

    def finish(self, rows: list[dict], histories: dict) -> None:
        add_comparisons(rows)
        frame = results_frame(rows)
        # `unread`: the settings kd warned change nothing, which kd report leaves out of the run's configuration.
        details = {"command": self.cfg.command, "kd_version": kd_cli.__version__, "torch": torch.__version__,
                   "device": str(self.device), "config": OmegaConf.to_container(self.cfg, resolve=True),
                   "unread": sorted(ignored_settings(self.cfg)), "histories": histories}
        write_results(self.run_dir, frame, details)
        state_dir = self.run_dir / "state"
        if state_dir.is_dir():  # the run is complete: its resumable training states are no longer needed
            # The whole folder: a state write killed by SIGKILL leaves its temporary file there too.
            shutil.rmtree(state_dir)
        # Last, once every file is in place: a reader that stops early (| head) ends the printing only.
        print_table(frame, title=f"kd {self.cfg.command}: {self.cfg.dataset.name}, seed {self.cfg.seed}")
        log.info("results: %s (.csv, .md, .json)", self.run_dir / "results")
