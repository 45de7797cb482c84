"""The report's figures: each one drawn only when the runs vary what it shows.

- alpha x T (or any two numeric swept keys): a heatmap of mean accuracy over seeds when the runs form
  a grid, a scatter coloured by accuracy when they do not (an Optuna search);
- accuracy vs data.fraction, KD against scratch, with the seed standard deviation as error bars;
- student accuracy vs teacher size, and gain vs student size, when teachers or students differ;
- the accuracy-vs-size and accuracy-vs-FLOPs Pareto fronts of every model in the report;
- training curves (loss, test accuracy per epoch) of every finished run, in report_curves/.
"""

from __future__ import annotations

import itertools
import re
import textwrap
import warnings
from pathlib import Path

import pandas as pd

from kd_cli.atomic import atomic_write

MAX_FACETS = 8  # heatmaps per report, one per combination of the other swept keys
MAX_SERIES = 10
ROLE_COLORS = {"teacher": "tab:red", "student_scratch": "tab:blue", "student_kd": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with warnings.catch_warnings():
        # Long annotations (a Pareto point's run label) can stick out of any layout; "tight" below widens
        # the image to hold them, so matplotlib's complaint that the layout could not would only be noise.
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
        fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:120] or "run"


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label(row, keys: list[str]) -> str:
    return ", ".join(f"{k}={_value(row[k])}" for k in keys if k in row and pd.notna(row[k]))


def _distinct(frame: pd.DataFrame, key: str) -> list:
    if key not in frame:
        return []
    return sorted(frame[key].dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))


def _splits(frame: pd.DataFrame, key: str) -> bool:
    """Whether `key` tells rows of `frame` apart into separate plots or series. An empty cell is a value
    too: runs with a store teacher beside runs naming a teacher.checkpoint are two configurations."""
    return key in frame and frame[key].nunique(dropna=False) > 1


def make_plots(report, out: Path) -> list[Path]:
    frame = report.frame
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    paths: list[Path] = []
    if ok.empty or "accuracy" not in ok:
        return paths
    kd = ok[ok["role"] == "student_kd"]
    searches = {str(Path(o["sweep"])) for o in report.optuna}
    paths += _two_key_plots(kd, report.keys, out, searches)
    paths += _fraction_plot(ok, report.keys, out)
    paths += _teacher_size_plot(kd, report.keys, out)
    paths += _student_size_gain_plot(kd, report.keys, out)
    paths += _pareto_plots(ok, report.keys, out)
    paths += _curves(report, out)
    return paths


# ---------------------------------------------------------------- two swept keys


def _two_keys(kd: pd.DataFrame, keys: list[str]) -> tuple[str, str] | None:
    if len(_distinct(kd, "alpha")) > 1 and len(_distinct(kd, "T")) > 1:
        return "alpha", "T"
    numeric = [k for k in keys if k in kd and pd.api.types.is_numeric_dtype(kd[k]) and len(_distinct(kd, k)) > 1]
    return (numeric[0], numeric[1]) if len(numeric) == 2 else None


def _two_key_plots(kd: pd.DataFrame, keys: list[str], out: Path, searches: set[str] = frozenset()) -> list[Path]:
    """A heatmap per facet of a grid over two keys; a scatter where the runs form no grid, or come from
    an Optuna search (in `searches`), whose drawn values fill cells only by chance."""
    pair = _two_keys(kd, keys)
    if pair is None:
        return []
    row_key, col_key = pair
    kd = kd.dropna(subset=list(pair))  # rows of a loss that reads no T (loss=cosine beside an alpha x T grid)
    others = [k for k in ["model", *keys] if k not in pair and _splits(kd, k)]
    paths = []
    facets = kd.groupby(others, dropna=False) if others else [((), kd)]
    for values, part in itertools.islice(facets, MAX_FACETS):
        values = values if isinstance(values, tuple) else (values,)
        where = ", ".join(f"{k}={_value(v)}" for k, v in zip(others, values))
        suffix = f"_{_slug(where)}" if where else ""
        rows, cols = _distinct(part, row_key), _distinct(part, col_key)
        grid_like = (len(part) >= 0.5 * len(rows) * len(cols) and len(rows) <= 15 and len(cols) <= 15
                     and not _from_searches(part, searches))
        name = f"report_{_slug(row_key)}_{_slug(col_key)}{suffix}.png"
        if grid_like:
            paths.append(heatmap(part, row_key, col_key, rows, cols, where, out / name))
        else:
            paths.append(_scatter(part, row_key, col_key, where, out / name))
    return paths


def _from_searches(part: pd.DataFrame, searches: set[str]) -> bool:
    """Whether every row of `part` is a trial of one of the Optuna sweeps in `searches` (their folders)."""
    if "run" not in part:
        return False
    # A row pooled over seeds has no one run (NaN): no search pools its trials.
    return part["run"].map(lambda run: isinstance(run, str) and str(Path(run).parent) in searches).all()


def heatmap(part, row_key, col_key, rows, cols, where, path, subject: str = "distilled student") -> Path:
    """Accuracy over two keys: one cell per (row, col) row of `part`, with its std and n when given."""
    plt = _plt()
    import numpy as np

    mean = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for _, r in part.iterrows():
        i, j = rows.index(r[row_key]), cols.index(r[col_key])
        mean[i, j] = r["accuracy"]
        std = r.get("accuracy_std")
        spread = f"\n± {std:.2f}" if std is not None and pd.notna(std) else ""
        text[i][j] = f"{r['accuracy']:.2f}{spread}\nn={int(r['n'])}"
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.5, 0.9 * len(rows) + 2))
    image = ax.imshow(mean, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [_value(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_value(r) for r in rows])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    finite = mean[np.isfinite(mean)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        if text[i][j]:
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                    color="black" if mean[i, j] > middle else "white")
    fig.colorbar(image, ax=ax, label="accuracy (%), mean over seeds")
    ax.set_title(f"{subject} accuracy: {row_key} x {col_key}" + (f"\n{where}" if where else ""), fontsize=10)
    return _save(fig, path)


def _scatter(part, x_key, y_key, where, path) -> Path:
    plt = _plt()
    # A search (Optuna) chose by validation accuracy: colour by what chose, when the runs have it.
    metric = "val_accuracy" if "val_accuracy" in part and part["val_accuracy"].notna().all() else "accuracy"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = ax.scatter(part[y_key], part[x_key], c=part[metric], cmap="viridis", s=60, edgecolors="black")
    best = part.loc[part[metric].idxmax()]
    ax.annotate(f"best {best[metric]:.2f}", (best[y_key], best[x_key]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel(y_key)
    ax.set_ylabel(x_key)
    fig.colorbar(points, ax=ax, label=("validation" if metric == "val_accuracy" else "test") + " accuracy (%)")
    ax.set_title(f"distilled student accuracy over {x_key} and {y_key}" + (f"\n{where}" if where else ""), fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------- lines with error bars


def _series_plot(series: dict[str, pd.DataFrame], x: str, y: str, err, xlabel: str, ylabel: str, title: str,
                 path: Path, logx: bool = False, zero_line: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, part in itertools.islice(series.items(), MAX_SERIES):
        part = part.sort_values(x)
        yerr = err(part)
        style = "--" if label.startswith("student_scratch") else (":" if label.startswith("teacher") else "-")
        ax.errorbar(part[x], part[y], yerr=yerr, fmt="o" + style, capsize=3, label=label)
    if zero_line:
        ax.axhline(0, color="grey", linewidth=0.8)
    xs = [v for part in series.values() for v in part[x] if pd.notna(v)]
    if logx and xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # a log axis only pays off over decades
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _std_err(part: pd.DataFrame):
    return part["accuracy_std"].fillna(0).to_numpy() if "accuracy_std" in part else None


def _fraction_plot(ok: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    key = "data.fraction"
    if len(_distinct(ok, key)) < 2:
        return []
    series = {}
    for (role, model), part in ok.groupby(["role", "model"], sort=False):
        # Within the role: alpha and T, empty for the scratch student, split nothing between roles.
        others = [k for k in keys if k != key and _splits(part, k)]
        for values, sub in (part.groupby(others, dropna=False) if others else [((), part)]):
            values = values if isinstance(values, tuple) else (values,)
            extra = ", ".join(f"{k}={_value(v)}" for k, v in zip(others, values) if pd.notna(v))
            series[f"{role} {model}" + (f" ({extra})" if extra else "")] = sub
    return [_series_plot(series, key, "accuracy", _std_err, "fraction of the training set (data.fraction)",
                         "test accuracy (%), mean ± std over seeds", "accuracy vs training data: KD vs scratch",
                         out / "report_accuracy_vs_fraction.png")]


def _series_by(frame: pd.DataFrame, keys: list[str], single_label: str) -> dict[str, pd.DataFrame]:
    """One plotted series per combination of `keys`, labelled "key=value, ..."."""
    series = {}
    for values, sub in (frame.groupby(keys, dropna=False) if keys else [((), frame)]):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={_value(v)}" for k, v in zip(keys, values) if pd.notna(v)) or single_label
        series[label] = sub
    return series


def _teacher_size_plot(kd: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    if "teacher_params" not in kd or len(_distinct(kd, "teacher_params")) < 2:
        return []
    others = [k for k in ["model", *keys] if k not in ("teacher",) and _splits(kd, k)]
    return [_series_plot(_series_by(kd, others, "student"), "teacher_params", "accuracy", _std_err, "teacher parameters",
                         "distilled student test accuracy (%)", "student accuracy vs teacher size",
                         out / "report_student_accuracy_vs_teacher_size.png", logx=True)]


def _ci_err(part: pd.DataFrame):
    low = (part["gain"] - part["gain_ci_low"]).fillna(0).to_numpy()
    high = (part["gain_ci_high"] - part["gain"]).fillna(0).to_numpy()
    return [low, high]


def _student_size_gain_plot(kd: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    if "gain" not in kd:
        return []
    kd = kd[kd["gain"].notna()]
    if len(_distinct(kd, "params")) < 2:
        return []
    others = [k for k in keys if k not in ("student",) and _splits(kd, k)]
    return [_series_plot(_series_by(kd, others, "gain"), "params", "gain", _ci_err, "student parameters",
                         "gain over scratch (points), 95% CI", "KD gain vs student size",
                         out / "report_gain_vs_student_size.png", logx=True, zero_line=True)]


# ---------------------------------------------------------------- Pareto fronts


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: at most as costly and more accurate, or cheaper and as accurate."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any((c <= cost and a > acc) or (c < cost and a >= acc) for j, (c, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _point_label(row, keys: list[str]) -> str:
    """Wrapped: a point's settings can run to hundreds of characters when the report mixes sweeps."""
    settings = _label(row, keys)
    return "\n".join(textwrap.wrap(f"{row['role']} {row['model']}" + (f" ({settings})" if settings else ""), 60))


def _pareto_plots(ok: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    paths = []
    for cost, xlabel, name in (("size_mb", "model size (MiB, fp32)", "report_pareto_size.png"),
                               ("flops", "forward FLOPs per image", "report_pareto_flops.png")):
        if cost not in ok:
            continue
        part = ok[ok[cost].notna() & ok["accuracy"].notna()]
        if len(part) < 2:
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = list(zip(part[cost].astype(float), part["accuracy"].astype(float)))
        front = pareto_front(points)
        labels = [_point_label(r, keys) for _, r in part.iterrows()]
        ax.scatter([p[0] for p in points], [p[1] for p in points],
                   c=[ROLE_COLORS.get(r, "tab:grey") for r in part["role"]], s=30, alpha=0.7)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="black",
                markerfacecolor="none", markersize=10, drawstyle="steps-post", linewidth=1, label="Pareto front")
        for i in front:
            ax.annotate(labels[i], points[i], fontsize=7, textcoords="offset points", xytext=(6, -6), va="top")
        costs = [p[0] for p in points]
        if min(costs) > 0 and max(costs) / min(costs) > 20:  # a log axis only pays off over decades
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.set_title(f"accuracy vs {cost}: red teacher, blue scratch, green distilled", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / name))
    return paths


# ---------------------------------------------------------------- training curves


def _curves(report, out: Path) -> list[Path]:
    runs = [r for r in report.runs if r.status == "ok" and r.histories]
    if not runs:
        return []
    base = Path(_common_parent([r.path for r in runs]))
    folder = out / "report_curves"
    paths = []
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    from kd_cli.report import _overrides

    for run in runs:
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
        for role, history in run.histories.items():
            if not history:
                continue
            color = ROLE_COLORS.get(role, "tab:grey")
            epochs = [h["epoch"] for h in history]
            loss_ax.plot(epochs, [h["loss"] for h in history], "o-", color=color, label=role, markersize=3)
            acc_ax.plot(epochs, [h["test_accuracy"] for h in history], "o-", color=color, label=f"{role} test", markersize=3)
            # Marked too, unlike the test series: a one-epoch run's single point draws no line.
            acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "x:", color=color, label=f"{role} train",
                        markersize=4)
        for ax, ylabel in ((loss_ax, "training loss"), (acc_ax, "accuracy (%)")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            # min_n_ticks=1: with fewer than two whole numbers on the axis (a one-epoch run), matplotlib's
            # integer locator would fall back to fractional epochs (0.96, 0.98, ...).
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
        relative = run.path.relative_to(base)
        overrides = " ".join(f"{k}={v}" for k, v in _overrides(run).items())
        fig.suptitle(f"{run.command} {relative}: {overrides or 'seed ' + str(run.flat.get('seed'))}", fontsize=8)
        paths.append(_save(fig, folder / f"{_slug(str(relative))}.png"))
    return paths


def _common_parent(paths: list[Path]) -> Path:
    import os

    common = Path(os.path.commonpath([str(p) for p in paths]))
    return common.parent if len(paths) == 1 else common


def published_vs_measured(table: pd.DataFrame, title: str, path: Path) -> Path:
    """A seed experiment's figures side by side: the document's and this machine's, one pair per result."""
    plt = _plt()
    labels = list(table["result"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    width = 0.4
    positions = range(len(labels))
    for offset, column, color in ((-width / 2, "published", "tab:gray"), (width / 2, "measured", "tab:green")):
        values = pd.to_numeric(table[column], errors="coerce")
        bars = ax.bar([p + offset for p in positions], values.fillna(0), width, label=column, color=color)
        for bar, value in zip(bars, values):
            if pd.notna(value):
                # As the table gives it (87.25, not 87.2): the figure is read beside the published number.
                ax.annotate(f"{value:.2f}".rstrip("0").rstrip("."), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(positions), labels, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    present = pd.to_numeric(pd.concat([table["published"], table["measured"]]), errors="coerce").dropna()
    if len(present):
        ax.set_ylim(max(0.0, present.min() - 10), min(100.0, present.max() + 5))
    ax.set_title(title, fontsize=10)
    ax.legend()
    return _save(fig, path)
