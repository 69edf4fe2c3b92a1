"""Shared file I/O for every room: the one guarded way to read a file of a checkpoint or run, and the one guarded
way to write an output.

Reading: a file named inside a checkpoint or run directory must resolve inside it (symlinks followed; a Hugging
Face hub cache snapshot may link into its model's cache folder), must be a regular file of a bounded size, and
JSON is parsed with one-line errors (`inside`, `read_json`, `read_side_json`, `read_config_json`).

Writing: an output never overlaps an input (equal, inside or containing, by real path), and `force` replaces only
what moekit wrote: a directory holding moekit's marker file, or a regular file (`check_output`,
`check_output_file`). A directory is built in ``DST.tmp-<random>`` (marked, and locked while a run works in it),
fsynced, then renamed to DST, so DST exists only when complete; an existing DST is never replaced without
``force``, not even one that another run published meanwhile. Leftovers of killed runs (marked, no lock held) are
removed by the next run to the same DST; nothing unmarked is ever removed.
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
import stat
import threading
import uuid
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import CheckpointError, ConfigError

MAX_JSON_BYTES = 64 << 20  # a config or side file (released models' tokenizer.json files are under 20 MB)
MARKER = ".moekit"  # in every directory moekit writes: what --force may replace and a cleanup may remove
MARKER_TEXT = "written by moekit: `--force` may replace this directory\n"


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in `path`, with a one-line error for a missing, special, oversized, non-UTF-8 or malformed
    file (deep nesting and numbers of thousands of digits included)."""
    path = str(path)
    data = read_bytes(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); expected a {what}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply; expected a {what}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: not valid JSON ({str(e)[:80]}); expected a {what}") from None


def read_bytes(path: str, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (never a FIFO or device, which could block or never
    end), with one-line errors."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: is a directory; expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file (a FIFO, socket or device); expected a {what}")
    if st.st_size > max_bytes:
        raise ConfigError(f"{path}: {st.st_size:,} bytes; a {what} holds at most {max_bytes:,}")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def allowed_root(path: str) -> str:
    """The folder a checkpoint or run directory's files may resolve into: the directory itself, or for a Hugging
    Face hub cache snapshot (``models--ORG--NAME/snapshots/REV``, whose files link to ``../../blobs/``) that
    model's cache folder."""
    real = os.path.realpath(path)
    parent, rev = os.path.split(real)
    root, snapshots = os.path.split(parent)
    if snapshots == "snapshots" and os.path.basename(root).startswith(("models--", "datasets--")) and rev:
        return root
    return real


def inside(directory: str | os.PathLike, name: str, what: str = "file") -> str:
    """The real path of `name` in `directory`; a CheckpointError if it resolves outside (a symlink out of the
    checkpoint or run, or a name with `..`)."""
    directory = str(directory)
    root = allowed_root(directory)
    real = os.path.realpath(os.path.join(directory, name))
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(f"{directory}: {what} '{name}' points outside the checkpoint; refusing to read it")
    return real


def read_side_json(directory: str | os.PathLike, name: str, required: bool = False) -> dict | None:
    """The JSON object in the file `name` of a checkpoint or run `directory` (config.json, train_config.json,
    upcycling.json, tokenizer_config.json, progress.json, ...), read through `inside`; None when absent and not
    `required`."""
    path = os.path.join(str(directory), name)
    if not os.path.lexists(path):
        if required:
            raise ConfigError(f"{path}: {name} not found")
        return None
    d = read_json(inside(directory, name, name), name)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def config_path(path: str | os.PathLike) -> str:
    """A model directory's config.json, or the path itself when it names a file."""
    path = str(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object in a config.json, or a directory's (which must lie inside it), with one-line errors for a
    missing or bad file."""
    if os.path.isdir(path):
        return read_side_json(path, "config.json", required=True)
    path = str(path)
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


def write_json_atomic(path: str | os.PathLike, obj: Any, force: bool = False, what: str = "--json") -> None:
    """JSON to a standalone file `path` (its directory made if missing) through a temporary file, fsynced, then
    renamed: readers see the old file or the new one, never a half-written one. An existing file is replaced only
    with `force`, and only a regular file (see `check_output_file`)."""
    path = check_output_file(path, force, what)
    make_parents(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
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


# ---- outputs ---------------------------------------------------------------------------------------

SUFFIX_ROOM = 24  # the longest suffix moekit adds to an output's name (.tmp-<12 hex>, .partial, ...)


def check_path(path: str | os.PathLike, what: str = "output") -> str:
    """An absolute path for a non-empty `path`; an empty one would silently mean the current directory, and one
    too long for the file system would fail halfway through creating its parents."""
    if not str(path).strip():
        raise ConfigError(f"the {what} path is empty; expected a directory name")
    path = os.path.abspath(str(path)).rstrip("/") or "/"
    longest = max((len(os.fsencode(part)) for part in path.split("/")), default=0)
    if len(os.fsencode(path)) + SUFFIX_ROOM >= 4096 or longest + SUFFIX_ROOM > 255:
        raise ConfigError(f"the {what} path is too long for the file system ({len(path):,} characters, a name of "
                          f"{longest}); expected at most 4,000 characters and 230 per name")
    return path


def check_disjoint(src: str | os.PathLike, dst: str | os.PathLike, src_name: str = "SRC",
                   dst_name: str = "DST") -> None:
    """Refuse a `dst` equal to, inside, or containing `src`, however either is spelled (symlinks resolved)."""
    a, b = os.path.realpath(str(src)), os.path.realpath(str(dst))
    if a == b or os.path.commonpath([a, b]) in (a, b):
        raise ConfigError(f"{dst_name} {dst} and {src_name} {src} overlap ({b} vs {a}); {dst_name} must be a "
                          f"directory outside {src_name} that does not contain it")


def check_inputs(dst: str, dst_name: str, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """`check_disjoint` of the output `dst` against every input (name, path) that exists on disk (data specs such
    as builtin:arith are not paths)."""
    for name, src in inputs:
        if src is not None and str(src).strip() and os.path.lexists(str(src)):
            check_disjoint(src, dst, name, dst_name)


def check_output(path: str | os.PathLike, force: bool, what: str = "DST",
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> str:
    """The absolute path of an output directory that may be written: absent, or with `force` a directory moekit
    wrote (its marker inside), never a symlink, file or special file; and overlapping no input."""
    path = check_path(path, what)
    check_inputs(path, what, inputs)
    if path == "/" or os.path.ismount(path):
        raise ConfigError(f"{what} {path} is a mount point; expected a directory to create")
    if os.path.lexists(path):
        if not force:
            raise CheckpointError(f"{path} already exists; pass --force (force=True) to overwrite it")
        check_replaceable(path, what)
    return path


def check_replaceable(path: str, what: str = "DST") -> None:
    """Refuse to replace `path` unless it is a real directory holding moekit's marker (an output moekit wrote)."""
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link; moekit does not replace it, even with --force: remove it or "
                              f"give another {what}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory (a file or special file); moekit does not replace it, even "
                              f"with --force: give another {what}")
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path} was not written by moekit (no {MARKER} file in it); moekit does not replace it, "
                              f"even with --force: remove it yourself or give another {what}")


def check_output_file(path: str | os.PathLike, force: bool, what: str = "--json") -> str:
    """The absolute path of an output file that may be written: absent, or with `force` a regular file (never a
    directory, FIFO, socket or device)."""
    path = check_path(path, what)
    if os.path.lexists(path):
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{what} {path} exists and is not a regular file (a directory, FIFO, socket or "
                                  "device); moekit writes only new or regular files")
        if not force:
            raise CheckpointError(f"{what} {path} already exists; pass --force to overwrite it")
    return path


def mark(directory: str) -> None:
    """Put moekit's marker file in a directory it is writing."""
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write(MARKER_TEXT)


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

    The temporary directory holds moekit's marker (published with it) and is locked (flock) for the run's life,
    so a later run knows a leftover is stale when it can take the lock, whichever PID namespace the runs live in.
    DST is checked by `check_output` (against `inputs` too) at the start, and again at the final rename, which
    never replaces an output that appeared meanwhile unless `force`."""

    def __init__(self, dst: str | os.PathLike, force: bool = False,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), what: str = "DST"):
        self.dst = check_path(dst, what)
        self.force, self.inputs, self.what = force, list(inputs), what
        self.tmp, self._lock = None, None

    def __enter__(self) -> str:
        check_output(self.dst, self.force, self.what, self.inputs)
        make_parents(self.dst)
        clean_stale_temporaries(self.dst)
        self.tmp = f"{self.dst}.tmp-{uuid.uuid4().hex[:12]}"
        self._lock = locked_dir(self.tmp)
        mark(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            try:
                for name in os.listdir(self.tmp):
                    fsync(os.path.join(self.tmp, name))
                fsync(self.tmp)
                publish(self.tmp, self.dst, self.force)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            return False
        finally:
            os.close(self._lock)


def publish(tmp: str, dst: str, force: bool) -> None:
    """Rename the finished directory `tmp` to `dst` without ever replacing an existing `dst` unless `force`
    (not even one another run published a moment ago), and then only a directory moekit wrote. Raises
    CheckpointError, leaving `tmp` in place."""
    for _ in range(10):
        old = None
        if force and os.path.lexists(dst):
            check_replaceable(dst)
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
            shutil.rmtree(old, ignore_errors=True)
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
    """Remove ``DST.tmp-*`` / ``DST.old-*`` left by killed runs: directories (not symlinks) that hold moekit's
    marker and whose lock no live process holds. Anything else of those names is the user's and stays."""
    parent, base = os.path.split(dst)
    for name in os.listdir(parent or "."):
        path = os.path.join(parent, name)
        if re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-[0-9a-f]+(?:-[0-9a-f]+)?", name) and not os.path.islink(path) \
                and os.path.isfile(os.path.join(path, MARKER)):
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


def memory_available() -> int | None:
    """Bytes of memory the machine can still give (MemAvailable of /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed: float, what: str, hint: str = "", available: int | None = None,
                 where: str = "") -> None:
    """Refuse, before allocating, work estimated to need more memory than is `available` (default: what the
    machine has available; a GPU's free memory with `where` naming it)."""
    free = memory_available() if available is None else available
    if free is not None and needed > free:
        raise ConfigError(f"{what} needs about {needed / 1e9:,.1f} GB of {'GPU ' if where else ''}memory; "
                          f"{free / 1e9:,.1f} GB is {'free on ' + where if where else 'available'}"
                          f"{'; ' + hint if hint else ''}")
