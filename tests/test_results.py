"""print_table: a table wider than the console is split into column groups, not squeezed into ellipses."""

import io

import pandas as pd
import pytest
from rich.console import Console

from kd_cli.results import print_table


def frame_of(rows: int, metrics: int, keys=("role", "model")) -> pd.DataFrame:
    data = {key: [f"{key}_{i}" for i in range(rows)] for key in keys}
    data |= {f"metric_{j:02d}": [1000.0 * j + i + 0.25 for i in range(rows)] for j in range(metrics)}
    return pd.DataFrame(data)


def printed(frame: pd.DataFrame, width: int, title: str = "wide", keys=None) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    print_table(frame, title=title, hide=(), console=console, keys=keys)
    return console.file.getvalue()


def headers(text: str) -> list[list[str]]:
    """The column names of each table printed, in order (one header line each: no name here wraps)."""
    return [[cell.strip() for cell in line.strip("┃").split("┃")] for line in text.splitlines() if line.startswith("┃")]


@pytest.mark.parametrize("keys", [("role", "model"), ("job", "role"), ("name",)])
def test_a_wide_table_is_split_into_groups_that_fit(keys):
    frame = frame_of(10, 28 if len(keys) == 2 else 29, keys)
    text = printed(frame, 100)
    assert "…" not in text
    assert all(len(line) <= 100 for line in text.splitlines())
    groups = headers(text)
    assert len(groups) > 2
    named = {"job": ["job"], "role": ["role", "model"], "name": ["name"]}[keys[0]]  # the columns that name a row
    assert all(group[:len(named)] == named for group in groups)
    assert [c for group in groups for c in group if c not in named] == [c for c in frame.columns if c not in named]
    assert text.splitlines()[0].strip() == "wide" and f"(part {len(groups)} of {len(groups)})" in text
    top_borders = [len(line) for line in text.splitlines() if line.startswith("┏")]
    assert min(top_borders[:-1]) > 100 - len("│ metric_00 ")  # full: the next column would not have fit
    assert all(f"{key}_9" in text for key in keys) and "27,009.25" in text


def test_the_caller_names_the_key_columns_up_to_half_the_width():
    frame = frame_of(10, 28, ("model", "precision", "layout")).assign(device="cpu")
    groups = headers(printed(frame, 100, keys=["model", "precision", "layout", "device"]))
    assert all(group[:4] == ["model", "precision", "layout", "device"] for group in groups)
    groups = headers(printed(frame, 60, keys=["model", "precision", "layout", "device"]))
    assert all(group[:2] == ["model", "precision"] and "layout" not in group[2:] for group in groups[1:])


def test_a_long_text_column_wraps_in_half_the_width():
    """An error message of 150 characters: wrapped beside the next columns, not a group of its own."""
    frame = frame_of(10, 6).assign(note=["word " * 30] * 10, last=range(10))
    text = printed(frame, 100)
    assert all(len(line) <= 100 for line in text.splitlines()) and "…" not in text
    assert [group[2:] for group in headers(text)] == [[f"metric_{j:02d}" for j in range(6)], ["note", "last"]]


def test_a_word_wider_than_the_console_gets_a_group_of_its_own():
    frame = frame_of(10, 6).assign(path=["/runs/" + "x" * 150] * 10, last=range(10))
    text = printed(frame, 100)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert [group[2:] for group in headers(text)] == [[f"metric_{j:02d}" for j in range(6)], ["path"], ["last"]]


def test_a_table_of_only_its_naming_columns_is_printed_even_if_too_wide():
    frame = pd.DataFrame({"role": ["teacher"] * 10, "model": ["word " * 30] * 10})
    text = printed(frame, 100)
    assert headers(text)[0] == ["role", "model"] and len(headers(text)) == 1


def test_a_table_that_fits_is_printed_as_one_table():
    frame = frame_of(10, 4)
    text = printed(frame, 100)
    assert headers(text) == [list(frame.columns)] and "…" not in text
    assert text.splitlines()[0].strip() == "wide"


def test_few_rows_are_transposed_when_that_fits():
    text = printed(frame_of(3, 28), 100)
    assert headers(text) == [["role", "role_0", "role_1", "role_2"]]
    assert all(len(line) <= 100 for line in text.splitlines())


@pytest.mark.parametrize("rows", [3, 10])  # transposed, and as rows
def test_cells_are_printed_as_written_not_read_as_markup(rows):
    """A swept list (scheme.assistants=[conv4]) looks like a rich markup tag, and `[/x]` like a closing one."""
    values = ["[conv4]", "[/conv2]", "[bold]x"] * 4
    frame = pd.DataFrame({"role": [f"[r{i}]" for i in range(rows)], "scheme.assistants": values[:rows],
                          "accuracy": [50.0 + i for i in range(rows)]})
    text = printed(frame, 200)
    assert all(value in text for value in values[:rows]) and "[r0]" in text


def test_off_a_terminal_wide_tables_are_split_at_220_columns(capsys, monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    print_table(frame_of(10, 40), title="wide", hide=())
    text = capsys.readouterr().out
    assert "…" not in text and len(headers(text)) > 1
    assert max(len(line) for line in text.splitlines()) <= 220


def test_a_reader_that_stops_early_is_a_broken_pipe_not_an_exit():
    """rich would exit with status 1; kd's commands end with 141, quietly, as a shell tool does (| head)."""
    from kd_cli import results

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        results.print_table(pd.DataFrame({"role": ["teacher"], "accuracy": [90.0]}), "t", console=results._Console(file=Closed()))
