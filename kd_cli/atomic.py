"""Files that are either the old version or the complete new one, never half written."""

import errno
import functools
import io
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, IO

from kd_cli.errors import KdError


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; once, before any worker thread starts
    os.umask(mask)
    return mask


ABANDONED_AFTER_S = 3600  # no write takes this long; its temporary file is what a SIGKILL or power cut left


# Less free space than this and Hydra fails while saving a run's config, with a traceback, before kd
# could say anything: a run needs more than that for its results and checkpoints anyway.
MIN_FREE_BYTES = 2**20


def check_writable(folder: str | Path, what: str, key: str) -> None:
    """Raise KdError unless files can be created in `folder` (or the nearest existing folder above it);
    `key` is the setting that moves it elsewhere."""
    path = Path(folder)
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise KdError(f"cannot write {what} {folder}: {path} is a file, not a folder; choose another location with {key}")
    try:  # a real write, not os.access: root passes access() even where nothing can be created (/proc, read-only mounts)
        with tempfile.TemporaryFile(dir=path):
            pass
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise KdError(f"cannot write {what} {folder}: {path} is not writable ({e.strerror or e}); "
                      f"choose another location with {key}") from None
    if free < MIN_FREE_BYTES:
        raise KdError(f"cannot write {what} {folder}: the disk holding {path} is full ({free // 1024} kB free); "
                      f"free some space or choose another location with {key}")


def remove_abandoned_writes(folder: Path) -> None:
    """Delete the temporary files that writes into `folder` left when killed mid-write (no cleanup ran)."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for leftover in Path(folder).glob(".*.tmp"):  # the names atomic_write gives them
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:  # gone meanwhile, or another user's
            continue


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`.

    If anything fails (a full disk, say), `path` keeps its previous content and the error is one line.
    """
    atomic_write_files({Path(path): write})


def atomic_write_files(writes: dict[Path, bytes | Callable[[IO[bytes]], None]]) -> None:
    """Files that belong together (a model and the results that describe it), each given as its bytes or
    as a function that writes them, each written as `atomic_write` does. Every temporary file is written
    and synced before the first rename, so a failure while writing (a full disk) leaves all as they were,
    and Ctrl-C or SIGTERM waits for the renames. (A rename that fails, or SIGKILL between two, leaves
    some new; the error names them.)
    """
    paths = [Path(p) for p in writes]
    for path in paths:
        if path.is_dir():  # a rename over a folder fails only after the files before it were replaced
            raise KdError(f"cannot write {path}: a folder has that name; move it away or write elsewhere")
    temps: dict[Path, str] = {}
    replaced: list[Path] = []
    path = paths[0]
    try:
        for path, write in zip(paths, writes.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes the file owner-only; give it the mode any new file gets (0644 under umask 022),
                # so that colleagues on a shared machine can read results and reuse the model store.
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                if callable(write):
                    write(f)
                else:
                    f.write(write)
                f.flush()
                os.fsync(f.fileno())
        with _stops_held():
            for path in paths:
                os.replace(temps[path], path)
                del temps[path]
                replaced.append(path)
    except OSError as e:
        raise KdError(f"cannot write {path}: {e.strerror or e}{_what_was_kept(paths, replaced)}") from e
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    for path in {p.parent: p for p in paths}.values():  # one sync per folder
        _fsync_folder(path)


@contextmanager
def _stops_held():
    """Ctrl-C and SIGTERM delivered after the block, not inside it (kd turns both into exceptions)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _what_was_kept(paths: list[Path], replaced: list[Path]) -> str:
    kept = [p for p in paths if p not in replaced and p.exists()]
    if len(paths) == 1:
        return "; its previous version is intact" if kept else ""
    if replaced:
        return (f"; already replaced: {', '.join(p.name for p in replaced)}"
                + (f"; previous versions intact: {', '.join(p.name for p in kept)}" if kept else ""))
    return f"; none of {', '.join(p.name for p in paths)} was replaced"


# What a file system that cannot fsync a folder (some network and FUSE ones) answers.
_FOLDER_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM, errno.EBADF}


def _fsync_folder(path: Path) -> None:
    """The rename itself must reach the disk too, or a crash could bring back the old name."""
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in _FOLDER_FSYNC_UNSUPPORTED:  # the new file is in place; this file system promises no more
            return
        raise KdError(f"{path} is written, but its folder could not be synced to disk ({e.strerror or e}); "
                      f"a crash now could bring back its previous version") from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_files({Path(path): text.encode()})


def atomic_torch_save(path: Path, obj) -> None:
    """torch.save, atomically. Serialising to memory first makes a full disk an OSError on our write,
    instead of an opaque RuntimeError from inside torch's zip writer."""
    import torch  # here, not at the top: `kd report` writes through this module and needs no torch (2 s to import)

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
