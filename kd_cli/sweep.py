"""The summary of a multirun: one row per job, read from the jobs' own result files.

Hydra's on_multirun_end receives no job results and is skipped when a job fails, so the summary
is built from the sweep directory itself; it lists failed and unfinished jobs instead of dropping them.
"""

import json
import logging
from pathlib import Path

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from kd_cli.atomic import atomic_write
from kd_cli.results import print_table

log = logging.getLogger(__name__)

started_sweeps: list[Path] = []  # filled in the launching process by RecordSweep


class RecordSweep(Callback):
    """Remembers the sweep directory so the CLI can summarise it however the sweep ends; spreads jobs over GPUs."""

    def on_multirun_start(self, config, **kwargs) -> None:
        started_sweeps.append(Path(config.hydra.sweep.dir))

    def on_job_start(self, config, **kwargs) -> None:
        # Runs in the job's own process (a joblib worker, a submitit job), right before the task.
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        cpus = OmegaConf.select(config, "hydra.launcher.cpus_per_task")
        if cpus:
            limit_threads(int(cpus))
        if str(config.get("device")) == "auto":
            assign_gpu(int(config.hydra.job.num))


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


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))


def _parse_value(text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


def _job_rows(job: Path) -> list[dict]:
    overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) or []
    base = {"job": job.name}
    for item in overrides:
        key, _, value = item.partition("=")
        base[key.lstrip("+~")] = _parse_value(value)
    results = job / "results.json"
    if results.exists():
        payload = json.loads(results.read_text())
        rows = payload["rows"]
        if payload.get("command") == "distill":  # the distilled student is the job's result
            rows = [r for r in rows if r["role"] == "student_kd"]
        return [{**base, "status": "ok", **r} for r in rows]
    error = job / "error.txt"
    if error.exists():
        return [{**base, "status": "failed", "error": error.read_text().strip().splitlines()[-1]}]
    return [{**base, "status": "unfinished"}]


def summarize(sweep_dir: Path) -> pd.DataFrame | None:
    """Write summary.csv (and a heatmap for a two-key numeric sweep) into `sweep_dir`; print it."""
    sweep_dir = Path(sweep_dir)
    jobs = _job_dirs(sweep_dir)
    if not jobs:
        return None
    rows = [row for job in jobs for row in _job_rows(job)]
    frame = pd.DataFrame(rows)
    override_keys = {k for job in jobs for k in _override_keys(job)}
    swept = [k for k in frame.columns if k in override_keys and frame[k].astype(str).nunique() > 1]
    frame = frame[["job", *swept, *[c for c in frame.columns if c not in swept and c != "job"]]]
    atomic_write(sweep_dir / "summary.csv", lambda f: f.write(frame.to_csv(index=False).encode()))
    shown = ["job", *swept, "status", *[c for c in ("role", "accuracy", "best_accuracy", "gain_vs_scratch",
                                                     "teacher_retained", "train_time_s", "error") if c in frame]]
    print_table(frame[shown], title=f"sweep {sweep_dir}: {len(jobs)} jobs")
    log.info("summary: %s", sweep_dir / "summary.csv")
    numeric = [k for k in swept if pd.api.types.is_numeric_dtype(frame[k])]
    # A grid only: the scattered trials of an Optuna search would leave most cells empty; and never
    # over seeds, which the report pools instead.
    grid = (len(swept) == 2 and "seed" not in swept
            and len(frame[swept].drop_duplicates()) >= 0.5 * frame[swept[0]].nunique() * frame[swept[1]].nunique())
    if grid and len(numeric) == 2 and "accuracy" in frame and frame["role"].nunique() == 1:
        path = write_heatmap(frame, *swept, sweep_dir / "heatmap_accuracy.png")
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


def _override_keys(job: Path) -> list[str]:
    overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) or []
    return [item.partition("=")[0].lstrip("+~") for item in overrides]


def write_heatmap(frame: pd.DataFrame, row_key: str, col_key: str, path: Path, value: str = "accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = frame.pivot_table(index=row_key, columns=col_key, values=value, aggfunc="mean").sort_index()
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.columns) + 2.5, 0.8 * len(grid.index) + 2))
    image = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{r:g}" for r in grid.index])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if pd.notna(grid.values[i, j]):
                ax.text(j, i, f"{grid.values[i, j]:.2f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{value} (%)")
    ax.set_title(f"student {value} over {row_key} x {col_key}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path
