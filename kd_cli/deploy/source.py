"""What the deploy commands work on: a trained model with the config it was trained with, from a
`kd distill` run folder or any kd checkpoint; and their `key=value` command lines."""

import argparse
import difflib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kd_cli.atomic import check_writable
from kd_cli.data import ImageData, load_data
from kd_cli.errors import KdError
from kd_cli.models import ImageSpec, build_model
from kd_cli.store import STUDENT_FILE, load_checkpoint, load_into, model_spec

CPU = torch.device("cpu")
SOURCE_KEYS = {
    "run": "a `kd distill` run folder (it holds student.pt and results.json)",
    "student.checkpoint": "any kd checkpoint instead: the model store's, or a run's student.pt",
    "out": "output folder",
    "data.root": "where the dataset is, when not where the run found it",
}


def parse(prog: str, description: str, argv: list[str], keys: dict[str, str], positional: str | None = None):
    """`kd PROG [POSITIONAL] key=value ...` -> (positional or None, {key: value}); --help lists the keys."""
    width = max(len(key) for key in keys) + 6
    epilog = "keys:\n" + "\n".join(f"  {key + '=...':<{width}}{text}" for key, text in keys.items())
    parser = argparse.ArgumentParser(prog=f"kd {prog}", description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokens", nargs="*", metavar=f"{positional + ' ' if positional else ''}KEY=VALUE")
    tokens = parser.parse_args(argv).tokens
    options, loose = {}, []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            loose.append(token)
        elif key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise KdError(f"unknown key '{key}' for kd {prog}; {hint}choose from: {', '.join(keys)}")
        else:
            options[key] = value
    if len(loose) > (1 if positional else 0):
        raise KdError(f"kd {prog} takes {'one ' + positional + ' and ' if positional else ''}key=value arguments, "
                      f"got '{' '.join(loose)}'; write run=PATH or student.checkpoint=PATH (kd {prog} --help)")
    return (loose[0] if loose else None), options


THREADS_KEY = {"threads": "CPU threads for torch (default: torch's own choice); 1 gives steadier latencies on a busy machine"}


def set_threads(options: dict) -> None:
    if "threads" in options:
        torch.set_num_threads(integer(options, "threads", 1))


def integer(options: dict, key: str, default: int, minimum: int = 1) -> int:
    value = options.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise KdError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return number


@dataclass
class Source:
    """A trained model (fp32, CPU, eval mode), the config it was trained with, and its checkpoint."""

    model: torch.nn.Module
    cfg: object  # the run's composed config, as its checkpoint recorded it
    meta: dict
    checkpoint: Path
    out: Path | None = None  # where the command writes

    @property
    def label(self) -> str:
        return self.meta["model"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cfg.dataset.channels, self.cfg.dataset.image_size, self.cfg.dataset.image_size)

    @property
    def role(self) -> str:
        """The role this model had in its run's results table."""
        if "loss" in self.meta:  # only `kd distill` records the loss of its student (online and self: no teacher)
            return "student_kd"
        student = self.cfg.get("student")
        return "student_scratch" if student is not None and model_spec(student) == self.meta["model_cfg"] else "teacher"

    @cached_property
    def data(self) -> ImageData:
        """The run's dataset on the CPU: its training subset (calibration) and its test split (accuracy)."""
        return load_data(self.cfg)


def _from_checkpoint(path: Path, data_root: str | None) -> Source:
    payload = load_checkpoint(path)
    meta = payload["meta"]
    if "config" not in meta or "model_cfg" not in meta:
        raise KdError(f"checkpoint {path} does not record the config it was trained with (an early kd build wrote it); retrain it")
    cfg = OmegaConf.create(meta["config"])
    if data_root:
        cfg.data.root = data_root
    model_cfg = OmegaConf.create(meta["model_cfg"])
    model = build_model(model_cfg, ImageSpec.of(cfg.dataset))
    load_into(model, payload, path, model_cfg, cfg)
    return Source(model.eval(), cfg, meta, path)


def load_source(options: dict, command: str) -> Source:
    """The model of `run=PATH` or `student.checkpoint=PATH` (exactly one of them)."""
    run, checkpoint = options.get("run"), options.get("student.checkpoint")
    if bool(run) == bool(checkpoint):
        raise KdError(f"kd {command} needs run=PATH (a `kd distill` run folder) or student.checkpoint=PATH, one of them")
    if run:
        folder = Path(run)
        if folder.is_file():
            raise KdError(f"run= takes a run folder and {folder} is a file; pass student.checkpoint={folder} "
                          f"for a checkpoint file")
        if not folder.is_dir():
            raise KdError(f"run folder {folder} does not exist; pass run= a finished `kd distill` run folder "
                          f"(outputs/distill/<date_time>)")
        path = folder / STUDENT_FILE
        if not path.is_file():
            jobs = sorted((p.parent.name for p in folder.glob(f"*/{STUDENT_FILE}")), key=lambda n: (len(n), n))
            if jobs:  # a sweep folder, or outputs/distill: the runs are inside
                raise KdError(f"{folder} holds runs, not one run; pass run= one of them, e.g. run={folder / jobs[0]} "
                              f"(those with a {STUDENT_FILE}: {', '.join(jobs)})")
            raise KdError(f"{folder} holds no {STUDENT_FILE}; pass run= a finished `kd distill` run folder, "
                          f"or student.checkpoint=PATH for another checkpoint")
    else:
        path = Path(checkpoint)
        if path.is_dir():
            hint = (f"pass run={path} for a `kd distill` run folder" if (path / STUDENT_FILE).is_file()
                    else "point at a checkpoint file (.pt) in it")
            raise KdError(f"student.checkpoint={path} is a folder; {hint}")
        if not path.is_file():
            raise KdError(f"student.checkpoint={path} does not exist; check the path")
    source = _from_checkpoint(path, options.get("data.root"))
    default_out = Path(run) / command if run else Path("outputs") / command / f"{source.label}-{path.stem}"
    source.out = Path(options.get("out") or default_out)
    check_writable(source.out, f"kd {command}'s output folder", "out=PATH")  # before the work, not after it
    return source


def class_names(cfg) -> list[str]:
    """torchvision's names for the MNIST family, CIFAR's own from its meta file, else the class indices."""
    import torchvision

    from kd_cli.data import _ArrayUnpickler

    dataset = cfg.dataset
    names = getattr(getattr(torchvision.datasets, dataset.get("torchvision_class", ""), None), "classes", None)
    if isinstance(names, list) and len(names) == dataset.num_classes:
        return list(names)
    for meta_file, key in (("batches.meta", b"label_names"), ("meta", b"fine_label_names")):
        path = Path(cfg.data.root).expanduser() / dataset.get("folder", "") / meta_file
        if dataset.get("folder") and path.is_file():
            with open(path, "rb") as f:
                names = _ArrayUnpickler(f, encoding="bytes").load().get(key)
            if names and len(names) == dataset.num_classes:
                return [n.decode() for n in names]
    return [str(i) for i in range(dataset.num_classes)]
