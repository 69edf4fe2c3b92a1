"""Shared file I/O for every room: reading JSON and config.json with one-line errors, atomic JSON files and
atomic output directories, package versions.

Atomic outputs: a directory is built in ``DST.tmp-<random>`` (locked while a run works in it), fsynced, then
renamed to DST, so DST exists only when complete; an existing DST is never replaced without ``force``, not even
one that another run published meanwhile. Leftovers of killed runs (no lock held) are removed by the next run to
the same DST.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
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
    make_parents(path)
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


def check_parents(path: str) -> None:
    """Fail early, in one line, if `path` cannot be created because one of the directories above it is a file."""
    probe = os.path.dirname(os.path.abspath(path))
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise CheckpointError(f"{probe}: Not a directory (it is a file); cannot create {path} inside it")


def make_parents(path: str) -> None:
    """Create the directories above `path` (see `check_parents`)."""
    check_parents(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---- atomic output directories ---------------------------------------------------------------------

def check_path(path: str | os.PathLike, what: str = "output") -> str:
    """An absolute path for a non-empty `path`; an empty one would silently mean the current directory."""
    if not str(path).strip():
        raise ConfigError(f"the {what} path is empty; expected a directory name")
    return os.path.abspath(str(path)).rstrip("/") or "/"


def check_disjoint(src: str | os.PathLike, dst: str | os.PathLike, src_name: str = "SRC",
                   dst_name: str = "DST") -> None:
    """Refuse a `dst` equal to, inside, or containing `src`, however either is spelled (symlinks resolved)."""
    a, b = os.path.realpath(str(src)), os.path.realpath(str(dst))
    if a == b or os.path.commonpath([a, b]) in (a, b):
        raise ConfigError(f"{dst_name} {dst} and {src_name} {src} overlap ({b} vs {a}); {dst_name} must be a "
                          f"directory outside {src_name} that does not contain it")


def check_free_space(path: str, needed: int, what: str = "the output") -> None:
    """Refuse to start writing `needed` bytes where the file system has less free space (with 1% to spare)."""
    parent = path
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent) or "."
    free = shutil.disk_usage(parent).free
    if free < needed * 1.01:
        raise CheckpointError(f"{path}: {what} needs {needed / 1e9:,.2f} GB but {parent} has {free / 1e9:,.2f} GB "
                              "free; free some space or pass --ignore-free-space")


_RENAME_NOREPLACE = 1


def rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists, without a window between the check
    and the rename (Linux renameat2(RENAME_NOREPLACE); elsewhere rename, which refuses a non-empty directory)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), _RENAME_NOREPLACE) == 0:  # -100: AT_FDCWD
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # the file system does not support the flag: fall back
            raise OSError(err, os.strerror(err), dst) if err != errno.EEXIST else FileExistsError(
                err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def locked_dir(path: str) -> int:
    """Create directory `path` already holding an exclusive lock on it: made under a hidden name, locked, then
    renamed, so no one ever sees it unlocked. Returns the lock's file descriptor (close it to release)."""
    parent, base = os.path.split(path)
    hidden = os.path.join(parent, f".{base}.new-{uuid.uuid4().hex[:8]}")  # unique: a killed run's leftover is inert
    os.mkdir(hidden)
    fd = os.open(hidden, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rename_noreplace(hidden, path)  # never over a directory that appeared meanwhile, even an empty one
    except BaseException:
        os.close(fd)
        os.rmdir(hidden)
        raise
    return fd


def try_lock(path: str) -> int | None:
    """An exclusive lock on directory `path` (its file descriptor), or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class AtomicDir:
    """Build a directory in ``DST.tmp-<random>`` and rename it to DST on success; remove it on failure.

    The temporary directory is locked (flock) for the run's life, so a later run knows a leftover is stale when
    it can take the lock, whichever PID namespace the runs live in. An existing DST is refused unless `force`,
    both at the start and at the final rename (which never replaces an output that appeared meanwhile unless
    `force`)."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = check_path(dst)
        self.force = force
        self.tmp, self._lock = None, None

    def __enter__(self) -> str:
        if os.path.lexists(self.dst) and not self.force:
            raise CheckpointError(f"{self.dst} already exists; pass --force (force=True) to overwrite it")
        make_parents(self.dst)
        clean_stale_temporaries(self.dst)
        self.tmp = f"{self.dst}.tmp-{uuid.uuid4().hex[:12]}"
        self._lock = locked_dir(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            for name in os.listdir(self.tmp):
                fsync(os.path.join(self.tmp, name))
            fsync(self.tmp)
            try:
                publish(self.tmp, self.dst, self.force)
            except CheckpointError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            return False
        finally:
            os.close(self._lock)


def publish(tmp: str, dst: str, force: bool) -> None:
    """Rename the finished directory `tmp` to `dst` without ever replacing an existing `dst` unless `force`
    (not even one another run published a moment ago). Raises CheckpointError, leaving `tmp` in place."""
    for _ in range(10):
        old = None
        if force and os.path.lexists(dst):
            old = f"{dst}.old-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(dst, old)
            except FileNotFoundError:  # another run replaced it first: try again
                old = None
        try:
            rename_noreplace(tmp, dst)
        except FileExistsError:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if force:
                continue  # a concurrent run published in between: replace its output too
            raise CheckpointError(f"{dst} appeared while this run was writing it (another run?); nothing "
                                  "replaced, pass --force to overwrite it") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        fsync(os.path.dirname(dst))
        return
    raise CheckpointError(f"{dst}: other runs keep replacing it; gave up")


def fsync(path: str) -> None:
    """Flush a file or directory to disk (a no-op for anything else)."""
    if os.path.isfile(path) or os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale_temporaries(dst: str) -> None:
    """Remove ``DST.tmp-*`` / ``DST.old-*`` left by killed runs: those whose lock no live process holds."""
    parent, base = os.path.split(dst)
    for name in os.listdir(parent or "."):
        if re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-[0-9a-f]+(?:-[0-9a-f]+)?", name):
            path = os.path.join(parent, name)
            fd = try_lock(path)
            if fd is not None:
                try:
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(fd)


def file_sha256(path: str, stop: threading.Event | None = None) -> str:
    """sha256 of a file, read 16 MiB at a time (for weight files: the digest the Hugging Face hub shows); gives up
    (returning "") once `stop` is set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            if stop is not None and stop.is_set():
                return ""
            h.update(chunk)
    return h.hexdigest()
