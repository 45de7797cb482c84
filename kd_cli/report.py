"""`kd report PATH...`: one table over run and sweep folders, with seeds averaged and KD gains tested.

A row is one (configuration, role): the runs that differ only in `seed` are pooled, with mean, sample
standard deviation and n. The distilled student's gain over the scratch student is paired by seed
(the scratch student of the same seed and recipe), with a 95% t interval; a gain whose interval
covers zero is reported as not distinguishable from zero. Failed and unfinished runs get rows of
their own, with their one-line error, so a sweep with holes never looks complete.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import yaml

from kd_cli.atomic import atomic_write_text, check_writable
from kd_cli.errors import KdError
from kd_cli.identity import dataset_settings_read
from kd_cli.results import csv_text, failed_since_results, last_line

log = logging.getLogger(__name__)

# Rows in the order a chain runs: teachers, the models in the middle (numbered in their order), the scratch
# baseline, what a distilled student trained beside it (peers, exits), the distilled student, anything else.
ROLE_ORDER = ("teacher", "teacher_", "assistant_", "generation_", "student_scratch", "peer_", "exit_", "student_kd")
# Pooled over seeds as mean, std and n; `accuracy` is the last epoch's, `best_accuracy` the best epoch's.
METRICS = ("accuracy", "best_accuracy", "val_accuracy")
# Properties of the model or of the machine, not of the seed: averaged, shown without spread.
COSTS = ("params", "size_mb", "flops", "latency_ms", "train_time_s", "compression", "teacher_retained")
TIMINGS = ("latency_ms", "int8_latency_ms")  # measured anew by every run that reports a model
# Config keys that never make two runs different experiments (bookkeeping, or where files live).
# A model's `checkpoint` does count: two teacher files are two teachers, not two seeds of one.
IGNORED = {"seed", "device", "resume", "store_dir", "overwrite", "command", "data.root", "data.download",
           "train_missing", "train.threads", "train.teacher_cache", "train.teacher_cache_max_mb", "train.teacher_cache_disk_mb"}
IGNORED_PREFIXES = ("measure.", "hydra.", "preset.")
# Which config keys can change a row of each role: the stored models do not depend on alpha, T, loss.
_RECIPE = ("dataset.", "data.", "train.")
# A multi_teacher member (teacher_1, ...) is named by its row; its ensemble depends on T and scheme.*.
SCOPE = {"teacher": (*_RECIPE, "teacher."), "student_scratch": (*_RECIPE, "student."),
         "train": (*_RECIPE, "teacher.", "student."), "member": _RECIPE, "ensemble": (*_RECIPE, "scheme.", "T")}
MEMBER_ROLE = r"teacher_\d+"
# Models kept in the model store, reported by every run that uses them: the teacher and the scratch
# student, multi_teacher's members, and the models in the middle of a ta or born_again chain.
STORED_ROLES = re.compile(rf"teacher|student_scratch|{MEMBER_ROLE}|assistant_\d+|generation_\d+")
SHORT = {"teacher.arch": "teacher", "student.arch": "student", "loss.name": "loss", "scheme.name": "scheme",
         "dataset.name": "dataset"}
DESCRIBE = ("loss", "alpha", "T")  # always shown for distilled rows, swept or not
NAMING = ("role", "model", "dataset", "scheme", "teacher", "student", *DESCRIBE)  # what tells rows apart first

# Two-sided 95% quantiles of Student's t, t_{0.975}(df) for df = 1..30, from scipy.stats.t.ppf(0.975, df)
# (scipy is not a dependency of kd). Above 30 the Cornish-Fisher expansion below is within 1e-7.
_T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
_Z975 = 1.959963984540054


def t975(df: float) -> float:
    """t_{0.975} for `df` degrees of freedom; a fractional df (Welch) is rounded down, which widens the interval."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    whole = math.floor(df)
    if whole <= 30:
        return _T975[whole - 1]
    z, v = _Z975, float(whole)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


# ---------------------------------------------------------------- reading runs


@dataclass
class Run:
    path: Path
    status: str  # ok | failed | unfinished
    command: str | None
    config: dict
    rows: list[dict] = field(default_factory=list)
    histories: dict = field(default_factory=dict)
    error: str | None = None
    unread: frozenset | None = None  # the settings the run did not read, as it recorded them; None: not recorded

    @cached_property
    def flat(self) -> dict:
        return flatten(self.config)

    @cached_property
    def finished(self) -> float:
        """When the run wrote its results (0 for a run without them)."""
        try:
            return (self.path / "results.json").stat().st_mtime
        except OSError:
            return 0.0

    @property
    def sweep(self) -> Path | None:
        # The basic sweeper leaves multirun.yaml in the sweep folder; the Optuna sweeper only its results.
        markers = ("multirun.yaml", "optimization_results.yaml")
        return self.path.parent if any((self.path.parent / m).exists() for m in markers) else None


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _hydra_config(path: Path) -> dict:
    """A run's composed config as Hydra saved it, for runs that ended before writing results.json."""
    from omegaconf import OmegaConf

    saved = path / ".hydra" / "config.yaml"
    if not saved.exists():
        return {}
    try:
        conf = OmegaConf.load(saved)
    except Exception:  # a half-written or foreign file: the run is still listed, without its settings
        return {}
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except Exception:  # an interpolation that only resolves inside the job (hydra.*): keep it unresolved
        return OmegaConf.to_container(conf, resolve=False)


_NUMBERS = (*METRICS, *COSTS, "alpha", "T", "seed")
_LAST = ("status", "error", "run")  # the report's last columns: how each row's run ended, and which run


def _as_written(payload):
    """`payload` if it has the shape kd writes results.json in, else ValueError saying where it differs
    (a file edited by hand, or another program's)."""
    if not isinstance(payload, dict):
        raise ValueError(f"{json.dumps(payload)[:30]} is not a JSON object")
    rows = payload.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("role"), str) for r in rows):
        raise ValueError("'rows' is not a list of rows, each with a role")
    for row in rows:
        for key in _NUMBERS:
            if row.get(key) is not None and (isinstance(row[key], bool) or not isinstance(row[key], int | float)):
                raise ValueError(f"{row['role']}'s {key} is {row[key]!r}, not a number")
    for key in ("config", "histories"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            raise ValueError(f"'{key}' is not an object")
    unread = payload.get("unread")
    if unread is not None and not (isinstance(unread, list) and all(isinstance(key, str) for key in unread)):
        raise ValueError("'unread' is not a list of setting names")
    return payload


def load_run(path: Path) -> Run:
    results = path / "results.json"
    if results.exists() and not failed_since_results(path):
        try:
            payload = json.loads(results.read_text())
            command = payload.get("command") if isinstance(payload, dict) else None
            if command not in TRAINING_COMMANDS:  # kd quantize's or bench-model's measurements, in rows of their own
                return Run(path, "ok", command, {}, [], {})
            payload = _as_written(payload)
            config = payload.get("config") or _hydra_config(path)
            unread = payload.get("unread")
            return Run(path, "ok", command or config.get("command"), config, payload["rows"],
                       payload.get("histories") or {}, unread=None if unread is None else frozenset(unread))
        except (ValueError, KeyError, TypeError) as e:
            config = _hydra_config(path)
            return Run(path, "failed", config.get("command"), config, error=f"results.json is unreadable ({e})")
    config = _hydra_config(path)
    error = path / "error.txt"
    if error.exists():
        return Run(path, "failed", config.get("command"), config, error=last_line(error.read_text(errors="replace")))
    note = "has a training state; resume=true continues it" if (path / "state").is_dir() else None
    return Run(path, "unfinished", config.get("command"), config, error=note)


TRAINING_COMMANDS = ("train", "distill", None)  # None: a run that failed before Hydra saved its config


def _is_run_dir(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "error.txt").is_file() or (path / ".hydra").is_dir()


def find_runs(paths: list[Path], measurements: list | None = None) -> list[Run]:
    """Every run folder under `paths` (a run, a sweep, or any folder holding them), each once; the
    folders of `kd quantize` and `kd bench-model` are appended to `measurements` when it is given."""
    found: dict[Path, None] = {}
    for root in paths:
        root = Path(root)
        if root.is_file():
            root = root.parent
        if _is_run_dir(root):
            found[root.resolve()] = None
            continue
        candidates = set()
        for name in ("results.json", "error.txt", "overrides.yaml"):
            for hit in root.rglob(name):
                folder = hit.parent.parent if name == "overrides.yaml" else hit.parent
                if name == "overrides.yaml" and hit.parent.name != ".hydra":
                    continue
                relative = folder.relative_to(root).parts
                if any(part.startswith(".") for part in relative):  # .submitit, .hydra internals
                    continue
                candidates.add(folder)
        for folder in sorted(candidates, key=_natural_key):
            found[folder.resolve()] = None
    # `kd quantize` / `kd bench-model` folders hold measurements of models, not training runs.
    runs = list(map(load_run, found))
    if measurements is not None:
        measurements += [run for run in runs if run.command not in TRAINING_COMMANDS]
    return [run for run in runs if run.command in TRAINING_COMMANDS]


def _natural_key(path: Path):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


# ---------------------------------------------------------------- one record per (run, role)


def _in_scope(key: str, kind: str) -> bool:
    prefixes = SCOPE.get(kind)
    return prefixes is None or key.startswith(prefixes)


def _kind(role: str, flat: dict) -> str:
    """The SCOPE entry of a row: its role, or what a role stands for in some schemes."""
    if role == "teacher" and flat.get("scheme.name") == "multi_teacher":
        return "ensemble"  # made by the run from its members, not a stored model
    return "member" if re.fullmatch(MEMBER_ROLE, role) else role


def _counts(key: str) -> bool:
    return not (key in IGNORED or key.startswith(IGNORED_PREFIXES))


def _dataset_as_read(flat: dict) -> dict:
    """`flat` with, of its dataset.* keys, the name and the settings that change the model: the others say
    where the files are, and without augmentation the crop and flip settings are not read (identity.py)."""
    kept = {"name", *dataset_settings_read(bool(flat.get("data.augment", True)))}
    return {k: v for k, v in flat.items() if not k.startswith("dataset.") or k.removeprefix("dataset.") in kept}


def _model_label(cfg: dict) -> str | None:
    if not cfg:
        return None
    if cfg.get("arch") == "torchvision":
        return f"torchvision:{cfg.get('name')}"
    return cfg.get("arch")


def uses_configured_teacher(flat: dict) -> bool:
    """Whether a run's `teacher` config is the model that taught it: not in schemes that take their
    teachers elsewhere (scheme.teachers), have none (self), start from the student (born_again) or
    train peers named in scheme.peers (online; without peers, its one peer is the teacher's architecture)."""
    scheme = flat.get("scheme.name")
    return not (scheme in ("self", "multi_teacher") or (scheme == "born_again" and flat.get("scheme.start") == "scratch")
                or (scheme == "online" and flat.get("scheme.peers")))


def _unread_settings(config: dict) -> set[str]:
    """The settings a run's config does not read (config.ignored_settings), so that a failed run's row
    leaves them empty as a finished run's row does; none when the config is too incomplete to tell."""
    from omegaconf import OmegaConf

    from kd_cli.config import ignored_settings

    try:
        return set(ignored_settings(OmegaConf.create(config)))
    except Exception:  # a run can fail on the very config this would need (an unknown loss, say)
        return set()


def _as_trained(flat: dict) -> dict:
    """A run's settings as its teacher was trained: `teacher_recipe`'s data.* and train.* values in
    place of the run's (a teacher that saw all the data is not the one of the run's 10%)."""
    recipe = {k.removeprefix("teacher_recipe."): v for k, v in flat.items() if k.startswith("teacher_recipe.")}
    return {k: v for k, v in flat.items() if not k.startswith("teacher_recipe")} | recipe


def build_records(runs: list[Run]) -> list[dict]:
    """One record per model a run reports (stored models once), plus one per failed or unfinished run."""
    records, seen_stored = [], {}  # a stored model's key -> its record
    for run in runs:
        flat = run.flat
        # Runs record what they did not read; for a failed run, or one written before kd recorded it, it is
        # worked out here (ignored_settings builds the loss, which imports torch: not for every report).
        unread = run.unread if run.unread is not None else (
            _unread_settings(run.config) if run.command in ("train", "distill") else set())
        # kd warned that each "changes nothing": seeds run with and without one pool. (The teacher's keys
        # are decided below; a row leaves alpha or T empty where they were not read.)
        flat = {k: v for k, v in flat.items() if k.startswith("teacher.") or k in ("alpha", "T")
                or not any(k == key or k.startswith(f"{key}.") for key in unread)}
        flat = _dataset_as_read(flat)
        # A teacher= the run did not use would label its rows with a model never used, and a teacher_recipe its
        # generation 0 (born_again from scratch) with a recipe it was not trained with.
        teacher_used = uses_configured_teacher(flat) and "teacher" not in unread and not (
            run.status == "ok" and run.command == "distill" and flat.get("scheme.name") == "offline"
            and not any(row["role"] == "teacher" for row in run.rows))  # loss=ce, tf_kd's virtual teacher
        if not teacher_used:
            flat = {k: v for k, v in flat.items() if not k.startswith("teacher.")}
        recipe_read = teacher_used and flat.get("scheme.name") != "online"  # online peers train with the student's
        if run.status == "ok":
            by_role = {row["role"]: row for row in run.rows}
            teacher = by_role.get("teacher")
            for row in run.rows:
                role = row["role"]
                kind = _kind(role, flat)
                settings = _as_trained(flat) if recipe_read and kind in ("teacher", "member", "ensemble") else flat
                config = {k: v for k, v in settings.items() if _in_scope(k, kind)}
                if kind == "ensemble":  # averaged at T: at another T it is another ensemble (its row leaves T empty)
                    row = row | {"T": flat.get("T")}
                if STORED_ROLES.fullmatch(role):
                    # A stored model is reported by `kd train` and again by every `kd distill` that used it,
                    # with the metrics its file records: other metrics at the same path are another model
                    # (overwrite=true replaced it), which newest_per_seed then tells from the newer one. A
                    # multi_teacher member is one model whichever position scheme.teachers gives it, and the
                    # same model as the teacher of another run; an ensemble is made by each run, and its T and
                    # scheme.* settings make it another one.
                    key = ("teacher" if kind == "member" else role, row.get("checkpoint"),
                           *((sorted((k, _hashable(v)) for k, v in config.items()) if kind == "ensemble" else
                              # not an ensemble's metrics: each run evaluates it anew, and a GPU's last bits vary
                              [row.get(k) for k in ("accuracy", "best_accuracy", "train_time_s")])))
                    if key in seen_stored:
                        # Each run timed it again: the median of those timings, not the first run's alone.
                        for timing in TIMINGS:
                            if row.get(timing) is not None:
                                seen_stored[key].setdefault(f"_{timing}s", []).append(row[timing])
                        continue
                # An empty alpha or T stays empty (the loss does not read it); build_report would fill it from the config.
                record = {"_run": run, "_config": config,
                          **{k: v for k, v in row.items() if v is not None or k in ("alpha", "T")}, "status": "ok"}
                if STORED_ROLES.fullmatch(role):
                    seen_stored[key] = record
                if role == "student_kd":
                    record["_scratch"] = by_role.get("student_scratch")
                    if teacher:
                        record["_teacher_params"] = teacher.get("params")
                records.append(record)
        else:
            role = "student_kd" if run.command == "distill" else (run.command or "run")
            if run.command == "distill":
                model = _model_label(run.config.get("student"))
            else:
                model = ", ".join(filter(None, (_model_label(run.config.get(k)) for k in ("teacher", "student"))))
            record = {"_run": run, "_config": {k: v for k, v in flat.items() if _in_scope(k, role)},
                      "role": role, "model": model or None, "seed": flat.get("seed"), "status": run.status,
                      "error": run.error, "run": str(run.path)}
            if run.command == "distill":
                record |= {"loss": flat.get("loss.name"), **{k: None if k in unread else flat.get(k) for k in ("alpha", "T")}}
            records.append(record)
    for record in seen_stored.values():
        for timing in TIMINGS:
            if f"_{timing}s" in record and record.get(timing) is not None:
                record[timing] = statistics.median([record[timing], *record.pop(f"_{timing}s")])
    return records


def varying_keys(records: list[dict]) -> list[str]:
    """Config keys whose value differs between records of one role: the swept keys, in config order."""
    order, values = [], {}
    for record in records:
        # A key only some records have (a `kd train` run has no alpha) goes where those records put
        # it, so the columns keep one order whichever record comes first.
        position = -1
        for key, value in record["_config"].items():
            if not _counts(key):
                continue
            if key in order:
                position = order.index(key)
            else:
                position += 1
                order.insert(position, key)
            values.setdefault((record["role"], key), set()).add(_hashable(value))
    for record in records:  # a key missing from some records of a role also varies
        for (role, key), seen in values.items():
            if role == record["role"] and key not in record["_config"]:
                seen.add(None)
    keys = {key for (role, key), seen in values.items() if len(seen) > 1}
    return [key for key in order if key in keys]


def _hashable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------- filters


def _parse(text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no decimal point) as a string; Hydra and Python as 0.001
        try:
            return float(text)
        except ValueError:
            return value
    return value


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):  # a run's list setting, or one typed as [3,1]
        a, b = (_parse(v) if isinstance(v, str) else v for v in (a, b))
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


_LONG = {short: long for long, short in SHORT.items()}


def lookup(record: dict, key: str):
    # Only the keys that can change this role's row: --filter alpha=0.9 keeps no teacher.
    if key in record and not key.startswith("_"):
        return True, record[key]
    for name in (key, _LONG.get(key)):
        if name and name in record["_config"]:
            return True, record["_config"][name]
    return False, None


def apply_filters(records: list[dict], filters: list[str]) -> list[dict]:
    kept = records
    for item in filters:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ReportError(f"--filter takes key=value (e.g. alpha=0.5, role=student_kd), got {item!r}")
        wanted = _parse(text)
        if not any(lookup(r, key)[0] for r in records):  # all the runs, not those an earlier filter kept
            known = sorted({k for r in records for k in (*r, *r["_config"]) if not k.startswith("_")})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ReportError(f"--filter {key}: no run has that key; {hint}known keys: {', '.join(known)}")
        kept = [r for r in kept if (hit := lookup(r, key))[0] and same(hit[1], wanted)]
    return kept


def no_match(records: list[dict], filters: list[str]) -> str:
    """Why the filters kept nothing: the values each filter's key takes in the runs."""
    values = []
    for key in dict.fromkeys(item.partition("=")[0] for item in filters):  # a key filtered twice is listed once
        found = {_as_override(hit[1]) for r in records if (hit := lookup(r, key))[0] and hit[1] is not None}
        values.append(f"{key} {', '.join(sorted(found, key=_natural_order))}" if found else f"no {key}")
    return f"no run matches --filter {' --filter '.join(filters)} (the runs have {'; '.join(values)}); nothing written"


def _natural_order(text: str):
    try:
        return 0, float(text), ""
    except ValueError:
        return 1, 0.0, text


class ReportError(Exception):
    def __str__(self) -> str:
        return f"kd: error: {super().__str__()}"


# ---------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); the deviation of a single value is undefined (NaN)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


@dataclass
class Gain:
    gain: float = math.nan
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    method: str = ""
    verdict: str = "no scratch baseline"


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return "KD better: the 95% CI is above zero"
    if high < 0:
        return "KD worse: the 95% CI is below zero"
    return "not distinguishable from zero: the 95% CI includes zero"


def paired_gain(kd: list[float], scratch: list[float]) -> Gain:
    """Mean of the per-seed differences kd - scratch, with a t interval over the differences."""
    diffs = [a - b for a, b in zip(kd, scratch, strict=True)]
    mean, sd = mean_std(diffs)
    if len(diffs) < 2:
        return Gain(mean, n=1, method="one seed", verdict="one seed: no confidence interval")
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Gain(mean, mean - half, mean + half, len(diffs), f"paired by seed, t({len(diffs) - 1})",
                _verdict(mean - half, mean + half))


def welch_gain(kd: list[float], scratch: list[float]) -> Gain:
    """Difference of means of unpaired samples (different seeds), Welch's t interval."""
    (m1, s1), (m2, s2) = mean_std(kd), mean_std(scratch)
    n1, n2 = len(kd), len(scratch)
    v1, v2 = s1**2 / n1, s2**2 / n2
    gain = m1 - m2
    if v1 + v2 == 0:
        df = n1 + n2 - 2
        half = 0.0
    else:
        df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
        half = t975(df) * math.sqrt(v1 + v2)
    return Gain(gain, gain - half, gain + half, min(n1, n2), f"unpaired (Welch), df {df:.1f}",
                _verdict(gain - half, gain + half))


def _scratch_key(record: dict) -> str | None:
    """The store path of the scratch student with this distilled student's recipe and seed."""
    if record.get("_scratch"):
        return record["_scratch"].get("checkpoint")
    from omegaconf import OmegaConf

    from kd_cli.store import store_path  # torch comes with it: only for runs distilled without a stored scratch student

    try:
        cfg = OmegaConf.create(record["_run"].config)
        return str(store_path(cfg, cfg.student))
    except Exception:  # an old or partial config: no baseline rather than a wrong one
        return None


def _recipe_of(checkpoint: str | None) -> tuple | None:
    """`store/<dataset>/<model>/seed<N>-<hash>.pt` without the seed: the same recipe, any seed."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    seed_part, _, digest = path.stem.partition("-")
    return (str(path.parent), digest) if seed_part.startswith("seed") and digest else None


def compute_gain(group: list[dict], scratch_by_checkpoint: dict[str, dict],
                 scratch_by_recipe: dict[tuple, list[dict]]) -> Gain:
    kd, scratch, unpaired_kd, recipes = [], [], [], set()
    for record in group:
        key = _scratch_key(record)
        partner = record.get("_scratch") or scratch_by_checkpoint.get(key)
        if partner is not None and partner.get("accuracy") is not None:
            kd.append(record["accuracy"])
            scratch.append(partner["accuracy"])
        unpaired_kd.append(record["accuracy"])
        if (recipe := _recipe_of(key)) is not None:
            recipes.add(recipe)
    if len(kd) >= 2 or (len(kd) == 1 and len(group) == 1):
        return paired_gain(kd, scratch)
    pool = {r["checkpoint"]: r["accuracy"] for recipe in recipes for r in scratch_by_recipe.get(recipe, [])}
    if len(unpaired_kd) >= 2 and len(pool) >= 2:
        return welch_gain(unpaired_kd, list(pool.values()))
    if len(kd) == 1:
        return paired_gain(kd, scratch)
    return Gain()


# ---------------------------------------------------------------- the table


@dataclass
class Report:
    frame: pd.DataFrame  # one row per (configuration, role) and per failed or unfinished run
    keys: list[str]  # the configuration columns
    gains: list[dict]
    runs: list[Run]
    optuna: list[dict]
    repeats: list[dict] = field(default_factory=list)  # rows left out for a newer run of the same configuration and seed
    plots: list[Path] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)  # planned jobs of a stopped sweep, "SWEEP/NUM: swept overrides"
    problems: list[Run] = field(default_factory=list)  # the failed and unfinished runs the filters kept


def _display_name(key: str) -> str:
    return SHORT.get(key, key)


def build_report(runs: list[Run], filters: list[str] = (), sort: str | None = None,
                 sources: list[Path] | None = None) -> Report:
    """The report over `runs`; `sources`, the folders it was asked for, limit the not-started jobs it names."""
    every_record = build_records(runs)
    records = apply_filters(every_record, list(filters))
    # With no row left, only the planned jobs whose own overrides set the filtered keys are named: a
    # job says nothing of --filter loss=dkd when loss is not what its sweep varies.
    late, started_elsewhere = not_started(runs, list(filters), sources, named=not records)
    if not records and not late:
        raise ReportError(no_match(every_record, list(filters)))
    swept = varying_keys(records)
    for record in records:
        for key in swept:
            name = _display_name(key)
            if name not in record and key in record["_config"]:
                record[name] = record["_config"][key]
    # loss, alpha and T stay together in that order, swept or not: a --filter that fixes alpha moves no column.
    names = [_display_name(k) for k in swept]
    described = [k for k in DESCRIBE if k in names or any(r.get(k) is not None for r in records)]
    first = next((i for i, k in enumerate(names) if k in DESCRIBE), len(names))
    others = [k for k in names if k not in DESCRIBE]
    keys = others[:first] + described + others[first:]

    def configuration(record: dict) -> tuple:
        return record["role"], record.get("model"), *(_hashable(record.get(k)) for k in keys)

    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "ok":
            groups.setdefault(configuration(record), []).append(record)
    repeats = started_elsewhere
    for key, group in groups.items():
        groups[key], repeated = newest_per_seed(group)
        repeats += repeated
    # The baselines of the gains: the scratch students the table shows, not one that overwrite=true replaced.
    scratch_rows = [r for (role, *_), group in groups.items() if role == "student_scratch" for r in group]
    scratch_by_checkpoint = {r["checkpoint"]: r for r in scratch_rows if r.get("checkpoint")}
    scratch_by_recipe: dict[tuple, list[dict]] = {}
    for r in scratch_rows:
        if (recipe := _recipe_of(r.get("checkpoint"))) is not None:
            scratch_by_recipe.setdefault(recipe, []).append(r)

    rows = []
    for (role, model, *values), group in groups.items():
        group.sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
        row = {"role": role, "model": model, **{k: _as_shown(v) for k, v in zip(keys, values)}, "n": len(group),
               "seeds": ",".join(str(r.get("seed")) for r in group)}
        for metric in METRICS:
            present = [r[metric] for r in group if r.get(metric) is not None]
            if present:
                row[metric], row[f"{metric}_std"] = mean_std(present)
        for cost in COSTS:
            present = [r[cost] for r in group if r.get(cost) is not None]
            if present:
                row[cost] = statistics.fmean(present)
                if cost in ("params", "flops"):
                    row[cost] = int(round(row[cost]))
        if role == "student_kd":
            gain = compute_gain(group, scratch_by_checkpoint, scratch_by_recipe)
            row |= {"gain": gain.gain, "gain_ci_low": gain.low, "gain_ci_high": gain.high, "gain_n": gain.n,
                    "gain_method": gain.method, "gain_verdict": gain.verdict}
            teacher_params = [r["_teacher_params"] for r in group if r.get("_teacher_params")]
            if teacher_params:
                row["teacher_params"] = int(statistics.fmean(teacher_params))
        row["status"] = "ok"
        rows.append(row)
    # A run stopped or failed, then run to the end elsewhere (a resumed sweep's new folder): the finished one counts.
    finished = {(key, r.get("seed")): r for key, group in groups.items() for r in group}
    problems = []
    for record in records:
        if record["status"] == "ok":
            continue
        done = finished.get((configuration(record), record.get("seed")))
        if done is not None:
            repeats.append({"run": str(record["_run"].path), "newer": str(done["_run"].path), "role": record["role"],
                            "seed": record.get("seed"), "status": record["status"]})
        else:
            problems.append(record["_run"])
            rows.append({"role": record["role"], "model": record.get("model"), **{k: _as_shown(record.get(k)) for k in keys},
                         "n": 0, "seeds": str(record.get("seed")), "status": record["status"],
                         "error": record.get("error"), "run": record.get("run")})

    frame = pd.DataFrame(rows)
    if not frame.empty:  # the same last columns whether or not a run failed, for scripts that read them
        frame = frame.reindex(columns=[c for c in frame.columns if c not in _LAST] + list(_LAST))
    frame = _sorted(frame, keys, sort)
    gains = []  # in the table's order
    if "gain_verdict" in frame:
        for _, row in frame[frame["gain_verdict"].notna()].iterrows():
            gains.append({**{k: row.get(k) for k in ("role", "model", *keys)}, "gain": row["gain"],
                          "low": row["gain_ci_low"], "high": row["gain_ci_high"], "n": int(row["gain_n"]),
                          "method": row["gain_method"], "verdict": row["gain_verdict"]})
    # A filtered report is about the runs it kept: its count, its JSON and its training curves.
    kept = [run for run in runs if any(r["_run"] is run for r in records)] if filters else runs
    return Report(frame, keys, gains, kept, optuna_results(runs), repeats, not_started=late,
                  problems=problems)


def not_started(runs: list[Run], filters: list[str], sources: list[Path] | None = None,
                named: bool = False) -> tuple[list[str], list[dict]]:
    """The planned jobs that the runs' sweeps never reached, as `SWEEP/NUM: swept overrides`, and those
    of them that a finished run of the same command line ran elsewhere (a rerun sweep), as repeats.

    Only for a sweep that is, or is inside, one of `sources` (all sweeps without them): a report on
    one job's folder is not about its sweep. The jobs have no folder and so no config: one is left
    out only when one of its own overrides contradicts a filter (`--filter seed=0` drops seed 1's);
    with `named`, also when its overrides do not set every filtered key.
    """
    given = None if sources is None else [Path(p).resolve() for p in sources]
    sweeps = sorted({run.sweep for run in runs if run.sweep is not None
                     and (given is None or any(run.sweep.resolve().is_relative_to(p) for p in given))})
    if not sweeps:
        return [], []
    from kd_cli.sweep import not_started_jobs, planned  # Hydra's parser comes with them: only for reports over sweeps

    wanted = [(key, _parse(text)) for key, _, text in (item.partition("=") for item in filters)]
    lines, elsewhere, finished = [], [], None
    for sweep in sweeps:
        plan = planned(sweep)
        keys = dict.fromkeys(key for job in plan for key in job)
        # The overrides that tell the sweep's jobs apart; all of them for a sweep of one job.
        swept = [key for key in keys if len({repr(job.get(key)) for job in plan}) > 1] or list(keys)
        command = next(run.command for run in runs if run.sweep == sweep)
        for num, overrides in not_started_jobs(sweep).items():
            if any(_contradicts(overrides, key, value) for key, value in wanted) or (
                    named and not all(_override_name(overrides, key) for key, _ in wanted)):
                continue
            finished = _finished_by_command_line(runs) if finished is None else finished
            done = finished.get((command, _frozen(overrides)))
            if done is not None:
                roles = "+".join(row["role"] for row in done.rows if row["role"] in ("student_kd", "student_scratch", "teacher"))
                elsewhere.append({"run": str(sweep / num), "newer": str(done.path), "role": roles or command,
                                  "seed": done.flat.get("seed"), "status": "not started"})
            else:
                lines.append(f"{sweep / num}: " + " ".join(f"{k}={overrides[k]}" for k in swept if k in overrides))
    return lines, elsewhere


def _frozen(overrides: dict) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in overrides.items()))


def _finished_by_command_line(runs: list[Run]) -> dict[tuple, Run]:
    """The finished runs by command and command-line overrides, as a planned job that never started has them."""
    from kd_cli.sweep import job_overrides

    found = {}
    for run in runs:
        if run.status == "ok" and (run.path / ".hydra" / "overrides.yaml").is_file():
            try:
                found[(run.command, _frozen(job_overrides(run.path)))] = run
            except (OSError, yaml.YAMLError, AttributeError, TypeError):  # a foreign or damaged overrides file
                continue
    return found


def _override_name(overrides: dict, key: str) -> str | None:
    """The name under which a job's overrides set `key` (`loss` for loss.name), or None."""
    return next((n for n in (key, _LONG.get(key), SHORT.get(key)) if n in overrides), None)


def _contradicts(overrides: dict, key: str, value) -> bool:
    name = _override_name(overrides, key)
    return name is not None and not same(overrides[name], value)


def newest_per_seed(group: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, repeats): reruns of one configuration with one seed are one experiment, not more seeds.

    Pooling them would count one seed twice and shrink the gain's interval (two equal CPU reruns give
    a zero-width one); the newest run counts. Each repeat is described for the report's notes.
    """
    newest: dict = {}
    for record in group:
        held = newest.get(record.get("seed"))
        if held is None or record["_run"].finished > held["_run"].finished:
            newest[record.get("seed")] = record
    repeats = [{"run": str(r["_run"].path), "newer": str(newest[r.get("seed")]["_run"].path), "role": r["role"],
                "seed": r.get("seed")} for r in group if r is not newest[r.get("seed")]]
    return [r for r in group if r is newest[r.get("seed")]], repeats


def _sorted(frame: pd.DataFrame, keys: list[str], sort: str | None) -> pd.DataFrame:
    if frame.empty:
        return frame
    if sort is not None:
        columns, ascending = [], []
        for item in sort.split(","):
            name = item.strip().lstrip("-")
            if not name:
                raise ReportError(f"--sort takes column names, comma-separated, a leading - for descending "
                                  f"(e.g. --sort=-accuracy), got {sort!r}")
            if name not in frame.columns:
                raise ReportError(f"--sort {name}: not a column of the report; columns: {', '.join(frame.columns)}")
            columns.append(name)
            ascending.append(not item.strip().startswith("-"))
        return frame.sort_values(columns, ascending=ascending, na_position="last", kind="stable",
                                 key=_sort_key).reset_index(drop=True)
    ranks = frame["role"].map(_role_rank)
    order = frame.assign(_role=ranks.str[0], _number=ranks.str[1], _failed=frame["status"] != "ok")
    by = ["_role", "_number", "model", *[k for k in keys if k in frame.columns], "_failed"]
    order = order.sort_values(by, na_position="first", kind="stable", key=_sort_key)
    return order.drop(columns=["_role", "_number", "_failed"]).reset_index(drop=True)


def _role_rank(role: str) -> tuple[int, int]:
    """(place in ROLE_ORDER, number): teacher_2 after teacher_1, assistant_10 after assistant_9."""
    numbered = re.fullmatch(r"(.+_)(\d+)", role)
    stem, number = (numbered[1], int(numbered[2])) if numbered else (role, 0)
    return (ROLE_ORDER.index(stem) if stem in ROLE_ORDER else len(ROLE_ORDER)), number


def _sort_key(column: pd.Series) -> pd.Series:
    # Mixed columns (numbers, text and booleans: train.amp=auto,false, or a key only some roles have) sort
    # empty cells first, then numbers by value, then the rest as text, rather than fail.
    if column.dtype == object:
        return column.map(lambda v: (0, 0.0, "") if v is None or (isinstance(v, float) and math.isnan(v)) else
                          (1, float(v), "") if isinstance(v, int | float) and not isinstance(v, bool) else (2, 0.0, str(v)))
    return column


# ---------------------------------------------------------------- optuna sweeps


def optuna_results(runs: list[Run]) -> list[dict]:
    """The winner of each Optuna sweep among `runs`, and the split its objective was measured on."""
    out = []
    for sweep in sorted({r.sweep for r in runs if r.sweep is not None}, key=str):
        results = sweep / "optimization_results.yaml"
        if not results.exists():
            continue
        try:  # Hydra's Optuna sweeper writes it in place: a sweep stopped at its end can leave it cut short
            data = yaml.safe_load(results.read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            continue
        best = data.get("best_params") if isinstance(data, dict) else None
        if not isinstance(best, dict) or not best:  # no winner to name, rather than the first trial
            continue
        jobs = [r for r in runs if r.sweep == sweep]
        winner = next((r for r in jobs if all(same(_overrides(r).get(k), _parse(str(v))) for k, v in best.items())), None)
        fractions = {r.flat.get("data.val_fraction") for r in jobs}
        fraction = next(iter(fractions)) if len(fractions) == 1 else None
        split = (f"validation accuracy on a held-out {fraction:g} of the training set (data.val_fraction), "
                 f"not the test set") if fraction else "the value the runs returned (no data.val_fraction in their config)"
        entry = {"sweep": str(sweep), "best_params": best, "best_value": data.get("best_value"), "chosen_by": split,
                 "trials": len(jobs), "winner": str(winner.path) if winner else None}
        if winner is not None and winner.status == "ok":
            kd_row = next((row for row in winner.rows if row["role"] == "student_kd"), None)
            if kd_row:
                entry["winner_test_accuracy"] = kd_row.get("accuracy")
        out.append(entry)
    return out


def _overrides(run: Run) -> dict:
    path = run.path / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    return {k.lstrip("+~"): _parse(v) for k, _, v in (item.partition("=") for item in items)}


# ---------------------------------------------------------------- output


def _fmt(value, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pm(row: pd.Series, metric: str) -> str | None:
    mean = row.get(metric)
    if mean is None or pd.isna(mean):
        return None
    std = row.get(f"{metric}_std")
    return _fmt(mean) if std is None or pd.isna(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def gain_cell(row) -> str | None:
    gain = row.get("gain")
    if gain is None or pd.isna(gain):
        return None
    low, high = row.get("gain_ci_low"), row.get("gain_ci_high")
    if low is None or pd.isna(low):
        return f"{_fmt(gain, sign=True)} (n=1)"
    return f"{_fmt(gain, sign=True)} [{_fmt(low, sign=True)}, {_fmt(high, sign=True)}]"


def display_frame(report: Report) -> pd.DataFrame:
    """The table as people read it: mean ± std, the gain with its interval, the error of a failed run."""
    frame = report.frame
    if frame.empty:
        return frame
    out = pd.DataFrame({"role": frame["role"], "model": frame["model"]})
    for key in report.keys:
        out[key] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else
                    f"{v:g}" if isinstance(v, float) else str(v) for v in frame[key].astype(object)]
    out["n"] = frame["n"].astype(int)
    out["seeds"] = frame["seeds"]
    for metric in METRICS:
        if metric in frame and frame[metric].notna().any():
            out[metric] = [_pm(row, metric) for _, row in frame.iterrows()]
    for cost in ("params", "size_mb", "flops", "latency_ms", "compression"):
        if cost not in frame:
            continue
        if cost in ("params", "flops"):  # whole counts stay whole although failed rows (NaN) made the column float
            out[cost] = pd.Series([None if pd.isna(v) else int(v) for v in frame[cost]], index=frame.index, dtype=object)
        else:
            out[cost] = frame[cost]
    if "gain" in frame:
        out["gain [95% CI]"] = [gain_cell(row) for _, row in frame.iterrows()]
    out["status"] = frame["status"]  # the errors follow the table, one line per run
    return out


def _as_override(value) -> str:
    """A value as it is typed on the command line: 0.5, [deepnn,light6]."""
    if isinstance(value, (list, tuple)):
        return f"[{','.join(map(_as_override, value))}]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _as_shown(value):
    """A list-valued setting (scheme.weights) as the command line types it, [1,0], in every format;
    a scalar as it is."""
    return _as_override(value) if isinstance(value, (list, tuple)) else value


def _describe_config(entry: dict, keys: list[str]) -> str:
    given = [k for k in keys if isinstance(entry.get(k), (list, tuple)) or not pd.isna(entry.get(k))]
    return ", ".join(f"{k}={_as_override(entry[k])}" for k in given)


def gain_sentences(report: Report) -> list[str]:
    lines = []
    # An experiment runs its sweeps itself (no -m): more seeds are more runs of it, which one report pools.
    experiments = sorted({run.path.parts[run.path.parts.index("experiments") + 1] for run in report.runs
                          if "experiments" in run.path.parts[:-1]})
    pooled = "outputs/experiments" + (f"/{experiments[0]}" if len(experiments) == 1 else "")
    more_seeds = (f"run the experiment again with seed=1, and `kd report {pooled}` pools its folders"
                  if experiments else "-m seed=0,1,2")
    for g in report.gains:
        what = f"{g['model']} distilled ({_describe_config(g, report.keys)})"
        if math.isnan(g["gain"]):
            lines.append(f"{what}: no scratch student of the same recipe and seeds to compare with "
                         f"(`kd train` with the same overrides stores one)")
        elif math.isnan(g["low"]):
            lines.append(f"{what}: gain over scratch {_fmt(g['gain'], sign=True)} points from a single seed; "
                         f"run more seeds for a confidence interval ({more_seeds})")
        else:
            lines.append(f"{what}: gain over scratch {_fmt(g['gain'], sign=True)} points, 95% CI "
                         f"[{_fmt(g['low'], sign=True)}, {_fmt(g['high'], sign=True)}] ({g['method']}, n={g['n']}): "
                         f"{g['verdict']}")
    return lines


def problem_lines(report: Report) -> list[str]:
    lines = []
    for run in report.problems:
        detail = f": {run.error}" if run.error else ""
        lines.append(f"{run.status} {run.path}{detail}")
    return lines + [f"not started {job}" for job in report.not_started]


def runs_title(report: Report) -> str:
    """The count in a report's title: the runs, and the planned jobs of a stopped sweep, which have no row."""
    late = f" ({_count(len(report.not_started), 'planned job')} not started)" if report.not_started else ""
    return f"{_count(len(report.runs), 'run')}{late}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def repeat_lines(report: Report) -> list[str]:
    return [f"{r['run']} ({r['role']}, seed {r['seed']}) " + (
        f"is {r['status']}; {r['newer']} ran its configuration and seed to the end, which the table uses" if r.get("status")
        else f"repeats the configuration and seed of {r['newer']}, which the table uses") for r in report.repeats]


def optuna_lines(report: Report) -> list[str]:
    lines = []
    for o in report.optuna:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in o["best_params"].items())
        test = o.get("winner_test_accuracy")
        test_text = f"; its test accuracy, reported but not used to choose: {test:.2f}" if test is not None else ""
        trials = f"{o['trials']} trial{'' if o['trials'] == 1 else 's'}"
        lines.append(f"Optuna ({trials}, {o['sweep']}) chose {params} by {o['chosen_by']}: {o['best_value']}{test_text}")
    return lines


def to_markdown(report: Report, sources: list[Path]) -> str:
    shown = display_frame(report)
    from kd_cli.results import _cell

    table = shown.astype(object).apply(lambda col: [_cell(v, col.name) for v in col]) if not shown.empty else shown
    parts = ["# kd report", "", "Sources: " + ", ".join(f"`{s}`" for s in sources), "",
             "Accuracy is top-1 % on the test split: `accuracy` after the last epoch, `best_accuracy` at the best "
             "epoch; mean ± sample standard deviation over the `n` seeds. The gain is the distilled student's "
             "accuracy minus the scratch student's, in points, with a 95% t confidence interval.", ""]
    parts += [table.to_markdown(index=False, disable_numparse=True) if not table.empty else "(no runs)", ""]
    for title, lines in (("KD gain over the scratch student", gain_sentences(report)),
                         ("Hyperparameter search", optuna_lines(report)),
                         ("Failed, unfinished or not started runs", problem_lines(report)),
                         ("Repeated runs, left out", repeat_lines(report))):
        if lines:
            parts += [f"## {title}", "", *[f"- {line}" for line in lines], ""]
    if report.plots:
        parts += ["## Plots", ""]
        # The report's folder: that of a plot outside report_curves/, or above the curves when they are all there is.
        base = next((p.parent for p in report.plots if p.parent.name != "report_curves"), report.plots[0].parent.parent)
        curves = []
        for plot in report.plots:
            rel = plot.relative_to(base) if plot.is_relative_to(base) else plot
            if plot.parent.name == "report_curves":
                curves.append(f"[{rel.stem}]({rel})")
            else:
                parts += [f"![{rel.stem}]({rel})", ""]
        if curves:
            parts += ["Training curves (loss and accuracy per epoch) of each run: " + ", ".join(curves), ""]
    return "\n".join(parts)


def to_json(report: Report) -> str:
    records = json.loads(report.frame.to_json(orient="records"))
    payload = {"rows": records, "keys": report.keys, "gains": report.gains, "optuna": report.optuna, "repeats": report.repeats,
               "not_started": report.not_started,
               "runs": [{"path": str(r.path), "status": r.status, "command": r.command, "error": r.error}
                        for r in report.runs],
               "plots": [str(p) for p in report.plots]}
    return json.dumps(_nan_to_none(payload), indent=2, default=str) + "\n"


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_report(report: Report, out: Path, sources: list[Path], plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from kd_cli import plots as figures

        report.plots = figures.make_plots(report, out)
    atomic_write_text(out / "report.csv", csv_text(report.frame))
    atomic_write_text(out / "report.md", to_markdown(report, sources))
    atomic_write_text(out / "report.json", to_json(report))
    return [out / "report.csv", out / "report.md", out / "report.json", *report.plots]


def print_report(report: Report, title: str, summarized: bool = False) -> None:
    """Print the table and its sentences; `summarized`: a sweep's summary, just printed, already
    gave each unfinished job's status and error, which are then counted, not repeated."""
    from kd_cli.results import print_table

    shown = display_frame(report)
    if shown.empty:  # a filter can leave no rows, and still name planned jobs that never started
        print(f"{title}: no runs")
    else:
        # display_frame chose the columns (a swept dataset among them); the keys tell apart rows of one model,
        # the main choices first: a split table repeats as many as half its width holds, in this order.
        keys = sorted(["role", "model", *report.keys], key=lambda k: NAMING.index(k) if k in NAMING else len(NAMING))
        print_table(shown, title=title, hide=(), keys=keys)
    problems = problem_lines(report)
    if summarized and problems:
        problems = [f"{_count(len(problems), 'job')}, each with its status and error in the summary above"]
    for heading, lines in (("KD gain", gain_sentences(report)), ("search", optuna_lines(report)),
                           ("not finished", problems), ("left out", repeat_lines(report))):
        for line in lines:
            print(f"{heading}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kd report",
        description="One table (and plots) over kd run and sweep folders: seeds pooled as mean ± std (n), "
                    "last- and best-epoch accuracy, costs, and the KD gain over scratch with a 95% CI.",
        epilog="examples:\n  kd report outputs/distill-multirun/2026-11-22_10-00-00\n"
               "  kd report outputs --filter role=student_kd --sort=-accuracy\n"
               "  kd report outputs/distill outputs/train --format md --out reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders, sweep folders, or folders holding them")
    parser.add_argument("--format", choices=("table", "csv", "md", "json"), default="table",
                        help="what to print: a table (default), or the report as csv / md / json on stdout")
    parser.add_argument("--sort", metavar="KEY", help="sort by a column; comma-separated for several, a leading - for descending: --sort=-accuracy")
    parser.add_argument("--filter", metavar="KEY=VALUE", action="append", default=[],
                        help="keep runs whose KEY (a column or any config key, e.g. data.fraction) equals VALUE; repeatable")
    parser.add_argument("--out", type=Path, help="folder for report.csv/.md/.json and the plots (default: the first PATH)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv[:-1]):  # `--sort -accuracy`: argparse would take -accuracy for an option
        if word == "--sort" and argv[i + 1].startswith("-"):
            argv[i: i + 2] = [f"--sort={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"kd: error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        measured = []
        runs = find_runs(args.paths, measured)
        if not runs and measured:
            commands = " and ".join(sorted({f"kd {run.command}" for run in measured}))
            raise ReportError(f"{', '.join(map(str, args.paths))} holds only {commands} measurements, which their "
                              f"own results.md shows; kd report reads the runs of kd train and kd distill "
                              f"(point it at outputs/ or a run or sweep folder)")
        if not runs:
            raise ReportError(f"no kd train or distill runs under {', '.join(map(str, args.paths))} "
                              f"(a run folder has results.json, error.txt or .hydra/)")
        report = build_report(runs, args.filter, args.sort, sources=args.paths)
        first = args.paths[0]
        # A filtered report is a view: it goes where --out says, never over the report of the PATH itself.
        out = args.out or (None if args.filter else first if first.is_dir() else first.parent)
        if out is not None:
            check_writable(out, "the report folder", "--out DIR")
            written = write_report(report, out, args.paths, plots=not args.no_plots)
    except (ReportError, KdError) as e:
        print(e, file=sys.stderr)
        return 1
    if out is None:
        note = "filtered: no file written (--out DIR writes the report files there)"
    else:
        note = f"report: {out / 'report.md'} (.csv, .json), {_count(len(written) - 3, 'plot')}"
    if args.format == "table":
        print_report(report, title=f"kd report: {runs_title(report)}")
    elif args.format == "csv":
        sys.stdout.write(csv_text(report.frame))
    elif args.format == "md":
        sys.stdout.write(to_markdown(report, args.paths))
    else:
        sys.stdout.write(to_json(report))
    print(note, file=sys.stderr)  # what was written, with every format: stdout may be going into a file
    return 0


def report_sweep(sweep_dir: Path) -> Report | None:
    """The report of one sweep, written into it and printed: the end of `kd COMMAND -m ...`."""
    runs = find_runs([Path(sweep_dir)])
    if not runs:
        return None
    report = build_report(runs)
    write_report(report, Path(sweep_dir), [Path(sweep_dir)])
    print_report(report, title=f"report of sweep {sweep_dir}: {runs_title(report)}", summarized=True)
    log.info("report: %s (.csv, .json) and %d plots", Path(sweep_dir) / "report.md", len(report.plots))
    return report
