"""The model catalogue: one name space shared by `teacher=` and `student=`.

Every builder takes the dataset's image shape and class count, so any model runs on any dataset.
"""

from dataclasses import dataclass
from typing import Callable

from torch import nn

from kd_cli.errors import KdError


@dataclass(frozen=True)
class ImageSpec:
    channels: int
    size: int
    num_classes: int

    @classmethod
    def of(cls, dataset_cfg) -> "ImageSpec":
        """The images a `dataset=` config describes."""
        return cls(dataset_cfg.channels, dataset_cfg.image_size, dataset_cfg.num_classes)


CATALOGUE: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def add(builder):
        CATALOGUE[name] = builder
        return builder

    return add


def model_label(model_cfg) -> str:
    """The name a results table shows: the catalogue key, or torchvision's own name."""
    if model_cfg.arch == "torchvision":
        return f"torchvision.{model_cfg.name}"
    return model_cfg.arch


def has_conv(model: nn.Module) -> bool:
    """Whether memory layout matters for `model`: 2-d convolutions are what has a channels_last form."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def build_model(model_cfg, spec: ImageSpec, pretrained: bool = True) -> nn.Module:
    """The model `model_cfg` names; `pretrained=False` leaves out torchvision's weights: the same layers
    and parameter count, and nothing read or downloaded (for checks that need only the architecture)."""
    arch = model_cfg.arch
    if arch not in CATALOGUE:
        raise KdError(f"unknown model '{arch}'; choose one of: {', '.join(sorted(CATALOGUE))}")
    options = {k: v for k, v in model_cfg.items() if k not in ("arch", "checkpoint")}
    if not pretrained and "weights" in options:
        options["weights"] = None
    return CATALOGUE[arch](spec, **options)


# Importing the modules fills the catalogue.
from kd_cli.models import convnets, resnet, torchvision_models  # noqa: E402,F401
