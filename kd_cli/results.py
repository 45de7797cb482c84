"""The results table: one row per model, written as CSV, Markdown and JSON, printed with rich."""

import io
import json
import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from kd_cli.atomic import atomic_write_files

COLUMNS = [
    "role", "model", "dataset", "scheme", "taught_by", "loss", "seed", "alpha", "T",
    "accuracy", "best_accuracy", "val_accuracy", "params", "helper_params", "size_mb", "flops", "latency_ms",
    "int8_size_mb", "int8_latency_ms",
    "train_time_s", "train_img_per_s", "gain_vs_scratch", "teacher_retained", "compression", "checkpoint",
]


def failed_since_results(folder: Path) -> bool:
    """Whether a run folder's last attempt failed after an earlier one wrote results.json: a run that ends
    well removes error.txt, so one beside results.json and newer than it is a later failure (another
    config refused in that folder, say), and the results are not that attempt's."""
    try:
        return (folder / "error.txt").stat().st_mtime >= (folder / "results.json").stat().st_mtime
    except OSError:
        return False


def last_line(error_text: str) -> str:
    """The last line of a run's error.txt: the one-line error (a full disk may have left the file empty)."""
    lines = [line.strip() for line in error_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty error.txt)"


def add_comparisons(rows: list[dict]) -> None:
    """Fill the distilled rows' gain over the scratch student and their share of the teacher."""
    by_role = {r["role"]: r for r in rows}
    # `teacher`: the first model of a chain, or a multi-teacher run's ensemble.
    teacher, scratch = by_role.get("teacher"), by_role.get("student_scratch")
    for row in rows:
        if row["role"] != "student_kd":
            continue
        if scratch:
            row["gain_vs_scratch"] = round(row["accuracy"] - scratch["accuracy"], 2)
        if teacher:
            row["teacher_retained"] = round(100.0 * row["accuracy"] / teacher["accuracy"], 2) if teacher["accuracy"] else math.nan
            row["compression"] = round(teacher["size_mb"] / row["size_mb"], 2)


def results_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def csv_text(frame: pd.DataFrame) -> str:
    """`frame` as CSV with floats at 10 significant digits: 585130 rather than 585130.0 (a column with
    gaps is float in pandas), -7.53 rather than -7.530000000000001."""
    return frame.to_csv(index=False, float_format="%.10g")


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a markdown table, empty cells shown as '-' (to_markdown alone prints nan)."""
    shown = frame.astype(object)
    return shown.where(shown.notna(), None).to_markdown(index=False, missingval="-")


def results_files(run_dir: Path, frame: pd.DataFrame, details: dict) -> dict[Path, bytes]:
    """results.csv, .md and .json of `frame` in `run_dir`, for `atomic_write_files`; `details` go into the json."""
    records = json.loads(frame.to_json(orient="records"))
    texts = {"results.csv": csv_text(frame), "results.md": markdown_table(frame) + "\n",
             "results.json": json.dumps({**details, "rows": records}, indent=2) + "\n"}
    return {Path(run_dir) / name: text.encode() for name, text in texts.items()}


def write_results(run_dir: Path, frame: pd.DataFrame, details: dict) -> None:
    """The three results files, all replaced or none (a full disk leaves the previous three)."""
    atomic_write_files(results_files(run_dir, frame, details))


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "flops":
        return f"{value / 1e6:,.1f}M"
    if isinstance(value, float) and value.is_integer() and column in ("seed", "params", "helper_params"):
        value = int(value)  # a column with gaps comes back from pandas as floats
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _text(value, column: str) -> Text:
    # Text, not str: rich would read a cell such as `[conv4]` (a swept list) as markup and print nothing.
    return Text(_cell(value, column))


def _table(frame: pd.DataFrame, title: str | None, columns: list[str]) -> Table:
    table = Table(title=title, header_style="bold")
    for column in columns:
        table.add_column(Text(column), justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for record in frame[columns].astype(object).to_dict("records"):
        table.add_row(*(_text(record[c], c) for c in columns))
    return table


def _transposed(frame: pd.DataFrame, title: str | None, columns: list[str]) -> Table:
    """One column per row of `frame`: a few models with many measures fit a narrow terminal."""
    table = Table(title=title, header_style="bold")
    table.add_column(Text(columns[0]))
    for head in frame[columns[0]]:
        table.add_column(Text(str(head)), justify="right")
    for column in columns[1:]:
        table.add_row(Text(column), *(_text(v, column) for v in frame[column].astype(object)))
    return table


def _widths(table: Table) -> Measurement:
    """`maximum`: the table's width as printed; `minimum`: the narrowest it gets before rich cuts cells
    with an ellipsis (above it, rich wraps cells at spaces). Measured, not rendered."""
    wide = Console(width=10_000, file=io.StringIO())
    return Measurement.get(wide, wide.options, table)


def _key_columns(columns: list[str], keys) -> list[str]:
    """The columns that say which row is which, repeated in every group of a split table: `keys` where
    the caller names them, else a sweep's `job`, else `role` and `model`, else the first column."""
    if keys is None:
        keys = ["job"] if "job" in columns else ["role", "model"]
    return [c for c in dict.fromkeys(keys) if c in columns] or columns[:1]


def _column_groups(frame: pd.DataFrame, columns: list[str], width: int, keys) -> tuple[list[str], list[list[str]]]:
    """The key columns, and the others cut into runs that fit `width` behind them, the way pandas wraps
    a wide frame. A column too wide on its own still gets a group of its own (rich wraps its cells at
    spaces, and cuts a longer word with an ellipsis)."""
    keys = _key_columns(columns, keys)
    # Each column measured once, alone: n columns side by side share n - 1 of their borders. A column of
    # text (an error message) is given up to half the width and wraps, rather than a group of its own.
    alone = {}
    for c in columns:
        widths = _widths(_table(frame, None, [c]))
        alone[c] = min(widths.maximum, max(widths.minimum, width // 2)) - 1
    # Keys filling over half the width would leave each group room for little else: the first ones only.
    while len(keys) > 1 and sum(alone[c] for c in keys) + 1 > width // 2:
        keys = keys[:-1]
    groups = [[]]
    for column in (c for c in columns if c not in keys):
        if groups[-1] and sum(alone[c] for c in [*keys, *groups[-1], column]) + 1 > width:
            groups.append([])
        groups[-1].append(column)
    return keys, groups


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with status 1 when stdout's reader has gone (| head); kd's commands end as a shell
        # tool killed by SIGPIPE does, quietly with 141 (cli._until_the_reader_stops).
        raise BrokenPipeError


def print_table(frame: pd.DataFrame, title: str, hide=("checkpoint", "dataset"), console: Console | None = None,
                keys: list[str] | None = None) -> None:
    """Print the frame with rich; empty columns and `hide` are left out.

    A table wider than the console is not squeezed into ellipses: with few rows it is printed transposed
    if that fits, else in groups of columns that each fit, every group led by the columns that name the
    rows. Off a terminal (logs, CI) the width is 220, and wide tables are split there too: a log keeps
    every value, in lines an editor or a CI page can show.
    """
    shown = [c for c in frame.columns if c not in hide and not frame[c].isna().all()]
    if console is None:
        console = _Console()
        if not console.is_terminal:
            console = _Console(width=220)
    # The title on a line of its own: as a table's title, rich wraps it to the table's width.
    console.print(title, style="italic", markup=False, highlight=False)
    table = _table(frame, None, shown)
    if _widths(table).maximum <= console.width:
        console.print(table)
        return
    if len(frame) <= 6:
        transposed = _transposed(frame, None, shown)
        if _widths(transposed).maximum <= console.width:
            console.print(transposed)
            return
    keys, groups = _column_groups(frame, shown, console.width, keys)
    for part, group in enumerate(groups, 1):  # one group: it fits once its text wraps, no part to number
        console.print(_table(frame, f"(part {part} of {len(groups)})" if len(groups) > 1 else None, [*keys, *group]))
