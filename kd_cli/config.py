"""Config groups that come from code, and the checks Hydra cannot express in yaml.

`teacher` and `student` are two config groups filled from one model catalogue, so every model is
available in both roles and a new model needs no yaml.
"""

import difflib
import functools
import json
import logging
import math
from numbers import Real
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kd_cli.errors import KdError
from kd_cli.identity import shipped_dataset
from kd_cli.losses import build_loss
from kd_cli.models import CATALOGUE, ImageSpec, build_model


# Keys that may differ between a run and its resumption without changing what it trains: `measure`
# only times the models (and gained keys since, which must not make earlier runs another config).
RUN_ONLY = ("resume", "device", "measure")
# NumPy takes seeds below 2**32, and models of a run are seeded from the run's seed plus an offset.
MAX_SEED = 2**31 - 1


def run_identity(cfg) -> dict:
    """The composed config without the keys that do not change what a run computes."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in RUN_ONLY}


def register_model_groups() -> None:
    store = ConfigStore.instance()
    for arch in CATALOGUE:
        node = {"arch": arch, "checkpoint": None}
        if arch == "torchvision":
            node |= {"name": "resnet18", "weights": None}
        for group in ("teacher", "student"):
            store.store(group=group, name=arch, node=node)


def _number(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise KdError(f"{key} must be a number, got {value!r}")
    return value


def _integer(cfg, key: str, minimum: int):
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KdError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return value


CHOICES = {
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("cosine", "multistep", "constant"),
    "train.teacher_cache": ("auto", "on", "off"),
    "train.teacher_precision": ("auto", "fp32", "bf16"),
    "train.channels_last": ("auto", True, False),
    "train.amp": ("auto", True, False),
    "quant": (None, "qat"),
}
FLAGS = ("data.download", "data.augment", "overwrite", "resume", "deterministic", "train.compile", "train.nesterov",
         "train_missing", "measure.int8")


CACHE_NEEDS_FIXED_INPUTS = "train.teacher_cache=on needs fixed inputs; set data.augment=false or train.teacher_cache=auto"
COMPILE_WITH_HOOKS = "train.compile=true does not combine with losses that hook intermediate layers; set train.compile=false"
COMPILE_WITH_EXITS = ("train.compile=true does not combine with scheme=self, whose exits hook intermediate layers; "
                      "set train.compile=false")


def validate(cfg) -> None:
    """Reject values that would fail late or silently give a wrong table."""
    _check_finite(cfg)
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            spelled = ("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)  # as typed
            raise KdError(f"{key} must be one of {', '.join(spelled)}, got {value!r}")
    for key in FLAGS:
        value = OmegaConf.select(cfg, key, default=False)  # the default: a key of the other command's config
        if not isinstance(value, bool):
            raise KdError(f"{key} must be true or false, got {value!r}")
    _check_checkpoints(cfg)
    if cfg.get("command") == "train" and "teacher" not in cfg and "student" not in cfg:
        raise KdError("nothing to train: `~teacher` and `~student` remove both models; keep at least one")
    if _integer(cfg, "seed", 0) > MAX_SEED:
        raise KdError(f"seed must be at most {MAX_SEED}, got {cfg.seed}")
    _check_dataset(cfg.dataset)
    _integer(cfg, "train.epochs", 1)
    _integer(cfg, "train.batch_size", 2)  # a batch of one is never trained on: BatchNorm needs two images
    if "measure" in cfg:
        _integer(cfg, "measure.latency_runs", 1)
        _integer(cfg, "measure.latency_warmup", 0)
    for key in ("train.threads", "measure.threads"):
        if OmegaConf.select(cfg, key) is not None:
            _integer(cfg, key, 1)
    if cfg.get("command") == "distill" and cfg.train.teacher_cache == "on" and cfg.data.augment:
        raise KdError(CACHE_NEEDS_FIXED_INPUTS)  # engine.Teacher would say so only once the models are in place
    for key in ("train.teacher_cache_max_mb", "train.teacher_cache_disk_mb"):
        # disk_mb may be null (nothing saved, as 0); the cache's own limit must be a number.
        if (key.endswith("max_mb") or OmegaConf.select(cfg, key) is not None) and _number(cfg, key) < 0:
            raise KdError(f"{key} must be >= 0 (megabytes), got {OmegaConf.select(cfg, key)}")
    if _number(cfg, "train.lr") <= 0:
        raise KdError(f"train.lr must be > 0, got {cfg.train.lr}")
    if _number(cfg, "train.weight_decay") < 0:
        raise KdError(f"train.weight_decay must be >= 0, got {cfg.train.weight_decay}")
    if not 0 <= _number(cfg, "train.momentum") < 1:
        raise KdError(f"train.momentum must be in [0, 1), got {cfg.train.momentum}")
    if cfg.train.optimizer == "sgd" and cfg.train.nesterov is True and cfg.train.momentum == 0:
        raise KdError("train.nesterov=true needs train.momentum > 0 (Nesterov's is a kind of momentum)")
    if _number(cfg, "train.gamma") <= 0:
        raise KdError(f"train.gamma must be > 0 (the factor lr is multiplied by at each milestone), got {cfg.train.gamma}")
    milestones = OmegaConf.select(cfg, "train.milestones")
    if not OmegaConf.is_list(milestones) or not all(isinstance(m, Real) and not isinstance(m, bool) and 0 < m < 1
                                                    for m in milestones):
        raise KdError(f"train.milestones must be a list of fractions of train.epochs in (0, 1), such as "
                      f"'train.milestones=[0.5,0.75]', got {OmegaConf.to_container(milestones) if OmegaConf.is_list(milestones) else milestones!r}")
    for key in ("data.fraction", "data.test_fraction"):
        if not 0 < _number(cfg, key) <= 1:
            raise KdError(f"{key} must be in (0, 1], got {OmegaConf.select(cfg, key)}")
    if OmegaConf.select(cfg, "data.val_fraction") is not None and not 0 <= _number(cfg, "data.val_fraction") < 1:
        raise KdError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if "alpha" in cfg and not 0 <= _number(cfg, "alpha") <= 1:
        raise KdError(f"alpha must be in [0, 1] (the weight of the distillation term), got {cfg.alpha}")
    if "T" in cfg and _number(cfg, "T") <= 0:
        raise KdError(f"T must be > 0 (the softmax temperature), got {cfg.T}")
    for role in ("teacher", "student"):
        if OmegaConf.select(cfg, f"{role}.arch") == "torchvision":
            from kd_cli.models.torchvision_models import check_name

            check_name(cfg[role].name)
    # Every loss.* option checked now, not after the teacher has trained.
    loss_fn = build_loss(cfg) if "loss" in cfg else None
    if loss_fn is not None:
        loss_fn.check_classes(cfg.dataset.num_classes)
    hint_epochs = OmegaConf.select(cfg, "loss.stage1_epochs")
    if hint_epochs and hint_epochs >= cfg.train.epochs:
        raise KdError(f"loss.stage1_epochs={hint_epochs} covers every epoch of train.epochs={cfg.train.epochs}, so the "
                      f"student would never learn from the labels; use fewer hint epochs or more train.epochs")
    if cfg.train.get("compile") and loss_fn is not None:
        if loss_fn.hooks_layers:
            raise KdError(COMPILE_WITH_HOOKS)
        if OmegaConf.select(cfg, "scheme.name") == "self":
            raise KdError(COMPILE_WITH_EXITS)
    if "scheme" in cfg:
        _validate_scheme(cfg, loss_fn)
        if loss_fn is not None and loss_fn.hooks_layers and cfg.scheme.name in ("offline", "ta", "born_again"):
            _check_layers(cfg)
    if cfg.get("teacher_recipe"):
        recipe = teacher_config(cfg)
        try:
            validate(recipe)
        except KdError as e:  # `data.fraction must be in (0, 1]`, said of the run's own data.fraction, would mislead
            raise KdError(f"teacher_recipe: {e.reason}") from None
    if cfg.get("quant") == "qat":  # checked now, not after the fp32 student has trained
        _integer(cfg, "qat.epochs", 1)
        _integer(cfg, "qat.calibration_images", 1)
        if cfg.qat.lr is not None and _number(cfg, "qat.lr") <= 0:
            raise KdError(f"qat.lr must be > 0 (or null for train.lr / 10), got {cfg.qat.lr}")


def _check_finite(cfg) -> None:
    """Every number of the config, resolved: NaN passes every `x <= 0` check and inf is no setting, and
    either would fail late (a NaN loss blamed on train.lr). Resolving also meets a bad ${...} here."""
    for key in cfg:
        if key != "hydra":  # Hydra's own (hydra.sweep.subdir reads hydra.job.num, set only in a job)
            _check_finite_at(cfg, key, str(key))


def _check_finite_at(parent, key, name: str) -> None:
    try:
        value = parent[key]
    except InterpolationResolutionError as e:
        if "HydraConfig was not set" in str(e):  # ${hydra:runtime.cwd}: a running job resolves it
            return
        raise
    if OmegaConf.is_dict(value):
        for inner in value:
            _check_finite_at(value, inner, f"{name}.{inner}")
    elif OmegaConf.is_list(value):
        for i in range(len(value)):
            _check_finite_at(value, i, f"{name}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        hint = "; for no limit, give a large number" if value == math.inf and name.endswith("_mb") else ""
        raise KdError(f"{name} must be a finite number, got {value}{hint}")


def _check_dataset(dataset) -> None:
    """Its shape settings describe its files, and mean and std normalise each channel: a changed one would
    fail once the data had loaded (a convolution's channels, a label out of range) or train on NaN."""
    shipped = shipped_dataset(dataset.name)
    for key, minimum in (("channels", 1), ("image_size", 1), ("num_classes", 2)):
        value = dataset[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise KdError(f"dataset.{key} must be a whole number >= {minimum}, got {value!r}")
        if key in shipped and value != shipped[key]:
            raise KdError(f"dataset.{key}={value} does not describe the files of {dataset.name} ({key}: "
                          f"{shipped[key]}); leave it at {shipped[key]}")
    for key in ("mean", "std"):
        values = dataset[key]
        if (not OmegaConf.is_list(values) or len(values) != dataset.channels
                or not all(isinstance(v, Real) and not isinstance(v, bool) and (key == "mean" or v > 0) for v in values)):
            example = shipped.get(key) or [0.5] * dataset.channels
            raise KdError(f"dataset.{key} must be a list of {dataset.channels} number{'s' * (dataset.channels > 1)}, one "
                          f"per channel{' and each > 0' if key == 'std' else ''}, such as "
                          f"'dataset.{key}=[{','.join(map(str, example))}]'; got "
                          f"{OmegaConf.to_container(values) if OmegaConf.is_list(values) else values!r}")


def _check_layers(cfg) -> None:
    """The loss's layers on every (teacher, student) pair of the chain, with the models' initial weights:
    a misspelt path or an unmatched pairing would otherwise stop the run once its data had loaded, or
    every job of a sweep."""
    from kd_cli.schemes.chain import chain_configs

    models = [json.dumps(OmegaConf.to_container(m, resolve=True), sort_keys=True) for m in chain_configs(cfg)]
    loss = json.dumps(OmegaConf.to_container(cfg.loss, resolve=True), sort_keys=True)
    image = (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.num_classes)
    for teacher, student in zip(models, models[1:]):
        _attach_to_new_models(teacher, student, loss, image)


@functools.cache  # once per pair and loss: the combinations of an alpha x T grid share it
def _attach_to_new_models(teacher: str, student: str, loss: str, image: tuple) -> None:
    spec = ImageSpec(*image)
    # Without torchvision's pretrained weights: the layers are what is checked, and nothing is downloaded.
    student_model, teacher_model = (build_model(OmegaConf.create(json.loads(m)), spec, pretrained=False)
                                    for m in (student, teacher))
    # alpha and T change no layer; the run's own are checked on their own.
    loss_fn = build_loss(OmegaConf.create({"loss": json.loads(loss), "alpha": 0.5, "T": 4.0}))
    logging.disable(logging.WARNING)  # what attach says of sizes and memory, the run says
    try:
        loss_fn.attach(student_model, teacher_model, torch.zeros(2, spec.channels, spec.size, spec.size), 2)
    finally:
        logging.disable(logging.NOTSET)


def _check_checkpoints(cfg) -> None:
    """`kd train` trains both models and `kd distill` its student: a checkpoint given for one of them
    would be ignored, and the table would not be about the model the user meant."""
    command = cfg.get("command")
    for role in ("teacher", "student"):
        value = OmegaConf.select(cfg, f"{role}.checkpoint")
        if value is not None and not isinstance(value, str):  # as typed, it may have been a path: 0 would be ignored
            raise KdError(f"{role}.checkpoint must be a path, got {value!r}; a file name that Hydra reads as a number, "
                          f"true or false goes in quotes: \"{role}.checkpoint='NAME'\"")
        if command not in ("train", "distill") or not value:
            continue
        if command == "train":
            raise KdError(f"kd train trains the {role} from labels and reads no {role}.checkpoint; to distil from a "
                          f"teacher you have, run `kd distill teacher.checkpoint=PATH`")
        if role == "student":
            raise KdError("kd distill trains the student from its seed and reads no student.checkpoint; a trained "
                          "student is read by `kd export|quantize|bench-model student.checkpoint=PATH`")


# Training settings that only one value of another setting reads: key -> (that setting, the value).
READ_UNDER = {"train.momentum": ("train.optimizer", "sgd"), "train.nesterov": ("train.optimizer", "sgd"),
               "train.milestones": ("train.schedule", "multistep"), "train.gamma": ("train.schedule", "multistep")}


def _unread_link_settings(cfg, loss_fn) -> dict[str, str]:
    """scheme.link_alpha and link_T where a chain has no link before the student, or its links read no T."""
    scheme = cfg.scheme
    if scheme.name == "born_again" and scheme.generations == 1:
        subject = "scheme=born_again with scheme.generations=1, which distils no generation before the student,"
        return {key: subject for key in ("scheme.link_alpha", "scheme.link_T")}
    alpha = cfg.alpha if scheme.link_alpha is None else scheme.link_alpha
    if "T" in settings_read(loss_fn.uses, alpha):
        return {}
    name = "alpha" if scheme.link_alpha is None else "scheme.link_alpha"
    return {"scheme.link_T": f"loss={cfg.loss.name}" + (f" with {name}={alpha}" if "T" in loss_fn.uses else "")}


def distill_columns(cfg) -> dict:
    """The scheme, loss, alpha and T columns of a distilled model's row in the results table.

    alpha or T is left empty where the run does not read it (loss=at has no temperature, nor
    has loss=kd at alpha=0): a table showing T=4 beside such a row would say it mattered.
    """
    ignored = ignored_settings(cfg)
    return {"scheme": cfg.scheme.name, "loss": cfg.loss.name,
            **{key: None if key in ignored else cfg[key] for key in ("alpha", "T")}}


def settings_read(uses, alpha) -> set[str]:
    """Which of alpha and T a loss reads (its `uses`) at this alpha. Every loss is (1 - alpha) * CE +
    alpha * term: at alpha 0 the labels alone train the student, and T goes unread."""
    return set(uses) - ({"T"} if alpha == 0 else set())


def ignored_settings(cfg) -> dict[str, str]:
    """The settings this run does not read, each with what makes it so: {"T": "loss=at"},
    {"T": "loss=kd with alpha=0"}, {"train.momentum": "train.optimizer=adam"}."""
    # teacher_recipe can give the teacher another optimizer or schedule, which then reads the key.
    recipes = [cfg, *([teacher_config(cfg)] if cfg.get("teacher_recipe") else [])]
    ignored = {key: f"{decider}={OmegaConf.select(cfg, decider)}" for key, (decider, value) in READ_UNDER.items()
               if all(OmegaConf.select(recipe, decider) != value for recipe in recipes)}
    if cfg.get("command") == "distill":
        ignored["overwrite"] = "kd distill, which never replaces a stored model,"
    if "loss" not in cfg:
        return ignored
    if cfg.get("quant") != "qat":
        ignored |= {f"qat.{key}": "quant=null" for key in cfg.get("qat") or {}}
    scheme = cfg.scheme
    without_teacher = {"self": "scheme=self", "multi_teacher": "scheme=multi_teacher, which reads scheme.teachers,",
                       "born_again": "scheme=born_again with scheme.start=scratch" if scheme.get("start") == "scratch" else None,
                       "online": "scheme=online with scheme.peers" if scheme.get("peers") else None}.get(scheme.name)
    loss_fn, loss = build_loss(cfg), f"loss={cfg.loss.name}"
    if scheme.name == "offline" and not loss_fn.needs_teacher:
        without_teacher = loss + (" with loss.virtual=true" if cfg.loss.name == "tf_kd" else "")
    if without_teacher:
        ignored |= {key: without_teacher for key in ("teacher", "teacher.checkpoint", "teacher_recipe")}
    elif scheme.name == "online":  # its peers have the teacher's architecture, trained with the student's recipe
        ignored |= {key: "scheme=online, which trains its peers from scratch," for key in ("teacher.checkpoint", "teacher_recipe")}
    if scheme.name in ("ta", "born_again"):
        ignored |= _unread_link_settings(cfg, loss_fn)
    used = set(loss_fn.uses)
    if scheme.name == "multi_teacher":
        used.add("T")  # the teachers' soft targets are averaged at T, whatever the loss (the ensemble's row too)
    elif "T" in used and "T" not in settings_read(used, cfg.alpha):
        # A chain's links read T when they have an alpha of their own and no T of their own.
        links_read_T = scheme.get("link_T") is None and scheme.get("link_alpha") not in (None, 0)
        if not links_read_T:
            ignored["T"] = f"{loss} with alpha=0"
    return ignored | {key: loss for key in ("alpha", "T") if key not in used}


def leaf_keys(node: dict, prefix: str = "") -> list[str]:
    return [key for name, value in node.items()
            for key in (leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])]


def _unknown_key(config: dict, key: str) -> str | None:
    """Why the dotted `key` names nothing in the plain dict `config`, or None when it does."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not isinstance(node, dict):
            return f"'{where}' is a value, not a group of keys"
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=1)
            return f"unknown key '{key}'" + (f"; did you mean '{where}.{close[0]}'?" if close else "")
        node = node[part]
    return None


def teacher_config(cfg):
    """The run's config with `teacher_recipe` applied: the recipe its teacher is trained with."""
    changes = cfg.teacher_recipe
    if not OmegaConf.is_dict(changes) or not set(changes) <= {"data", "train"}:
        raise KdError(f"teacher_recipe changes data.* and train.* keys, e.g. 'teacher_recipe={{data:{{fraction:1.0}}}}'; "
                      f"got {OmegaConf.to_container(changes) if OmegaConf.is_config(changes) else changes!r}")
    known = OmegaConf.to_container(cfg, resolve=False)  # unresolved: a bad interpolation is reported later, in one line
    for key in leaf_keys(OmegaConf.to_container(changes, resolve=False)):
        problem = _unknown_key(known, key)
        if problem:
            raise KdError(f"teacher_recipe: {problem} (it changes keys of the run's data.* and train.*)")
    try:
        merged = OmegaConf.merge(cfg, changes)
    except Exception as e:  # a value of the wrong type
        raise KdError(f"teacher_recipe: {str(e).splitlines()[0]}") from None
    merged.teacher_recipe = None
    return merged


def _model_names(cfg, key: str, required: bool) -> list:
    names = OmegaConf.select(cfg, key)
    names = [] if names is None else names
    if not OmegaConf.is_list(names) and not isinstance(names, list):
        raise KdError(f"{key} must be a list of models such as '{key}=[conv8,conv6]' (quoted in a shell), got {names!r}")
    known = sorted(name for name in CATALOGUE if name != "torchvision")
    for name in names:
        if name not in known:
            raise KdError(f"{key}: unknown model '{name}'; choose from: {', '.join(known)}")
    if required and not names:
        raise KdError(f"scheme={cfg.scheme.name} needs {key}, a list of models such as '{key}=[conv8,conv6]' (quoted in a shell)")
    return list(names)


@functools.cache
def scheme_options() -> dict[str, list[str]]:
    """Each scheme's options: the keys of its yaml in conf/scheme/, which is all a scheme reads."""
    from kd_cli.cli import config_dir

    return {path.stem: [k for k in OmegaConf.load(path) if k != "name"]
            for path in sorted(Path(config_dir(), "scheme").glob("*.yaml"))}


def scheme_option_error(option: str, name: str) -> str:
    """One line for `scheme.OPTION` that scheme `name` does not take: a close match, or the scheme it belongs to."""
    takes = scheme_options().get(name, [])
    message = f"scheme={name} has no option '{option}'"
    close = difflib.get_close_matches(option, takes, n=1)
    owners = [other for other, options in scheme_options().items() if option in options]
    if close:
        message += f" (did you mean '{close[0]}'?)"
    elif owners:
        message += f"; it is an option of scheme={', scheme='.join(owners)}"
    return message + (f"; its options are: {', '.join(takes)}" if takes else "; it takes no scheme.* options")


def _validate_scheme(cfg, loss_fn) -> None:
    scheme = cfg.scheme
    options = scheme_options().get(scheme.name)  # None: a scheme without a yaml, refused by run_scheme
    extra = [k for k in scheme if k != "name" and k not in options] if options is not None else []
    if extra:  # `+scheme.KEY=` adds any key, and a scheme would silently ignore it
        raise KdError(scheme_option_error(extra[0], scheme.name))
    if scheme.name in ("multi_teacher", "online") and loss_fn is not None:
        from kd_cli.schemes import logit_loss_only

        logit_loss_only(loss_fn, cfg)
    if scheme.name in ("ta", "born_again") and loss_fn is not None and not loss_fn.needs_teacher:
        raise KdError(f"scheme={scheme.name} distils each model of its chain from the one before it, and "
                      f"loss={cfg.loss.name} learns from no teacher, so every link would be a scratch student; "
                      f"choose a distillation loss such as loss=kd")
    if scheme.name == "online" and OmegaConf.select(cfg, "teacher.checkpoint"):
        raise KdError("scheme=online trains its peers from scratch alongside the student and loads no teacher.checkpoint; "
                      "drop it (scheme=offline distils from a trained teacher)")
    if cfg.get("quant") == "qat" and scheme.name not in ("offline", "ta", "born_again"):
        raise KdError(f"quant=qat fine-tunes a student from its teacher: use it with scheme=offline, ta or born_again "
                      f"(not scheme={scheme.name}), or run `kd quantize run=PATH` on this run's student")
    if "link_alpha" in scheme and scheme.link_alpha is not None and not 0 <= _number(cfg, "scheme.link_alpha") <= 1:
        raise KdError(f"scheme.link_alpha must be in [0, 1] or null, got {scheme.link_alpha}")
    if "link_T" in scheme and scheme.link_T is not None and _number(cfg, "scheme.link_T") <= 0:
        raise KdError(f"scheme.link_T must be > 0 or null, got {scheme.link_T}")
    if scheme.name == "ta":
        _model_names(cfg, "scheme.assistants", required=True)
    elif scheme.name == "born_again":
        _integer(cfg, "scheme.generations", 1)
        if scheme.start not in ("scratch", "teacher"):
            raise KdError(f"scheme.start must be scratch or teacher, got {scheme.start!r}")
    elif scheme.name == "multi_teacher":
        teachers = _model_names(cfg, "scheme.teachers", required=True)
        duplicate = next((name for name in teachers if teachers.count(name) > 1), None)
        if duplicate:
            raise KdError(f"scheme.teachers names {duplicate} twice; the store holds one {duplicate} per seed and recipe, "
                          f"so the ensemble would count the same model twice; give each model once")
        weights = scheme.weights
        if weights is not None:
            if not OmegaConf.is_list(weights):
                raise KdError(f"scheme.weights must be a list of {len(teachers)} non-negative numbers, one per teacher, "
                              f"such as 'scheme.weights=[{','.join(['1'] * len(teachers))}]'; got {weights!r}")
            if len(weights) != len(teachers) or any(isinstance(w, bool) or not isinstance(w, Real) or w < 0 for w in weights) or not sum(weights):
                raise KdError(f"scheme.weights must be {len(teachers)} non-negative numbers (one per teacher, not all 0), got {list(weights)}")
            if scheme.confidence:
                raise KdError("scheme.weights and scheme.confidence=true exclude each other; set one")
        if not isinstance(scheme.confidence, bool):
            raise KdError(f"scheme.confidence must be true or false, got {scheme.confidence!r}")
    elif scheme.name == "online":
        _model_names(cfg, "scheme.peers", required=False)
    elif scheme.name == "self":
        if cfg.loss.name != "kd":
            raise KdError(f"scheme=self distils between the student's own exits with KD; leave loss=kd (got loss={cfg.loss.name})")
        if _number(cfg, "scheme.feature_weight") < 0:
            raise KdError(f"scheme.feature_weight must be >= 0, got {scheme.feature_weight}")
        from kd_cli.schemes.self_distillation import exits_of

        exits_of(cfg, build_model(cfg.student, ImageSpec.of(cfg.dataset)))
