"""Checkpoints and the model store.

The store keeps trained models under `store_dir/<dataset>/<model>/seed<N>-<recipe hash>.pt`, so
`kd distill` finds the teacher (and the scratch student to compare with) that `kd train` made with
the same recipe. A checkpoint is a plain dict of tensors and built-in types, loaded with
`weights_only=True`: a crafted file cannot run code.
"""

import functools
import hashlib
import json
import logging
import os
import pickle
import re
import socket
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

import kd_cli
from kd_cli.atomic import atomic_torch_save, remove_abandoned_writes
from kd_cli.errors import KdError
from kd_cli.identity import dataset_identity, numbers_as_floats
from kd_cli.models import model_label

log = logging.getLogger(__name__)

FORMAT = "kd-checkpoint/1"
STUDENT_FILE = "student.pt"  # the distilled student in a `kd distill` run folder, what `kd deploy run=` reads
# Keys that change how fast a model trains but not which model comes out.
_RUNTIME_ONLY = {"train": {"amp", "teacher_cache", "teacher_cache_max_mb", "teacher_cache_disk_mb", "teacher_precision",
                           "channels_last", "compile", "threads"},
                 "data": {"root", "download"}}


def recipe(cfg) -> dict:
    """Everything besides the architecture and seed that determines a trained model."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    out = {"dataset": dataset_identity(dataset, augmented=bool(cfg.data.get("augment", True)))}
    for block, skip in _RUNTIME_ONLY.items():
        out[block] = {k: v for k, v in OmegaConf.to_container(cfg[block], resolve=True).items() if k not in skip}
    if "val_fraction" in out["data"] and out["data"]["val_fraction"] is None:  # null holds nothing out, as 0 does
        out["data"]["val_fraction"] = _base_defaults()["data"]["val_fraction"]
    return _unread_as_default(out)


def _unread_as_default(identity: dict) -> dict:
    """A setting the recipe's optimizer or schedule does not read (train.gamma without multistep; kd warns
    that it changes nothing) counts at its default: the same model, so the same key. The default, not
    nothing: the keys of models stored before stay valid."""
    from kd_cli.config import READ_UNDER

    for key, (decider, value) in READ_UNDER.items():
        (block, name), setting = key.split("."), decider.split(".")[1]
        if identity[block].get(setting) != value and name in identity[block]:
            identity[block][name] = _base_defaults()[block][name]
    return identity


@functools.cache
def _base_defaults() -> dict:
    """conf/base.yaml, read once per process: every model looked up in the store asks for its recipe."""
    from kd_cli.cli import config_dir

    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "base.yaml"))


def model_spec(model_cfg) -> dict:
    return {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k != "checkpoint"}


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def store_path(cfg, model_cfg, lineage: dict | None = None) -> Path:
    """Where the store keeps `model_cfg` trained with this recipe: from labels, or as `lineage` says
    (a teacher-assistant link or a born-again generation: which teacher, loss, alpha and T)."""
    identity = {"recipe": recipe(cfg), "model": model_spec(model_cfg)} | ({"lineage": lineage} if lineage else {})
    folder = Path(cfg.store_dir).expanduser() / cfg.dataset.name / model_label(model_cfg)  # '~/store', as data.root
    path = folder / f"seed{cfg.seed}-{_digest(numbers_as_floats(identity))}.pt"
    # Earlier kd hashed numbers as typed: a model stored so keeps serving its recipe typed that way.
    as_typed = folder / f"seed{cfg.seed}-{_digest(identity)}.pt"
    return as_typed if not path.exists() and as_typed.exists() else path


# The process making a store entry touches its lock file this often; a lock untouched for
# LOCK_STALE_S was left by a killed process (or one on a machine that went down) and is taken over.
LOCK_REFRESH_S = 10
LOCK_STALE_S = 120
LOCK_POLL_S = 1.0


_HOLDER = "kd pid {pid} on {host}"  # a lock file's content


def _gone(holder: str) -> bool:
    """Whether the process that wrote `holder` was on this machine and has ended (killed: no cleanup ran);
    one on another machine can only go stale."""
    written = re.fullmatch(_HOLDER.format(pid=r"(\d+)", host=r"(\S+)"), holder)
    if not written or written[2] != socket.gethostname():
        return False
    try:
        os.kill(int(written[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


@contextmanager
def making(path: Path):
    """Hold the lock of store entry `path` while making it, so that parallel jobs that need the same
    model (a sweep with train_missing=true on a parallel launcher) wait for it and then load it
    instead of training it again. Yields True if it had to wait for another process.

    A lock file beside the entry, created exclusively, works on any file system the store can live
    on, shared ones included. Two waiters taking over the same stale lock at the same moment could
    both train; the entry is written atomically either way, so that costs time, not correctness.
    """
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            try:
                age, written = time.time() - lock.stat().st_mtime, lock.read_text().strip()
            except FileNotFoundError:  # released meanwhile
                continue
            holder = written or "another process"
            # A holder writes its name right after creating the file: empty for longer, it was killed in between.
            if age > LOCK_STALE_S or _gone(holder) or (not written and age > LOCK_REFRESH_S):
                log.warning("%s was last touched %.0f s ago by %s, which has stopped; taking it over", lock, age, holder)
                lock.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("waiting for %s: %s is making it (lock %s)", path.name, holder, lock)
                waited = True
            time.sleep(LOCK_POLL_S)
    with os.fdopen(fd, "w") as f:
        f.write(_HOLDER.format(pid=os.getpid(), host=socket.gethostname()) + "\n")
    done = threading.Event()

    def keep_fresh():
        while not done.wait(LOCK_REFRESH_S):
            try:
                os.utime(lock)
            except OSError:  # removed by hand: the training goes on regardless
                pass

    refresher = threading.Thread(target=keep_fresh, name=f"lock {path.name}", daemon=True)
    refresher.start()
    # What an earlier write of a model in this folder left when it was killed mid-write: as large as a model.
    remove_abandoned_writes(path.parent)
    try:
        yield waited
    finally:
        done.set()
        refresher.join()
        lock.unlink(missing_ok=True)


def tensor_bytes(tensor: torch.Tensor):
    """A tensor's values as raw bytes (any dtype, device or layout), to hash."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def checksum(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def nested_checksum(value) -> str:
    """A digest of nested dicts, lists and tuples of tensors and plain values (a training state)."""
    digest = hashlib.sha256()

    def add(item) -> None:
        if isinstance(item, torch.Tensor):
            digest.update(repr((item.dtype, tuple(item.shape))).encode())
            digest.update(tensor_bytes(item))
        elif isinstance(item, dict):
            for key, entry in item.items():
                digest.update(repr(key).encode())
                add(entry)
        elif isinstance(item, list | tuple):
            digest.update(b"[")
            for entry in item:
                add(entry)
            digest.update(b"]")
        else:
            digest.update(repr(item).encode())

    add(value)
    return digest.hexdigest()


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict, helpers: dict | None = None) -> None:
    """Weights (plus training-only helper modules, if any) and what they are, written atomically."""
    state_dict = model.state_dict()
    payload = {"format": FORMAT, "kd_version": kd_cli.__version__, "state_dict": state_dict,
               "sha256": checksum(state_dict), "meta": meta, "helpers": helpers or {}}
    atomic_torch_save(Path(path), payload)


def safe_load(path: Path):
    """torch.load restricted to tensors and plain data: a crafted file cannot run code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about legacy formats; the caller reports the problem
        return torch.load(path, map_location="cpu", weights_only=True)


_RETRAIN = "retrain it (`kd train ... overwrite=true` replaces a model in the store)"


def _unreadable(path: Path, error: Exception) -> KdError:
    # Only PermissionError: torch reports a truncated zip archive as an OSError (EINVAL) too.
    if isinstance(error, PermissionError):  # the file may be fine
        return KdError(f"cannot read checkpoint {path} ({error.strerror or type(error).__name__}); check its permissions")
    with path.open("rb") as file:
        head = file.read(8)
    # torch.save writes a zip archive ("PK"), older versions a pickle (protocol byte 0x80): a file that
    # starts otherwise was never a checkpoint (a log, a config), and retraining is not the answer.
    if head and not head.startswith((b"PK", b"\x80")):
        return KdError(f"{path} is not a checkpoint file (PyTorch writes zip archives; this one starts with {head!r}); "
                       f"point at a .pt file written by kd train / kd distill")
    if head.startswith(b"PK") and (other := _other_torch_file(path)):
        return KdError(f"{path} is {other}, not a kd checkpoint; point at the checkpoint it was made from "
                       f"(a run's {STUDENT_FILE} or a .pt in the model store)")
    if isinstance(error, pickle.UnpicklingError):
        return KdError(f"{path} is not a kd checkpoint (it holds objects kd will not unpickle); point at a file kd wrote")
    return KdError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}); {_RETRAIN} or restore it from a backup")


def _other_torch_file(path: Path) -> str | None:
    """What kd's other outputs in a zip archive are, told by their entries; None for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any("/code/" in name for name in names):
        return "a TorchScript model (kd quantize writes its int8 models so)"
    if any(name.endswith("/archive_format") for name in names):
        return "a torch.export program (kd export writes it)"
    return None


def named_file(key: str, value) -> Path:
    """The path a setting (`teacher.checkpoint=PATH`) names; a missing one is reported in the setting's terms."""
    path = Path(value)
    if not path.exists():
        raise KdError(f"{key}={path} does not exist; check the path")
    return path


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise KdError(f"checkpoint {path} is a folder; point at a checkpoint file (.pt) in it")
    if not path.is_file():
        raise KdError(f"checkpoint {path} does not exist")
    try:
        payload = safe_load(path)
    except Exception as e:  # torch's legacy reader fails on arbitrary bytes with any error (KeyError on text)
        raise _unreadable(path, e) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KdError(f"{path} is not a kd checkpoint; point at a file written by kd train / kd distill")
    if "sha256" not in payload:
        raise KdError(f"checkpoint {path} has no checksum (an early kd development build wrote it); {_RETRAIN}")
    if checksum(payload["state_dict"]) != payload["sha256"]:
        raise KdError(f"checkpoint {path} fails its checksum (its weights changed after it was written); {_RETRAIN}")
    return payload


def trained_with(meta: dict) -> str:
    """The loss a checkpoint's model was trained with, for its results row: `kd distill` records it
    (a teacher-assistant link inside its lineage); a model trained from labels records none: ce."""
    return meta.get("loss") or (meta.get("lineage") or {}).get("loss", {}).get("name") or "ce"


def check_made_for(payload: dict, path: Path, model_cfg, cfg) -> None:
    """Raise KdError unless the checkpoint's model and dataset are those of `model_cfg` and `cfg`."""
    expected = {"model": model_label(model_cfg), "dataset": cfg.dataset.name, "num_classes": cfg.dataset.num_classes}
    for key, want in expected.items():
        if payload["meta"].get(key) != want:
            raise KdError(f"checkpoint {path} is for {key}={payload['meta'].get(key)}, not {want}; "
                          f"point at a matching checkpoint")


def load_into(model: torch.nn.Module, payload: dict, path: Path, model_cfg, cfg) -> dict:
    """Load weights after checking the checkpoint is for this architecture and dataset."""
    check_made_for(payload, path, model_cfg, cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise KdError(f"checkpoint {path} does not fit {model_label(model_cfg)}: {first}") from e
    return payload["meta"]
