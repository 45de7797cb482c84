"""Config groups that come from code, and the checks Hydra cannot express in yaml.

`teacher` and `student` are two config groups filled from one model catalogue, so every model is
available in both roles and a new model needs no yaml.
"""

from numbers import Real

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from kd_cli.errors import KdError
from kd_cli.models import CATALOGUE


# Keys that may differ between a run and its resumption without changing what it computes.
RUN_ONLY = ("resume", "device")


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
}
FLAGS = ("data.download", "data.augment", "overwrite", "resume", "deterministic", "train.compile", "train.nesterov")


def validate(cfg) -> None:
    """Reject values that would fail late or silently give a wrong table."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise KdError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    for key in FLAGS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, bool):
            raise KdError(f"{key} must be true or false, got {value!r}")
    _integer(cfg, "seed", 0)
    _integer(cfg, "train.epochs", 1)
    _integer(cfg, "train.batch_size", 1)
    if _number(cfg, "train.lr") <= 0:
        raise KdError(f"train.lr must be > 0, got {cfg.train.lr}")
    for key in ("data.fraction", "data.test_fraction"):
        if not 0 < _number(cfg, key) <= 1:
            raise KdError(f"{key} must be in (0, 1], got {OmegaConf.select(cfg, key)}")
    if OmegaConf.select(cfg, "data.val_fraction") is not None and not 0 <= _number(cfg, "data.val_fraction") < 1:
        raise KdError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if "alpha" in cfg and not 0 <= _number(cfg, "alpha") <= 1:
        raise KdError(f"alpha must be in [0, 1] (the weight of the distillation term), got {cfg.alpha}")
    if "T" in cfg and _number(cfg, "T") <= 0:
        raise KdError(f"T must be > 0 (the softmax temperature), got {cfg.T}")
