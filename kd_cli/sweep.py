"""The summary of a multirun: one row per job, read from the jobs' own result files.

Hydra's on_multirun_end receives no job results and is skipped when a job fails, so the summary
is built from the sweep directory itself; it lists failed and unfinished jobs instead of dropping them.
A stopped sweep has no folders for the jobs it never reached, so the jobs Hydra will launch are written
into the sweep directory (planned.yaml) before the first one starts, and listed as not started.
"""

import json
import logging
from pathlib import Path

import pandas as pd
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from kd_cli.atomic import atomic_write_text
from kd_cli.errors import KdError
from kd_cli.results import csv_text, failed_since_results, last_line, print_table

log = logging.getLogger(__name__)

started_sweeps: list[Path] = []  # filled in the launching process by RecordSweep

PLAN = "planned.yaml"  # in the sweep directory: one list of overrides per job, job number = position
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # its _target_ in hydra.sweeper


class RecordSweep(Callback):
    """Remembers the sweep directory and its planned jobs so the CLI can summarise it however the sweep
    ends; spreads jobs over GPUs."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started_sweeps.append(sweep_dir)
        plan = planned_jobs(config)
        if plan is None:  # a resumed sweep's earlier plan may no longer hold: list started jobs only
            (sweep_dir / PLAN).unlink(missing_ok=True)
        else:
            atomic_write_text(sweep_dir / PLAN, yaml.safe_dump(plan))

    def on_job_start(self, config, **kwargs) -> None:
        # Runs in the job's own process (a joblib worker, a submitit job), right before the task.
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        cpus = OmegaConf.select(config, "hydra.launcher.cpus_per_task")
        if cpus:
            limit_threads(int(cpus))
        if str(config.get("device")) == "auto":
            assign_gpu(int(config.hydra.job.num))


def planned_jobs(config, task_overrides: list[str] | None = None, loader=None) -> list[list[str]] | None:
    """The overrides of every job the sweep will launch, in Hydra's job order; None where it is not fixed.

    Hydra's own parsing and cartesian product (BasicSweeper.split_arguments), not a copy of them, so that
    range(), choice(), glob() and hydra.sweeper.params give the jobs Hydra numbers, in Hydra's order.
    `task_overrides` and `loader`: the command line's overrides (hydra.* excluded) and a config loader,
    before Hydra has started; by default the started sweep's own.
    """
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:  # Optuna chooses each trial from the previous ones' results
        return None
    if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") != "${hydra.job.num}":
        return None  # summarize finds a job by its number, which is then no longer its folder's name
    try:
        # Hydra's internal class, imported here: were it to move, the summary would lose its plan, not kd its start.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        # As BasicSweeper.sweep builds them: hydra.sweeper.params first, then the command line's overrides
        # (unresolved, as Hydra passes them); glob() needs the config loader to list a group's options.
        arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        if task_overrides is None:
            task_overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
            loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
        arguments += task_overrides
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        if any(getattr(o.value(), "shuffle", False) for o in overrides):
            return None  # shuffle() draws another order when Hydra itself expands the sweep
        batches = BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size"))
    except Exception as e:  # the plan only completes a summary: it must never stop the sweep
        log.warning("the sweep's planned jobs are unknown (%s: %s); its summary lists the started ones only",
                    type(e).__name__, e)
        return None
    return [list(job) for batch in batches for job in batch]  # batches run one after another, numbered on


def check_sweep_folder(sweep_dir: Path, plan: list[list[str]]) -> None:
    """Refuse a sweep folder whose job folders hold other jobs' results, before Hydra rewrites their
    .hydra/ files: every job would fail on them, and the summary would show the other sweep's results.
    Settings that do not change what a run computes (device=, measure.*) may differ, as for a run."""
    from kd_cli.config import RUN_ONLY  # the losses and torch come with it: preflight has them, kd report does not

    def computed(overrides: dict) -> dict:
        return {k: v for k, v in overrides.items() if k.split(".")[0] not in RUN_ONLY}

    jobs = [job for job in _job_dirs(sweep_dir) if job.name.isdigit()]
    held = max((int(job.name) + 1 for job in jobs), default=0)  # the jobs of the sweep that ran there
    if held > len(plan):
        raise KdError(f"hydra.sweep.dir={sweep_dir} holds a sweep of {held} jobs, more than the {len(plan)} of this "
                      f"command line: Hydra would replace that sweep's record (multirun.yaml), and its own command "
                      f"line with resume=true would no longer find it; choose another hydra.sweep.dir")
    for job in jobs:
        if not (job / "results.json").is_file():
            continue
        if computed(_overrides_dict(plan[int(job.name)])) != computed(job_overrides(job)):
            ran = " ".join(yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) or []) or "no overrides"
            raise KdError(f"hydra.sweep.dir={sweep_dir} holds another sweep's results ({job} ran `{ran}`); choose "
                          f"another hydra.sweep.dir, or continue that sweep with its own command line and resume=true")


def limit_threads(cpus: int) -> None:
    """Give each submitit job the threads it asked for: submitit_local starts every job at once, and
    torch would otherwise start as many threads as the machine has cores in each of them."""
    import torch

    torch.set_num_threads(cpus)


def assign_gpu(job_num: int) -> int | None:
    """Make GPU (job_num mod GPUs) the current device of this process when several are visible.

    Joblib starts all its workers on the same GPUs; without this every parallel job would train on
    cuda:0. `device=auto` resolves to `cuda`, the current device, so the job then runs on its own
    GPU. A job that already sees one GPU (submitit with gpus_per_node=1, SLURM) is left alone.
    """
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    index = job_num % torch.cuda.device_count()
    torch.cuda.set_device(index)
    log.info("job %d: on GPU %d of %d (device=auto in a sweep: one GPU per job, round robin)",
             job_num, index, torch.cuda.device_count())
    return index


def _job_order(name: str):
    return (not name.isdigit(), int(name) if name.isdigit() else name)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: _job_order(p.name))


def override_value(text: str):
    """An override's value as the config holds it: OmegaConf's YAML reads 1e-3 as a number, where
    PyYAML's (YAML 1.1) reads a string."""
    try:
        return OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]
    except Exception:
        return text


def _parse_value(text: str):
    value = override_value(text)
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


def _overrides_dict(overrides: list[str]) -> dict:
    """key -> value (a `+`/`~` prefix dropped), but `resume`: the jobs that a resumed sweep ran again
    record it and the others do not, which is no difference between them."""
    pairs = ((key.lstrip("+~"), value) for key, _, value in (item.partition("=") for item in overrides))
    return {key: _parse_value(value) for key, value in pairs if key != "resume"}


def job_overrides(job: Path) -> dict:
    """The job's own overrides, as _overrides_dict gives them."""
    return _overrides_dict(yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) or [])


def planned(sweep_dir: Path) -> list[dict]:
    """Each planned job's overrides (as _overrides_dict gives them), in job order; [] without a plan."""
    try:
        plan = yaml.safe_load((sweep_dir / PLAN).read_text()) or []
    except (OSError, yaml.YAMLError):  # no plan: an Optuna sweep, or one started by an older kd
        return []
    return [_overrides_dict(job) for job in plan]


def not_started_jobs(sweep_dir: Path) -> dict[str, dict]:
    """Job number -> overrides, for the planned jobs that have no folder (none without a plan)."""
    # A resumed sweep reuses the folders of the jobs it reached before: a job is either a folder or not started.
    started = {job.name for job in _job_dirs(sweep_dir)}
    return {str(num): job for num, job in enumerate(planned(sweep_dir)) if str(num) not in started}


def _job_rows(job: Path, overrides: dict) -> list[dict]:
    base = {"job": job.name, **overrides}
    results = job / "results.json"
    if results.exists() and not failed_since_results(job):
        payload = json.loads(results.read_text())
        rows = payload["rows"]
        if payload.get("command") == "distill":  # the distilled student is the job's result
            rows = [r for r in rows if r["role"] == "student_kd"]
        # A swept value the loss did not read is empty in the row (alpha=0 T=1,2); the job still had it.
        return [{**base, "status": "ok", **{k: v for k, v in r.items() if v is not None or k not in base}} for r in rows]
    error = job / "error.txt"
    if error.exists():
        return [{**base, "status": "failed", "error": last_line(error.read_text(errors="replace"))}]
    return [{**base, "status": "unfinished"}]


def summarize(sweep_dir: Path) -> pd.DataFrame | None:
    """Write summary.csv (and a heatmap for a two-key numeric sweep) into `sweep_dir`; print it."""
    sweep_dir = Path(sweep_dir)
    jobs = _job_dirs(sweep_dir)
    not_started = not_started_jobs(sweep_dir)
    if not jobs and not not_started:
        return None
    overrides = {job.name: job_overrides(job) for job in jobs} | not_started
    rows = {job.name: _job_rows(job, overrides[job.name]) for job in jobs}
    rows |= {num: [{"job": num, **values, "status": "not started"}] for num, values in not_started.items()}
    frame = pd.DataFrame([row for num in sorted(rows, key=_job_order) for row in rows[num]])
    override_keys = {k for values in overrides.values() for k in values}
    swept = [k for k in frame.columns if k in override_keys and frame[k].astype(str).nunique() > 1]
    frame = frame[["job", *swept, *[c for c in frame.columns if c not in swept and c != "job"]]]
    atomic_write_text(sweep_dir / "summary.csv", csv_text(frame))
    shown = ["job", *swept, "status", *[c for c in ("role", "accuracy", "best_accuracy", "gain_vs_scratch",
                                                     "teacher_retained", "train_time_s", "error") if c in frame]]
    title = f"sweep {sweep_dir}: {len(rows)} jobs" + (f" ({len(not_started)} not started)" if not_started else "")
    print_table(frame[shown], title=title, hide=(), keys=["job", *swept])  # a swept dataset is a column
    log.info("summary: %s", sweep_dir / "summary.csv")
    ran = frame[frame["status"] != "not started"]  # the heatmap shows what the started jobs gave, as before plans
    numeric = [k for k in swept if pd.api.types.is_numeric_dtype(ran[k])]
    # A grid only: the scattered trials of an Optuna search would leave most cells empty; and never
    # over seeds, which the report pools instead.
    searched = any(values.get("hparams_search") not in (None, "null") for values in overrides.values())
    grid = (len(swept) == 2 and "seed" not in swept and not searched
            and len(ran[swept].drop_duplicates()) >= 0.5 * ran[swept[0]].nunique() * ran[swept[1]].nunique())
    if grid and len(numeric) == 2 and "accuracy" in ran and ran["role"].nunique() == 1:
        path = write_heatmap(ran, *swept, sweep_dir / "heatmap_accuracy.png")
        log.info("heatmap: %s", path)
    _report(sweep_dir)
    return frame


def _report(sweep_dir: Path) -> None:
    """The sweep's `kd report` (seeds pooled, gain CIs, plots), without hiding how the sweep itself ended."""
    from kd_cli.report import report_sweep

    try:
        report_sweep(sweep_dir)
    except Exception as e:  # summarize runs in the CLI's finally: an error here must not replace the sweep's own
        log.warning("the report of %s could not be written (%s: %s); `kd report %s` retries it",
                    sweep_dir, type(e).__name__, e, sweep_dir)


def write_heatmap(frame: pd.DataFrame, row_key: str, col_key: str, path: Path) -> Path:
    """Accuracy over the two swept keys, one cell per combination (the mean where seeds repeat it)."""
    from kd_cli.plots import heatmap

    cells = (frame.groupby([row_key, col_key])["accuracy"]
             .agg(accuracy="mean", accuracy_std="std", n="size").reset_index())
    subject = "student" if frame["role"].iloc[0] == "student_kd" else str(frame["role"].iloc[0])
    return heatmap(cells, row_key, col_key, sorted(cells[row_key].unique()), sorted(cells[col_key].unique()),
                   "", path, subject=subject)
