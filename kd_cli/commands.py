"""`kd train` and `kd distill` as plain functions of a composed config, callable from tests."""

import json
import logging
from pathlib import Path

from kd_cli.models import model_label
from kd_cli.run import Run, completed_results
from kd_cli.schemes import run_scheme
from kd_cli.store import store_path

log = logging.getLogger(__name__)


def completed_objective(run_dir: Path) -> float | None:
    rows = json.loads((Path(run_dir) / "results.json").read_text())["rows"]
    return next((r.get("val_accuracy") for r in rows if r["role"] == "student_kd"), None)


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
        model, meta, made = run.load_or_make(model_cfg, path, lambda: run.train_from_labels(model_cfg, role, path),
                                             remake=cfg.overwrite)
        if not made:
            log.info("%s: %s is already in the model store (%s); reusing it, overwrite=true retrains it",
                     role, model_label(model_cfg), path)
        histories[role] = meta["history"]
        rows.append(run.row(role, model, model_cfg, meta, path, loss="ce"))
    run.finish(rows, histories)


def run_distill(cfg, run_dir: Path) -> float | None:
    """Train the student with `cfg.loss` under `cfg.scheme`; report every model the scheme involves.

    Returns the student's validation accuracy (None without `data.val_fraction`): the objective a
    hyperparameter sweeper maximises, so a search never looks at the test set.
    """
    if completed_results(run_dir, cfg):
        log.info("%s already holds this run's results; nothing to do", run_dir)
        return completed_objective(run_dir)
    run = Run.start(cfg, run_dir)
    rows, histories, objective = run_scheme(run)
    run.finish(rows, histories)
    return None if objective is None else round(objective, 2)  # as the table shows it, and as a resumed run reads it
