"""Checks made before Hydra starts a run: every problem becomes one line and nothing is written.

Hydra reports composition errors over several lines (with its search path), and would only meet a
bad value of a sweep when that job starts, hours in. So the command line is composed here first,
every combination of a grid sweep included, and checked by `config.validate`.
"""

import copy
import difflib
import functools
import itertools
import os
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationResolutionError

from kd_cli.atomic import check_writable
from kd_cli.config import ignored_settings, scheme_option_error, validate
from kd_cli.data import find_files
from kd_cli.engine import resolve_device
from kd_cli.errors import KdError, UsageError
from kd_cli.losses import LOSSES
from kd_cli.store import check_made_for, load_checkpoint, named_file

# Hydra flags that do not run anything (or run with Hydra's own handling), as split_args names them.
_PASSIVE_FLAGS = ("--help", "--hydra-help", "--version", "--info", "--cfg", "--shell-completion", "--package", "--resolve")
# Hydra runs one of these per command line, and refuses two with a traceback; named as users type them.
_MODES = {"run": "--run", "multirun": "-m", "cfg": "--cfg", "info": "--info", "shell_completion": "--shell-completion"}
# Set for the sweeps a seed experiment runs as child processes: each runs as a plain sweep, and the
# parent has already warned about its command line.
EXPERIMENT_PART_ENV = "KD_EXPERIMENT_PART"
# Config groups whose default is no config (conf/distill.yaml): `experiment=null` chooses that default,
# and Hydra would refuse it with a traceback, so it is left out as a choice already made.
_NULL_GROUPS = ("experiment", "hparams_search")
MAX_GRID = 500  # combinations checked one by one; larger grids are checked on their first combination


def parse_overrides(overrides: list[str], conf_dir: str | None = None) -> list:
    """Hydra's parse of `overrides`; with `conf_dir`, a glob() sweep can list the config groups it picks from."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(conf_dir)) if conf_dir else None
    try:
        return OverridesParser.create(config_loader=loader).parse_overrides(overrides)
    except OverrideParseException as e:
        # A shell expands no `~` after `data.root=` (a dot is no variable name's), and Hydra cannot read it.
        home = next((o.partition("=") for o in overrides if "=~" in o), None)
        hint = f"; quote a value that starts with ~: \"{home[0]}='{home[2]}'\"" if home else ""
        raise KdError(f"cannot read the overrides: {str(e).splitlines()[0]}{hint}") from None


# What ignored_settings' answers hang on: with one of these swept, each combination must be checked.
_DECIDING = ("alpha", "loss", "scheme", "train.optimizer", "train.schedule", "teacher_recipe", "experiment")


_PARAMS = "hydra.sweeper.params."
_ABSENT = object()  # OmegaConf.select's answer for a key the config lacks (None is a value it may have)


def _search_space(parsed: list) -> list:
    """The overrides that set the sweeper's `hydra.sweeper.params`."""
    return [o for o in parsed if o.get_key_element().lstrip("+").startswith(_PARAMS)]


def _with_sweeper_params(parsed: list, command: str, conf_dir: str, compositions: dict) -> list:
    """`parsed` after the sweeper's `hydra.sweeper.params` that the command line does not set, as
    Hydra's sweepers take them: an Optuna search space is checked at its ends like a range typed."""
    space = _search_space(parsed)
    try:
        cfg = _composed(command, [o.input_line for o in parsed if not o.is_sweep_override() and o not in space],
                        conf_dir, compositions)
    except HydraException:
        return parsed  # the combinations meet the same error, and explain it
    if not _searches(cfg):  # Hydra's basic sweeper has no search space, and takes no range
        ranged = [*space, *(o for o in parsed if o.is_interval_sweep())]
        if ranged:
            key = ranged[0].get_key_element().lstrip("+").removeprefix(_PARAMS)
            raise KdError(f"{ranged[0].input_line} is a search space, which only hparams_search=optuna searches: add "
                          f"hparams_search=optuna, or sweep a list ({key}=0.1,0.5) or range(START,STOP,STEP)")
        return parsed
    params = dict(OmegaConf.select(cfg, "hydra.sweeper.params") or {})
    for override in space:  # `hydra.sweeper.params.T=interval(1,4)` sets a param (the shell took its quotes)
        key, _, value = override.input_line.lstrip("+").partition("=")
        params[key.removeprefix(_PARAMS)] = value
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    extra = [f"{key}={value}" for key, value in params.items() if key not in given]
    try:
        return parse_overrides(extra, conf_dir) + parsed
    except KdError as e:
        raise KdError(f"hydra.sweeper.params: {e.reason}") from None


def _check_no_lists(parsed: list, cfg, shown: bool, command: str, conf_dir: str) -> None:
    """A list or range of values (T=1,2) sweeps only with -m; Hydra's own refusal takes six lines."""
    listed = next((o for o in parsed if o.is_sweep_override() and o.get_key_element() != "experiment"
                   and not o.get_key_element().startswith("hydra.")), None)
    if listed is None:
        return
    experiment = OmegaConf.select(cfg, "preset.name") if OmegaConf.select(cfg, "preset.runs") else None
    if experiment:  # preset_of refuses -m for an experiment; its sweeps are its own
        raise KdError(f"experiment={experiment} runs its own sweeps: give each key one value, not {listed.input_line}; "
                      f"to repeat it with another seed, run `kd distill experiment={experiment} seed=1`")
    fix = "give each key one value" if shown else "add -m to sweep over them"
    key = listed.get_key_element()
    as_list = (f"{key}=[{','.join(listed.sweep_string_iterator())}]"
               if listed.is_discrete_sweep() and _may_hold_a_list(command, conf_dir, key) else None)
    kind = "a range" if listed.is_interval_sweep() else "a list"
    raise KdError(f"{listed.input_line} is {kind} of values: {fix}" + (f", or write a list as {as_list}" if as_list else ""))


def _may_hold_a_list(command: str, conf_dir: str, key: str) -> bool:
    """Whether `key` may be written as a list: a list or null by default (T=1,2 is no list of T's)."""
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        value = OmegaConf.select(compose(command), key.lstrip("+~"), default=None)
    return value is None or OmegaConf.is_list(value)


def _check_train_keys(parsed: list, conf_dir: str) -> None:
    """An experiment brings kd distill's keys into kd train's config; typed, they still change nothing."""
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        train_roots = set(compose("train"))
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        root = key.split(".")[0]
        if root not in train_roots and root not in ("experiment", "hydra", "hparams_search") and "/" not in key:
            raise KdError(f"'{key}' is a setting of kd distill, not of kd train, which trains the teacher and the "
                          f"student from labels alone")


def _check_deleted_keys(parsed: list, command: str) -> None:
    """kd reads every key of its config, and a run without one would stop with a traceback once Hydra had made
    its folder. `~KEY` may remove kd train's teacher or student (it then trains the other), a group that
    is empty by default, and Hydra's own keys (`~hydra.sweeper.params.T`)."""
    for override in parsed:
        key = override.key_or_group
        if (not override.is_delete() or key.split(".")[0] == "hydra" or "/" in key or key in _NULL_GROUPS
                or (command == "train" and key in ("teacher", "student"))):
            continue
        if key in ("teacher", "student"):
            does = ("trains the student" if key == "student"
                    else "keeps a teacher in its config (a loss or scheme that reads none, loss=ce or scheme=self, "
                         "ignores it)")
            raise KdError(f"kd distill {does}: drop '~{key}'; '~teacher' and '~student' are for kd train, to train "
                          f"one model")
        raise KdError(f"'~{key}' removes a setting kd {command} reads; drop it, or give {key} another value "
                      f"(`kd {command} --cfg job` lists them)")


def _searches(cfg) -> bool:
    """Whether the sweeper is Optuna's (hparams_search=optuna), which searches ranges."""
    return "optuna" in str(OmegaConf.select(cfg, "hydra.sweeper._target_") or "").lower()


def _check_search(cfg, multirun: bool, command: str) -> None:
    """An Optuna search needs -m to search at all, and a validation split to score its trials on."""
    if not _searches(cfg):
        return
    if not multirun:
        raise KdError(f"hparams_search runs many trials, each a run: add -m (kd {command} -m hparams_search=optuna ...)")
    if not OmegaConf.select(cfg, "data.val_fraction"):
        raise KdError("hparams_search scores each trial on a validation split held out of the training set; "
                      "set data.val_fraction above 0 (hparams_search=optuna sets 0.1)")
    settings = {}
    for key in ("n_trials", "n_jobs", "storage"):
        try:
            settings[key] = cfg.hydra.sweeper.get(key)
        except InterpolationResolutionError as e:  # Hydra's own keys are not resolved by validate
            raise KdError(_bad_interpolation(e, f"hydra.sweeper.{key}")) from None
    for key in ("n_trials", "n_jobs"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # Optuna fails after its sweep began
            raise KdError(f"hydra.sweeper.{key} must be a whole number >= 1, got {value!r}")
    if settings["storage"]:
        _check_storage(str(settings["storage"]))


def _check_storage(url: str) -> None:
    """An Optuna storage that cannot open fails deep in SQLAlchemy, with a page of traceback. Only a URL's
    form and an SQLite file's folder are checked: a database server may answer later."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "such as hydra.sweeper.storage=sqlite:///optuna.db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise KdError(f"hydra.sweeper.storage={url} is no database URL; give one {example}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).resolve().parent  # as SQLite opens it: it expands no ~
        if not folder.is_dir():
            raise KdError(f"hydra.sweeper.storage={url}: the folder {folder} does not exist; create it or give another "
                          f"file, {example}")


def _bad_interpolation(error: InterpolationResolutionError, key: str | None = None) -> str:
    """`key` where OmegaConf's error does not name it (a value read with .get)."""
    return f"{key or error.full_key}: {str(error).splitlines()[0]}; fix the ${{...}} in that value"


def _sweeps_a_deciding_key(parsed: list) -> bool:
    keys = (o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override())
    return any(key == d or key.startswith(d + ".") for key in keys for d in _DECIDING)


def _combinations(parsed: list) -> list[list[str]]:
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            if override.is_interval_sweep():  # an Optuna range cannot be enumerated: check both ends
                bounds = override.value()
                choices.append([f"{key}={bounds.start}", f"{key}={bounds.end}"])
            else:
                choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    grid = list(itertools.islice(itertools.product(*choices), MAX_GRID + 1))
    return [list(c) for c in (grid if len(grid) <= MAX_GRID else grid[:1])]


def _composed(command: str, combination: list[str], conf_dir: str, compositions: dict):
    """The config Hydra composes for `combination`.

    Composing reads every yaml again, 0.15-0.3 s each time: a 60-job grid took 10 s. Hydra sets plain
    values (alpha=0.5, train.lr=0.1) last, on the config its group choices (loss=, scheme=, +/~ keys)
    composed. So the combinations that choose the same options share one composition in
    `compositions`, and each gets a copy with its values set by Hydra's own step.
    """
    parsed = parse_overrides(combination)
    base = next(iter(compositions.values()), None)
    plain = [o for o in parsed if base is not None and _sets_a_value(o, base)]
    choices = tuple(o.input_line for o in parsed if o not in plain)
    if choices not in compositions:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            try:
                compositions[choices] = compose(command, list(choices), return_hydra_config=True)
            except ValueError:  # Hydra's refusal of a config group set to null, with a traceback
                if (reason := _null_group(parsed, command)) is None:
                    raise
                raise KdError(reason) from None
    cfg = copy.deepcopy(compositions[choices])
    ConfigLoaderImpl._apply_overrides_to_config(plain, cfg)
    return cfg


def _null_group(parsed: list, command: str) -> str | None:
    """Why `GROUP=null` cannot be composed, or None for no such override (called inside initialize_config_dir):
    a config group takes one of its options."""
    choices = compose(command, return_hydra_config=True).hydra.runtime.choices
    group = next((o.key_or_group for o in parsed if o.key_or_group in choices and not o.is_delete() and o.value() is None),
                 None)
    if group is None:
        return None
    if command == "train" and group in ("teacher", "student"):
        return f"{group}=null is no model; to train only the other one, write '~{group}' (quoted in a shell)"
    options = GlobalHydra.instance().config_loader().get_group_options(group)
    return f"{group}=null chooses no {group}, and kd {command} needs one; choose one of: {', '.join(options)}"


def _sets_a_value(override, cfg) -> bool:
    """Whether `override` only sets a value of `cfg` (composed with another value), choosing no config."""
    key = override.key_or_group
    if override.is_delete() or override.is_add() or override.is_force_add() or override.package is not None or "/" in key:
        return False
    if key in cfg.hydra.runtime.choices:  # a config group (loss=, scheme=, experiment=)
        return False
    return "." in key or (key in cfg and not OmegaConf.is_config(cfg[key]))


def _all_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg`, groups of keys included; nothing resolved (hydra.sweep.subdir reads
    hydra.job.num, set only in a job)."""
    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _all_keys(value, f"{prefix}{key}.")
    return keys


def _explain(error: HydraException, command: str, conf_dir: str, overrides: list[str]) -> str:
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.partition("/")
        return f"unknown {group} '{name}'; choose one of: {', '.join(error.options)}"
    message = str(error)
    # `+alpha=0.5`, `+experiment=demo`: Hydra's answer is about appending, or a defaults list's yaml.
    if added := re.match(r"Could not append to config\. An item is already at '(.+)'\.|Multiple values for (\S+)\. ", message):
        key = added[1] or added[2]
        typed = next((o for o in overrides if o.startswith("+") and o.lstrip("+").split("=")[0] == key), None)
        if typed:
            return f"{typed} adds {key}, which the config has already: drop the + ({typed.lstrip('+')})"
    if nested := re.match(rf"Error merging override \+*({re.escape(_PARAMS)}[^=]+)=", message):  # with a +
        return _nested_param(nested[1])
    if message.startswith("Could not override '"):
        key = message.split("'")[1]
        if key.startswith("teacher_recipe."):  # its keys are the user's to add
            return f"teacher_recipe has no {key.removeprefix('teacher_recipe.')} to change yet: add it with +{key}=VALUE"
        # The keys of the config the user chose (loss=at has loss.weight, the default loss=kd has not).
        others = [o for o in overrides if o.lstrip("+~").split("=")[0] != key]
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            try:
                cfg = compose(command, others)
            except HydraException:
                cfg = compose(command)
        if key.startswith("loss.") and "loss" in cfg:
            try:  # a loss takes exactly its yaml's keys, so `+loss.KEY=` would not help: list what it takes
                LOSSES[cfg.loss.name].check_options([key.split(".")[1]])
            except KdError as e:
                return e.reason
        if key.startswith("scheme.") and "scheme" in cfg:  # the same for a scheme's options (its yaml's keys)
            return scheme_option_error(key.split(".", 1)[1], cfg.scheme.name)
        if key.startswith(_PARAMS):
            return _nested_param(key)
        if distill_only := _distill_setting(key, command, conf_dir):
            return distill_only
        root = key.split(".")[0]
        hint = _closest(key, cfg, conf_dir, command)
        # A new key is worth adding only to Hydra's own config (a launcher's option): kd would not read it.
        new = f"; +{key}=... adds it" if root == "hydra" else ""
        return f"unknown key '{key}'{hint} (`kd {command} --cfg job` lists every key{new})"
    return message.strip().splitlines()[0]


def _nested_param(key: str) -> str:
    """Why `hydra.sweeper.params.train.lr=...` cannot be given: the dots would nest its parts under params."""
    param = key.removeprefix(_PARAMS)
    return (f"'{key}' cannot be set from the command line; to search over {param}, give it a range: "
            f"{param}='interval(LOW, HIGH)' or {param}='tag(log, interval(LOW, HIGH))'")


def _distill_setting(key: str, command: str, conf_dir: str) -> str | None:
    """Why kd train refuses `key`, when it is a setting of kd distill's."""
    root = key.split(".")[0]
    if command != "train" or root == "hydra":
        return None
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        if root in compose("train"):
            return None
        distill = compose("distill", return_hydra_config=True)
    # Its config groups too: hparams_search is one, and no key of the composed config.
    if root in distill.hydra.runtime.choices or root in distill:
        return (f"'{key}' is a setting of kd distill, not of kd train, which trains the teacher and the student "
                f"from labels alone")
    return None


def _closest(key: str, cfg, conf_dir: str, command: str) -> str:
    """"; did you mean 'KEY'?" for the real key or config group nearest to a misspelled `key`, or ""."""
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        hydra_cfg = compose(command, return_hydra_config=True).hydra
    if key.startswith("hydra."):
        known = [f"hydra.{k}" for k in _all_keys(hydra_cfg)]
    else:  # the config groups too: experiment= and hparams_search= are no key of the composed config
        known = [*(k for k in _all_keys(cfg) if k.split(".")[0] != "hydra"),
                 *(g for g in hydra_cfg.runtime.choices if not g.startswith("hydra/"))]
    # Neither the key that `+key=` added nor the group holding it (teacher for teacher.foo) is a suggestion.
    known = [k for k in known if k != key and not key.startswith(f"{k}.")]
    same_letters = [k for k in known if k.lower() == key.lower()]  # t= for T=, which difflib scores 0
    # A real key under another parent: loss.T is T, train.alpha is alpha, data.epochs is train.epochs.
    leaf = key.rsplit(".", 1)[-1].lower()
    same_leaf = [k for k in known if "." in key and k.rsplit(".", 1)[-1].lower() == leaf]
    close = same_letters or same_leaf[:2] or difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""


def _check_added_keys(parsed: list, cfg, combination: list[str], command: str, conf_dir: str) -> None:
    """`+KEY=` adds a key that kd never reads (it reads only the keys its config has): a misspelled
    `+alpah=0.5` would run with the config's alpha, unseen. `++KEY=` sets a key the config has and
    adds one it lacks (checked against `combination` without it). Hydra's own keys (a launcher's
    options) and config groups may be added."""
    for override in parsed:
        key = override.key_or_group
        # teacher_recipe holds data.* / train.* keys of its own choosing, which validate checks.
        added_to_kd = (key.split(".")[0] not in ("hydra", "teacher_recipe") and "/" not in key
                       and key not in cfg.hydra.runtime.choices)
        if not added_to_kd or not (override.is_add() or override.is_force_add()):
            continue
        if override.is_force_add():
            others = [c for c in combination if c.lstrip("+~").split("=")[0] != key]
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
                if OmegaConf.select(compose(command, others), key, default=_ABSENT) is not _ABSENT:
                    continue
        if distill_only := _distill_setting(key, command, conf_dir):
            raise KdError(distill_only)
        plus = "++" if override.is_force_add() else "+"
        raise KdError(f"unknown key '{key}'{_closest(key, cfg, conf_dir, command)} ({plus}{key}=... adds a key that kd "
                      f"does not read; `kd {command} --cfg job` lists every key)")


def _settings_given(parsed: list) -> dict[str, tuple[str, str]]:
    """Settings as the command line sets them: key -> (the override as typed, "value" / "sweep" / "range")."""
    given = {}
    for override in parsed:
        if not override.is_delete():
            kind = "range" if override.is_interval_sweep() else "sweep" if override.is_sweep_override() else "value"
            given[override.get_key_element().lstrip("+")] = (override.input_line, kind)
    return given


def _ignored_warnings(unused: dict[str, dict[str, str]], given: dict, searched: set[str]) -> list[str]:
    """One line per setting that every combination ignores (for alpha and T: every combination with
    that loss). Warnings, not errors: `loss=kd,at T=1,4` is a sensible sweep for one of its losses."""
    lines = []
    for ignored in unused.values():
        for key, subject in ignored.items():
            typed, kind = given.get(key, (None, None))
            what = "student" if key in ("alpha", "T") else "model"
            if kind == "range":
                effect = f"searching it wastes trials; drop {typed}"
            elif typed:
                effect = f"{typed} " + (f"trains the same {what} for every value" if kind == "sweep" else "changes nothing")
            elif key in searched:
                effect = f"searching it wastes trials; drop it with '~hydra.sweeper.params.{key}'"
            else:
                continue
            lines.append(f"kd: warning: {subject} does not use {key}, so {effect}")
    return lines


def run_warnings(cfg, overrides: list[str]) -> list[str]:
    """The warnings for one run's own overrides (a sweep job's values), for its log file: preflight
    printed the command line's before the run began, and the log is what is read later."""
    given = _settings_given(OverridesParser.create().parse_overrides(overrides))
    return _ignored_warnings({"run": ignored_settings(cfg)}, given, searched=set())


def _unused_in_all(unused: dict[str, dict[str, str]], ignored: dict[str, str], cfg) -> None:
    """Narrow `unused` to what this combination ignores (`ignored`) too; alpha and T are kept apart per loss."""
    for group in ("train", *([f"loss={cfg.loss.name}"] if "loss" in cfg else [])):
        mine = {k: v for k, v in ignored.items() if (k in ("alpha", "T")) == (group != "train")}
        unused[group] = {k: _both(v, mine[k]) for k, v in unused.get(group, mine).items() if k in mine}


def _check_teacher_checkpoint(cfg, ignored: dict[str, str], checkpoints: dict[str, dict]) -> None:
    """The teacher.checkpoint a run reads, read now: a missing, corrupt or other model's file would
    otherwise fail the run after its data had loaded, and leave a failed run's folder behind."""
    value = OmegaConf.select(cfg, "teacher.checkpoint")
    if cfg.get("command") != "distill" or not value or "teacher.checkpoint" in ignored:
        return
    if str(value) not in checkpoints:
        checkpoints[str(value)] = load_checkpoint(named_file("teacher.checkpoint", value))
    check_made_for(checkpoints[str(value)], Path(value), cfg.teacher, cfg)


def _dataset_of(cfg, multirun: bool) -> tuple | None:
    """What `_check_datasets` looks for; None for a SLURM sweep, whose jobs may read data.root on their own nodes."""
    if multirun and "Slurm" in str(OmegaConf.select(cfg, "hydra.launcher._target_")):
        return None
    return OmegaConf.to_yaml(cfg.dataset), str(cfg.data.root), bool(cfg.data.download)


def _check_datasets(datasets: set) -> None:
    """Each dataset's files, found now (or downloaded, once for a whole sweep), last of the checks since
    a download takes a while: a missing dataset would otherwise fail every job after Hydra had made its folder."""
    for dataset_yaml, root, download in sorted(d for d in datasets if d is not None):
        find_files(OmegaConf.create(dataset_yaml), Path(root).expanduser(), download)


def _both(subject: str, other: str) -> str:
    """`train.schedule=cosine` and `train.schedule=constant` -> `train.schedule=cosine,constant`:
    a sweep over the deciding setting, every value of which ignores the key."""
    key, _, values = subject.partition("=")
    other_key, _, value = other.partition("=")
    if subject == other or key != other_key or " " in subject + other:
        return subject
    return f"{key}={','.join(dict.fromkeys([*values.split(','), value]))}"


@functools.cache
def _hydra_options() -> dict:
    """Hydra's command-line options, each name (-m, --multirun) -> its argparse action."""
    from hydra._internal.utils import get_args_parser

    return {option: action for action in get_args_parser()._actions for option in action.option_strings}


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags, each with its value and under its long name, the overrides) of a command line.

    kd takes `-m` and `--cfg job` anywhere on the line; Hydra's argparse reads no override after a
    flag, so `kd distill loss=at -m T=1,2` would stop at "unrecognized arguments: T=1,2". A flag Hydra
    does not know is refused here, before any check that could take a while (a dataset's download).
    """
    actions = _hydra_options()
    flags, overrides, modes, i = [], [], [], 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not arg.startswith("-"):
            nulled = next((group for group in _NULL_GROUPS if arg.lower() == f"{group}=null"), None)
            if nulled:  # the group's default, chosen last: an earlier choice of it is dropped too
                overrides = [o for o in overrides if not o.startswith(f"{nulled}=")]
            else:
                overrides.append(arg)
            continue
        typed, given, value = arg.partition("=")
        action = actions.get(typed)
        if action is None and typed.startswith("--"):  # argparse takes an unambiguous prefix: --multi for --multirun
            prefixed = {a for o, a in actions.items() if o.startswith(typed)}
            action = prefixed.pop() if len(prefixed) == 1 else None
        if action is None:
            close = difflib.get_close_matches(typed, [o for o in actions if o.startswith("--")], n=1)
            raise UsageError(f"unknown flag {typed}" + (f"; did you mean {close[0]}?" if close else "") +
                             f" (kd takes Hydra's flags: {', '.join(sorted({a.option_strings[0] for a in actions.values()}))})")
        name = action.option_strings[0]
        if name in ("--config-path", "--config-name"):  # kd checks the config of its command, from its own conf/
            raise UsageError(f"{typed} is not taken: each kd command composes its own config from kd's conf/ "
                             f"(conf/train.yaml, conf/distill.yaml); choose a preset with experiment=NAME")
        if action.dest in _MODES:
            modes.append(_MODES[action.dest])
        if given:
            flags.append(f"{name}={value}")
        elif action.nargs is None:  # exactly one value
            if i == len(args) or "=" in args[i] or (action.choices and args[i] not in action.choices):
                raise UsageError(f"{typed} takes a value" + (f": {', '.join(action.choices)}" if action.choices else ""))
            flags += [name, args[i]]
            i += 1
        elif action.nargs == "?" and i < len(args) and args[i] in action.choices:
            flags += [name, args[i]]
            i += 1
        elif action.nargs == "?":  # its value spelled out: Hydra's argparse would take the first override for it
            flags.append(f"{name}={action.const}")
        else:
            flags.append(name)
    modes = list(dict.fromkeys(modes))
    if "-m" in modes and len(modes) > 1:
        other = next(m for m in modes if m != "-m")
        raise KdError(f"-m and {other} do not combine: {other} is about one run; drop -m and give each key one "
                      f"value (each job of a sweep saves its config in its .hydra/ folder)")
    if len(modes) > 1:
        raise KdError(f"{' and '.join(modes)} do not combine; use one at a time")
    completions = ("install=", "uninstall=", "query=")
    if "--shell-completion" in modes and not any(o.startswith(completions) for o in overrides):
        raise UsageError("--shell-completion takes what to do: install=bash (or zsh, fish), uninstall=bash or query=bash")
    return flags, overrides


def settings_of(args: list[str]) -> dict[str, str]:
    """What a command line sets, whatever the order of its words: each key's last value (`a=1 a=2`
    sets a to 2). resume=, Hydra's flags and Hydra's own overrides (hydra/launcher=...,
    hydra.launcher.n_jobs=...) do not change what a run computes."""
    kept = (o for o in split_args(args)[1] if not o.lower().startswith(("resume=", "hydra/", "hydra.")))
    return {key: value for key, _, value in (o.partition("=") for o in kept)}


def preflight(command: str, args: list[str], conf_dir: str, warn: bool = True, data: bool = True):
    """Raise KdError (one line) if the command line cannot run; return its config (that of the last
    combination checked, for a sweep), or None for Hydra's flags that run nothing. With `warn`, print
    a warning for a setting the run ignores: an alpha or T that the chosen loss ignores, momentum with Adam.
    With `data`, find the datasets the runs read, or download them."""
    flags, overrides = split_args(args)
    # --cfg prints the config a run would have: checked as the run would be, though nothing runs.
    shown = "--cfg" in flags
    if not shown and any(f.split("=")[0] in _PASSIVE_FLAGS for f in flags):
        return None
    warn = warn and not shown
    multirun = "--multirun" in flags
    parsed = parse_overrides(overrides, conf_dir)
    _check_deleted_keys(parsed, command)
    unused: dict[str, dict[str, str]] = {}  # "train" or a loss -> the settings no combination of it uses
    searched: set[str] = set()  # settings in hparams_search's space
    compositions: dict[tuple, object] = {}
    checkpoints: dict[str, dict] = {}  # teacher.checkpoint -> its content, read once for all combinations
    datasets: set[tuple | None] = set()  # the datasets the combinations read
    # The sweeper's own params (hparams_search's space, say) are swept too; a space given without -m is checked
    # for a sweeper that has one, and then refused for want of -m.
    swept = _with_sweeper_params(parsed, command, conf_dir, compositions) if multirun or _search_space(parsed) else parsed
    combinations = _combinations(swept)
    # A grid over MAX_GRID is checked on its first combination, which cannot say what the others ignore.
    warn = warn and not (len(combinations) == 1 and _sweeps_a_deciding_key(swept))
    for number, combination in enumerate(combinations):
        try:
            cfg = _composed(command, combination, conf_dir, compositions)
        except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
            raise KdError(_explain(e, command, conf_dir, combination)) from None
        if number == 0 and not multirun:  # before a value of the list is checked as if it were the key's one value
            _check_no_lists(parsed, cfg, shown, command, conf_dir)
        try:
            validate(cfg)
        except InterpolationResolutionError as e:  # `train.lr=${oops}`: OmegaConf meets it where a value is read
            raise KdError(_bad_interpolation(e)) from None
        ignored = ignored_settings(cfg)
        # A loss option can decide it (fitnets' stage1_epochs, combo's terms): unused only if unused everywhere.
        _unused_in_all(unused, ignored, cfg)
        if not shown:
            _check_teacher_checkpoint(cfg, ignored, checkpoints)
            datasets.add(_dataset_of(cfg, multirun))
        if multirun:
            searched |= set(OmegaConf.select(cfg, "hydra.sweeper.params") or {})
    _check_added_keys(parsed, cfg, combination, command, conf_dir)
    if command == "train" and any(o.get_key_element() == "experiment" for o in parsed):
        _check_train_keys(parsed, conf_dir)
    _check_search(cfg, multirun or shown, command)  # --cfg shows a search's config, which has no -m
    if shown:
        return None
    if warn and os.environ.get(EXPERIMENT_PART_ENV) != "1":
        for line in _ignored_warnings(unused, _settings_given(parsed), searched):
            print(line, file=sys.stderr)
    resolve_device(cfg.device)
    if OmegaConf.select(cfg, "hydra.job.chdir"):  # relative store_dir and data.root would then start in each run's folder
        raise KdError("hydra.job.chdir=true is not taken: kd reads store_dir and data.root from the folder it started in "
                      "(a run in its own folder would find an empty model store); drop it")
    try:
        run_root = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    except InterpolationKeyError as e:
        raise KdError(_bad_interpolation(e)) from None
    except InterpolationResolutionError:  # `${hydra:job.name}`, which only a running job resolves
        run_root = None
    if isinstance(run_root, str):
        check_writable(run_root, "the run folder", f"hydra.{'sweep' if multirun else 'run'}.dir=PATH (or start kd in another folder)")
        if not multirun and Path(run_root).is_dir():
            from kd_cli.run import check_run_folder

            check_run_folder(Path(run_root), cfg)
        if multirun and Path(run_root).is_dir():
            from kd_cli.sweep import check_sweep_folder, planned_jobs

            task = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
            loader = ConfigLoaderImpl(config_search_path=create_config_search_path(conf_dir))
            plan = planned_jobs(cfg, task, loader)
            if plan is not None:  # an Optuna search numbers its trials as it goes: nothing to compare
                check_sweep_folder(Path(run_root), plan)
    # `kd train` stores what it trains; `kd distill` can read a store it may not write to (a colleague's), and
    # checks it just before storing a model it has to train (train_missing=true, a chain's links).
    store_dir = OmegaConf.select(cfg, "store_dir", throw_on_resolution_failure=False)  # None: ${hydra:...}, the job's
    if command == "train" and store_dir is not None:
        check_writable(Path(store_dir).expanduser(), "the model store", "store_dir=PATH")
    if data:
        _check_datasets(datasets)
    return cfg
