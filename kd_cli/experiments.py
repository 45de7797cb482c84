"""`kd distill experiment=NAME`: a seed experiment, or its quick variant, as one command.

A preset is an `@package _global_` config in conf/experiment/ with a `preset:` block: `runs`, the
`kd distill` sweeps the experiment consists of (one line of overrides each, run with -m into one
folder), and `published`, the seed document's figures, each with the rows it is compared with.
Presets set `train_missing=true`, so whatever teacher, assistant or scratch baseline the runs need
is trained into the model store on the way. At the end the experiment's table (published beside
measured) and its plot are written, with `kd report`'s tables and plots over all its runs.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd_cli.atomic import atomic_write_text
from kd_cli.errors import KdError, Terminated
from kd_cli.preflight import EXPERIMENT_PART_ENV, preflight, settings_of, split_args
from kd_cli.report import build_records, build_report, find_runs, lookup, same, varying_keys, write_report
from kd_cli.results import csv_text, markdown_table, print_table

ROOT = Path("outputs") / "experiments"


def preset_of(args: list[str], cfg):
    """The `preset` block of the experiment `cfg` was composed with (by preflight), or None: no
    experiment, no preset, one part of an experiment (a sweep of its own) or a flag that runs nothing."""
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    if cfg is None or not chosen or os.environ.get(EXPERIMENT_PART_ENV) == "1":
        return None
    if "," in chosen[-1]:
        raise KdError(f"experiment= takes one experiment (each is several sweeps already), got {chosen[-1]}; "
                      f"run them one after another")
    preset = cfg.get("preset")
    if preset is None or not preset.get("runs"):
        return None
    if {"-m", "--multirun"} & set(split_args(args)[0]):  # Hydra would run one plain job per value instead
        raise KdError(f"experiment={chosen[-1]} runs its own sweeps: drop -m (and any list of values); to repeat it "
                      f"with another seed, run `kd distill experiment={chosen[-1]} seed=1`")
    return preset


def _folder(name: str, args: list[str]) -> Path:
    """hydra.sweep.dir= where the command line gives it; else a new folder for this experiment, or with
    resume=true the newest one of the same command line."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")]
    if given:
        return Path(given[-1])
    same_line = settings_of(args)
    if "resume=true" in (a.lower() for a in args):
        for folder in sorted((ROOT / name).glob("*"), reverse=True):
            try:
                recorded = json.loads((folder / "experiment.json").read_text())["args"]
            except (OSError, ValueError, KeyError):
                continue
            if settings_of(recorded) == same_line:
                print(f"kd: resuming {folder}", file=sys.stderr)
                return folder
        print(f"kd: no earlier run of this experiment line under {ROOT / name}; starting a new one", file=sys.stderr)
    return ROOT / name / time.strftime("%Y-%m-%d_%H-%M-%S")


def run_experiment(args: list[str], preset, conf_dir: str) -> int:
    """Run every part of the preset, then write its tables and plots. Returns the exit status."""
    name = preset.name
    parts = [shlex.split(line) for line in preset.runs]
    swept = {item.split("=", 1)[0].lstrip("+~"): item for part in parts for item in part}
    for arg in args:  # the part's value would silently win over the user's
        if (key := arg.split("=", 1)[0].lstrip("+~")) in swept:
            raise KdError(f"experiment={name} sets {key} itself ({swept[key]}); drop {arg} from the command line, "
                          f"or run the sweep you want with `kd distill -m ...`")
    if any(arg.startswith("hydra.run.dir=") for arg in args):
        raise KdError(f"experiment={name} runs sweeps, which hydra.run.dir does not place; use hydra.sweep.dir=PATH "
                      f"for the experiment's folder (its parts go into PATH/part1, PATH/part2, ...)")
    folder = _folder(name, args)
    part_args = [arg for arg in args if not arg.startswith("hydra.sweep.dir=")]  # each part gets its own, in `folder`
    for part in parts:  # every part checked before anything runs
        preflight("distill", [*part_args, *part, "-m"], conf_dir, warn=False)  # kd has warned about args already
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "experiment.json").exists():  # a resumed run keeps the command line it continues
        atomic_write_text(folder / "experiment.json", json.dumps(
            {"name": name, "args": args, "runs": list(preset.runs)}, indent=2) + "\n")
    failed = []
    for number, part in enumerate(parts, 1):
        sweep = [*part_args, *part, f"hydra.sweep.dir={folder / f'part{number}'}", "-m"]
        print(f"kd: {name}, part {number}/{len(parts)}: {' '.join(['kd distill', *sweep])}", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "kd_cli", "distill", *sweep]
        if _run_part(command) != 0:
            failed.append(number)
    write_experiment(folder, preset)
    if failed:
        print(f"kd: {name}: part(s) {', '.join(map(str, failed))} had failed jobs (see the tables above); "
              f"`kd distill {' '.join(args)} resume=true` re-runs only what is missing", file=sys.stderr)
        return 1
    return 0


def _run_part(command: list[str]) -> int:
    """One part's sweep, in a child process that stops when kd is stopped."""
    child = subprocess.Popen(command, env={**os.environ, EXPERIMENT_PART_ENV: "1"})
    try:
        return child.wait()
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):  # Ctrl-C reaches the child itself (one process group); a SIGTERM may not
            child.terminate()
        sys.exit(child.wait())  # the child has said how to resume


def published_table(records: list[dict], published) -> pd.DataFrame:
    """One row per published figure: the measured mean of the rows it names (or the best configuration's)."""
    ok = [r for r in records if r["status"] == "ok" and r.get("accuracy") is not None]
    rows = []
    for entry in published:
        wanted = entry.get("match") or {}
        hits = [r for r in ok if all(lookup(r, k)[0] and same(lookup(r, k)[1], v) for k, v in wanted.items())]
        row = {"result": entry["label"], "published": entry.get("value"), "measured": None, "difference": None,
               "n": len(hits), "best_at": None}
        if hits:
            groups = {(): hits}
            if entry.get("pick", "mean") == "max":
                keys = varying_keys(hits)
                groups = {}
                for r in hits:
                    groups.setdefault(tuple((k, r["_config"].get(k)) for k in keys), []).append(r)
            config, members = max(groups.items(), key=lambda item: statistics.fmean(r["accuracy"] for r in item[1]))
            row["measured"] = round(statistics.fmean(r["accuracy"] for r in members), 2)
            row["n"] = len(members)
            row["best_at"] = ", ".join(f"{k}={v}" for k, v in config) or None
            if row["published"] is not None:
                row["difference"] = round(row["measured"] - row["published"], 2)
        rows.append(row)
    return pd.DataFrame(rows, columns=["result", "published", "measured", "difference", "n", "best_at"])


def write_experiment(folder: Path, preset) -> pd.DataFrame:
    """experiment.csv/.md/.json and experiment.png (published vs measured), plus `kd report` over all parts."""
    from kd_cli import plots

    runs = find_runs([folder])
    if not runs:
        raise KdError(f"{folder} holds no kd runs; nothing to tabulate")
    table = published_table(build_records(runs), OmegaConf.to_container(preset.published, resolve=True))
    title = f"{preset.name}: published ({preset.source}) vs measured here"
    atomic_write_text(folder / "experiment.csv", csv_text(table))
    started = json.loads((folder / "experiment.json").read_text())
    # The note describes the preset as shipped; the command line shows what this run changed, and the
    # models or data it swapped are named beside the table, whose labels name the document's.
    swapped = [a for a in started["args"] if a.split("=", 1)[0].lstrip("+~") in ("teacher", "student", "dataset")]
    notes = [*([preset.note] if preset.get("note") else []),
             *([f"This run sets {' '.join(swapped)}: the published figures, and the labels of their rows, are for "
                f"the document's own models and data."] if swapped else [])]
    note = "".join(f"\n{line}\n" for line in notes)
    command = f"\nCommand: `{shlex.join(['kd', 'distill', *started['args']])}`\n"
    shown = table.dropna(axis=1, how="all")
    atomic_write_text(folder / "experiment.md", f"# {title}\n{note}{command}\n{markdown_table(shown)}\n")
    atomic_write_text(folder / "experiment.json", json.dumps(
        {**started, "source": preset.source, "note": " ".join(notes) or None,
         "table": json.loads(table.to_json(orient="records"))}, indent=2) + "\n")
    plots.published_vs_measured(table, title, folder / "experiment.png")
    write_report(build_report(runs), folder, [folder])
    print_table(shown, title=title, hide=())
    for line in notes:
        print(line)
    print(f"experiment: {folder / 'experiment.md'} (.csv, .json, .png); every run: {folder / 'report.md'} and its plots",
          file=sys.stderr)
    return table
