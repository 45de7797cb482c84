"""Teacher outputs kept after the fit that computed them: in memory for this process's next fit, and
on disk for later runs.

A distillation run with fixed inputs computes its teacher's outputs over the whole training set once
(engine.Teacher). The pass is often most of a short run: 10.2 s of a 16.1 s `kd distill` of DeepNN ->
LightNN for one epoch of Fashion-MNIST. Two places keep its result for runs that would compute the
same outputs:

- memory: the jobs of a sweep that Hydra's basic launcher runs one after another in one process
  (`kd distill -m alpha=... T=...`). One entry; a fit that does not use it drops it, so no job holds
  an earlier job's cache.
- disk, when the caller gives a folder (`kd distill` gives `store_dir/teacher_outputs`): separate
  `kd distill` commands, and the workers of a parallel sweep launcher (while one computes outputs
  it will save, the others wait for the file). Files up to a total of
  `train.teacher_cache_disk_mb`; the least recently used go first.

Both are looked up by `key`, a digest of everything the outputs depend on. The caller also compares
what it finds with the first chunk it computes anyway, bit for bit: that catches state the digest
cannot see (a plain attribute the forward reads and the module's repr leaves out), and a torch build
that computes the teacher differently.
"""

import hashlib
import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from kd_cli.atomic import atomic_torch_save, remove_abandoned_writes
from kd_cli.data import ImageData
from kd_cli.errors import KdError
from kd_cli.store import checksum, making, safe_load, tensor_bytes

log = logging.getLogger(__name__)

FORMAT = "kd-teacher-outputs/1"
_in_memory: dict[str, tuple[dict, float]] = {}  # key -> (outputs, seconds their pass took)


def key(model: nn.Module, data: ImageData, *settings) -> str:
    """A digest of the teacher (structure, parameters and buffers), the training images and their
    normalisation, and the `settings` the outputs are computed with; about 0.5 ms per MB hashed."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())  # buffers kept out of state_dict too
    digest = hashlib.sha256(repr((repr(model), [(k, v.shape, v.dtype) for k, v in tensors.items()], settings)).encode())
    for tensor in (*tensors.values(), data.train_x, data.mean, data.std):
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def forget() -> None:
    """Drop the outputs kept in memory (the bench does, so that each round pays for its own pass)."""
    _in_memory.clear()


def find(digest: str, folder: Path | None, first: dict, images: int) -> tuple[dict, float, str] | None:
    """(outputs, seconds their pass took, where they were kept) under `digest`, or None.

    Only outputs for `images` images that begin with `first` (the first chunk's outputs, just
    computed), bit for bit and in the same dtypes, are returned.
    """
    path = _file(folder, digest)
    if digest in _in_memory:
        found = (*_in_memory[digest], "this process's previous fit")
    elif path is not None and path.is_file():
        found = _read(path, digest)
    else:
        return None
    if found is None:
        return None
    outputs, _, where = found
    if outputs.keys() != first.keys() or any(
            len(outputs[k]) != images or outputs[k].dtype != v.dtype or not torch.equal(outputs[k][:len(v)].to(v.device), v)
            for k, v in first.items()):
        log.info("teacher cache: the outputs kept in %s differ from this teacher's on the first batch; "
                 "computing them again", where)
        return None
    if path is not None:
        try:
            os.utime(path)  # the most recently used file: the last one removed
        except OSError:  # gone meanwhile, or another user's file in a shared store: the order is only a hint
            pass
    return found


@contextmanager
def computing(digest: str, folder: Path | None):
    """Hold the lock of `digest`'s file in `folder` while computing the outputs to save there, so that
    a parallel job after the same outputs waits and reads them; yields True if it waited. No lock
    without a folder, or where none can be written (a colleague's store): each job computes its own."""
    with ExitStack() as held:
        try:
            waited = held.enter_context(making(path)) if (path := _file(folder, digest)) else False
        except OSError:
            waited = False
        yield waited


def _read(path: Path, digest: str) -> tuple[dict, float, str] | None:
    try:
        payload = safe_load(path)
        outputs, seconds = payload["outputs"], float(payload["seconds"])
        if payload.get("format") != FORMAT or payload.get("key") != digest:
            raise ValueError("not the outputs of this teacher and these images")
        if payload.get("checksum") != checksum(outputs):  # torch.load does not check the zip's CRCs
            raise ValueError("its content does not match its checksum")
    except FileNotFoundError:  # removed by another run since we looked
        return None
    except Exception as e:  # a cache file is derived data: an unusable one is computed again, not fatal
        log.warning("teacher cache: %s is unusable (%s: %s); computing the outputs again", path, type(e).__name__, e)
        return None
    return outputs, seconds, str(path)


def keep(digest: str, outputs: dict, seconds: float, folder: Path | None = None, max_disk_mb: float = 0.0) -> None:
    """Keep `outputs` in memory (in place of any others) and, when they fit in `max_disk_mb`, in `folder`."""
    _in_memory.clear()
    _in_memory[digest] = (outputs, seconds)
    path = _file(folder, digest)
    if path is None or max_disk_mb <= 0:
        return
    size = sum(t.numel() * t.element_size() for t in outputs.values())
    if size > max_disk_mb * 2**20:
        log.info("teacher cache: not saved for later runs (%.1f MB, over train.teacher_cache_disk_mb=%s)",
                 size / 2**20, max_disk_mb)
        return
    on_host = {k: t.cpu() for k, t in outputs.items()}
    try:
        _make_room(path, max_disk_mb * 2**20 - size)
        atomic_torch_save(path, {"format": FORMAT, "key": digest, "seconds": seconds, "checksum": checksum(on_host),
                                 "outputs": on_host})
    except (KdError, OSError) as e:  # a full disk or a read-only store costs later runs the pass, not this run its result
        log.warning("teacher cache: not saved for later runs (%s)", e)
        return
    log.info("teacher cache: saved for later runs with this teacher and these images: %s (%.1f MB)", path, size / 2**20)


def _file(folder: Path | None, digest: str) -> Path | None:
    return None if folder is None else Path(folder).expanduser() / f"{digest}.pt"  # under store_dir='~/...


def _make_room(path: Path, room: float) -> None:
    """Remove the least recently used files beside `path` until the others take at most `room` bytes."""
    remove_abandoned_writes(path.parent)  # outside the budget, and as large as the files themselves
    files = []
    for other in path.parent.glob("*.pt"):
        try:
            stat = other.stat()
        except FileNotFoundError:  # removed meanwhile by another run
            continue
        if other != path:  # the file about to be replaced takes no room of its own
            files.append((stat.st_mtime, stat.st_size, other))
    files.sort()
    total = sum(size for _, size, _ in files)
    for _, size, other in files:
        if total <= room:
            break
        try:
            other.unlink(missing_ok=True)
        except OSError:  # another user's file in a shared store: it stays, and so may the excess
            continue
        total -= size
