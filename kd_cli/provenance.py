"""What is needed to repeat a run: command line, versions, device, source revision."""

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from kd_cli.atomic import atomic_write_text

_PACKAGES = ("kd-cli", "torch", "torchvision", "hydra-core", "omegaconf", "numpy", "pandas", "rich")


def _git_revision() -> str | None:
    """The revision of kd's own source tree, with '+dirty' for uncommitted changes; None outside git."""
    source = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, CPUs: {os.cpu_count()}, torch threads: {torch.get_num_threads()}"


def record_run(run_dir: Path, device: torch.device) -> None:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        "command_line": " ".join(sys.argv),  # the dispatcher sets argv[0] to "kd COMMAND"
        "cwd": os.getcwd(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "versions": versions,
        "device": str(device),
        "device_name": device_name(device),
        "git_revision": _git_revision(),
        "host": platform.node(),
    }
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(record, indent=2) + "\n")
