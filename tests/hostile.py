"""Checks of the Safety promises for hostile-input tests: a command that refuses does so in one line (exit code 2,
no traceback, no raw control character), reads nothing from outside (`SECRET`, the content of files placed outside
checkpoints, appears in no output), and changes nothing: every watched path, and the listing of the directory
holding it, is the same before and after (no input or special file touched, no temporary left behind)."""

import hashlib
import json
import os
import stat
import subprocess
import sys

from helpers import ROOT, moekit

SECRET = "moekit-test-secret-4c1f"  # the content of files outside checkpoints: must never reach any output


def outside_file(root, name: str = "secret.json") -> str:
    """A file outside every checkpoint, holding SECRET (valid JSON, so a reader that follows a link parses it)."""
    path = os.path.join(str(root), name)
    with open(path, "w") as f:
        json.dump({"secret": SECRET, "model_type": SECRET, "final_lr": 1e30}, f)
    return path


def snapshot(*paths) -> dict:
    """{path: kind and content digest} of everything under each of `paths` (symlinks not followed), and the
    listing of each one's parent directory."""
    state = {}
    for top in map(str, paths):
        parent = os.path.dirname(os.path.abspath(top))
        state[f"listing of {parent}"] = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
        for path in _walk(top):
            state[path] = _digest(path)
    return state


def _walk(top: str):
    if not os.path.lexists(top):
        return
    yield top
    if os.path.isdir(top) and not os.path.islink(top):
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                yield os.path.join(root, name)


def _digest(path: str) -> str:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"link -> {os.readlink(path)}"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if not stat.S_ISREG(st.st_mode):
        return f"special {stat.S_IFMT(st.st_mode):o}"
    with open(path, "rb") as f:
        return "file " + hashlib.sha256(f.read()).hexdigest()


def check_line(err: str) -> None:
    """One printable line, no traceback, no secret."""
    assert err.endswith("\n") and err.count("\n") == 1, err[-3000:]
    assert "Traceback" not in err and all(ch.isprintable() for ch in err[:-1]), repr(err[-3000:])
    assert SECRET not in err, err


def refused(capsys, *argv, watch=(), code: int = 2) -> str:
    """`moekit ARGV` in-process must fail with `code` and one line, print nothing else, and leave every path in
    `watch` as it was. Returns the error line."""
    before = snapshot(*watch)
    rc, out, err = moekit(capsys, *argv)
    assert rc == code and out == "", (rc, out[-2000:], err[-3000:])
    check_line(err)
    after = snapshot(*watch)
    assert before == after, _changes(before, after)
    return err


def refused_in_time(*argv, watch=(), timeout: float = 60, code: int = 2, env: dict | None = None) -> str:
    """The same through `python -m moekit` in a child process that must end within `timeout` seconds (a hang is
    a failure, not a stuck test run)."""
    before = snapshot(*watch)
    p = subprocess.run([sys.executable, "-m", "moekit", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == code and SECRET not in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    check_line(p.stderr)
    after = snapshot(*watch)
    assert before == after, _changes(before, after)
    return p.stderr


def _changes(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    return "; ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k))[:3000]
