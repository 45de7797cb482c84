"""What of a dataset's config decides the model trained on it.

Torch-free: the model store keys its models with it, and `kd report` groups runs with it, so that the
two agree on which runs trained the same model.
"""

import functools
from pathlib import Path

from omegaconf import OmegaConf

# The dataset settings that change which model comes out (its other keys say where its files are).
DATASET_SETTINGS = ("channels", "image_size", "num_classes", "mean", "std", "crop_padding", "hflip")


def dataset_settings_read(augmented: bool) -> tuple[str, ...]:
    """The dataset settings a training reads: the crop and flip only when it augments."""
    return tuple(k for k in DATASET_SETTINGS if augmented or k not in ("crop_padding", "hflip"))


def dataset_identity(dataset: dict, augmented: bool) -> str | dict:
    """The dataset's name, with its settings that differ from its file in conf/dataset/ (all of them for
    a dataset without one). Only changed ones: the keys of models stored before kd counted them stay valid.
    Without augmentation its crop and flip settings are not read: they change no model."""
    defaults = shipped_dataset(dataset["name"])
    changed = {k: dataset[k] for k in dataset_settings_read(augmented)
               if k in dataset and numbers_as_floats(dataset[k]) != numbers_as_floats(defaults.get(k))}
    return {"name": dataset["name"], **changed} if changed else dataset["name"]


@functools.cache
def shipped_dataset(name: str) -> dict:
    """conf/dataset/NAME.yaml, read once per process ({} for a dataset without one): a report asks for every run's."""
    from kd_cli.cli import config_dir

    shipped = Path(config_dir()) / "dataset" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(shipped)) if shipped.is_file() else {}


def numbers_as_floats(value):
    """`data.fraction=1` typed on a command line is the int 1, the config's default the float 1.0:
    one recipe, so one key."""
    if isinstance(value, dict):
        return {k: numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_as_floats(v) for v in value]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
