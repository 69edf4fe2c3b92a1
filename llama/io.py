"""Shared file I/O for every room: reading JSON and config.json with one-line errors, atomic JSON files and
atomic output directories, package versions.

Atomic outputs: a directory is built in ``DST.tmp-PID-<random>``, fsynced, then renamed to DST, so DST exists
only when complete; an existing DST is never replaced without ``force``. Leftovers of killed runs are removed
by the next run to the same DST.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import CheckpointError, ConfigError


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value in `path`, with a one-line error for a missing, non-UTF-8 or malformed file."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); expected a {what}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; expected a {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; expected a {what}") from None


def config_path(path: str | os.PathLike) -> str:
    """A model directory's config.json, or the path itself when it names a file."""
    path = str(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object in a config.json (or a directory's), with one-line errors for a missing or bad file."""
    path = config_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config.json not found")
    d = read_json(path, "config.json")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, newline-terminated) into a file inside a directory being built atomically."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON to a standalone file `path` (its directory made if missing) through a temporary file, fsynced,
    then renamed: readers see the old file or the new one, never a half-written one."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---- atomic output directories ---------------------------------------------------------------------

class AtomicDir:
    """Build a directory in ``DST.tmp-PID-<random>`` and rename it to DST on success; remove it on failure.

    An existing DST is refused unless ``force``; stale temporaries of dead processes are cleaned first."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = os.path.abspath(str(dst)).rstrip("/")
        self.force = force
        self.tmp = None

    def __enter__(self) -> str:
        if os.path.lexists(self.dst) and not self.force:
            raise CheckpointError(f"{self.dst} already exists; pass --force (force=True) to overwrite it")
        os.makedirs(os.path.dirname(self.dst) or ".", exist_ok=True)
        clean_stale_temporaries(self.dst)
        self.tmp = f"{self.dst}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for name in os.listdir(self.tmp):
            fsync(os.path.join(self.tmp, name))
        fsync(self.tmp)
        old = None
        if os.path.lexists(self.dst):
            old = f"{self.dst}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        fsync(os.path.dirname(self.dst))
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        return False


def fsync(path: str) -> None:
    """Flush a file or directory to disk (a no-op for anything else)."""
    if os.path.isfile(path) or os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale_temporaries(dst: str) -> None:
    """Remove ``DST.tmp-PID-*`` / ``DST.old-PID-*`` left by killed runs whose process is gone."""
    parent, base = os.path.split(dst)
    for name in os.listdir(parent or "."):
        m = re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}", name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
