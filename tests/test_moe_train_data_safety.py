"""moe.train.data, hostile and careless training data through the command line: text that is not UTF-8, JSON with
a 5000-digit integer or deep nesting are one line naming the file and line; lone surrogates become U+FFFD; a token
cache of floats or out-of-range ids is rebuilt, never used as ids; a full disk or an unwritable cache directory is
one line naming the path (with the hint --token-cache DIR), leaving no temporary (tests/hostile.py)."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, bpe_tokenizer, moekit
from hostile import SECRET, check_line, refused, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--no-progress"]
TEXT = "def f(x):\n    return x + 1\n"


def refused_when_files_are_limited(limit: int, *argv, watch=(), timeout: float = 120, started: bool = False) -> str:
    """`python -m moekit ARGV` in a child process that may write files of at most `limit` bytes (RLIMIT_FSIZE,
    SIGXFSZ ignored: a longer write fails with EFBIG, as a full disk fails with ENOSPC): exit 2, one line, every
    watched path unchanged (`started`: the command had started its work, and said so on stdout). Returns the error
    line."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(*watch)
    p = subprocess.run([sys.executable, "-m", "moekit", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, preexec_fn=limit_files, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and (started or p.stdout == ""), (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert SECRET not in p.stdout
    check_line(p.stderr)
    assert snapshot(*watch) == before
    return p.stderr


def jsonl(path, *rows: str):
    path.write_bytes(b"".join(r.encode("utf-8", "surrogatepass") if isinstance(r, str) else r for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    (tmp_path / "d.txt").write_text(TEXT * 40)
    return tmp_path / "d.txt"


# ---- what the data holds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, words", [
    ("jsonl-bytes", "d.jsonl: line 2 is not UTF-8 text"),
    ("text-bpe", "d.txt: line 3 is not UTF-8 text"),
    ("huge-integer", "d.jsonl: line 2 is not JSON moekit reads"),
    ("deep-nesting", "d.jsonl: line 1 is JSON nested too deeply"),
])
def test_data_that_is_not_utf8_text_or_sane_json_is_one_line(case, words, tmp_path, capsys):
    good = json.dumps({"text": TEXT * 20}) + "\n"
    extra = []
    if case == "jsonl-bytes":
        path = jsonl(tmp_path / "d.jsonl", good, b'{"text": "caf\xe9 \xff"}\n', good)
    elif case == "text-bpe":
        path = tmp_path / "d.txt"
        path.write_bytes(TEXT.encode() + b"x = '\xc3\x28'\n")
        bpe_tokenizer(tmp_path / "tok")
        extra = ["--tokenizer", tmp_path / "tok"]
    elif case == "huge-integer":
        path = jsonl(tmp_path / "d.jsonl", good, '{"text": ' + "7" * 5000 + "}\n")
    else:
        path = jsonl(tmp_path / "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    err = refused(capsys, "train", "tiny", "--data", path, "--out", tmp_path / "out", *TRAIN, *extra,
                  watch=[path, tmp_path / "out"])
    assert words in err, err


def test_lone_surrogates_become_the_replacement_character(tmp_path, capsys):
    path = jsonl(tmp_path / "d.jsonl", *[json.dumps({"text": TEXT + "\ud800 and \udfff" + TEXT}) + "\n"] * 20)
    rc, _, err = moekit(capsys, "train", "tiny", "--data", path, "--out", tmp_path / "out", "--token-cache",
                        tmp_path / "cache", *TRAIN)
    assert rc == 0, err
    (cache,) = (tmp_path / "cache").glob("*.npy")
    ids = np.load(cache).tolist()
    assert ids[len(TEXT):len(TEXT) + 3] == list("\ufffd".encode()) and ids.count(0xEF) == 40
    bpe_tokenizer(tmp_path / "tok")  # and through a BPE tokenizer, which refuses surrogates outright
    rc, _, err = moekit(capsys, "train", "tiny", "--data", path, "--tokenizer", tmp_path / "tok", "--out",
                        tmp_path / "out2", *TRAIN)
    assert rc == 0, err


# ---- the token cache -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["floats", "out-of-range"])
def test_a_token_cache_that_is_not_ids_is_rebuilt(bad, data, tmp_path, capsys):
    argv = ["train", "tiny", "--data", data, "--token-cache", tmp_path / "cache", *TRAIN]
    assert moekit(capsys, *argv, "--out", tmp_path / "a")[0] == 0
    (cache,) = (tmp_path / "cache").glob("*.npy")
    good = np.load(cache)
    np.save(cache, good.astype(np.float32) + 0.5 if bad == "floats" else np.full_like(good, 60000))
    rc, _, err = moekit(capsys, *argv, "--out", tmp_path / "b")
    assert rc == 0, err
    assert np.array_equal(np.load(cache), good) and np.load(cache).dtype == good.dtype
    first = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("loss") for m in first] == [m.get("loss") for m in again]


def test_a_full_disk_while_caching_tokens_is_one_line_and_leaves_no_temporary(data, tmp_path, capsys, monkeypatch):
    from moekit.moe.train import data as data_module

    class FullDisk:
        """A file that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, path, mode):
            self.f, self.path = open(path, mode), path

        def write(self, chunk):
            if self.f.tell() + len(chunk) > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(data_module, "open", lambda path, mode="r", *a, **k: FullDisk(path, mode) if "w" in mode
                        else open(path, mode, *a, **k), raising=False)
    (tmp_path / "cache").mkdir()
    err = refused(capsys, "train", "tiny", "--data", data, "--token-cache", tmp_path / "cache", "--out",
                  tmp_path / "out", *TRAIN, watch=[tmp_path / "cache", data, tmp_path / "out"])
    assert "cache" in err and "cannot write the token cache (No space left on device)" in err and ".tmp-" not in err


def test_a_file_size_limit_while_caching_tokens_is_one_line(data, tmp_path):
    (tmp_path / "cache").mkdir()
    err = refused_when_files_are_limited(1024, "train", "tiny", "--data", data, "--token-cache", tmp_path / "cache",
                                         "--out", tmp_path / "out", *TRAIN,
                                         watch=[tmp_path / "cache", data, tmp_path / "out"])
    assert "cannot write the token cache (File too large); free some space or pass --token-cache DIR" in err


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_cache_directory_says_token_cache(where, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    if where == "read-only":  # as a read-only home is (the tests may run as root, who may write anywhere)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
        makedirs = os.makedirs

        def read_only(path, *a, **k):
            if str(path).startswith(str(tmp_path / "home")):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return makedirs(path, *a, **k)

        monkeypatch.setattr(os, "makedirs", read_only)
    err = refused(capsys, "train", "tiny", "--data", data, "--out", tmp_path / "out", *TRAIN,
                  watch=[tmp_path / "file", data, tmp_path / "out"])
    assert "cannot create the token cache directory" in err and "pass --token-cache DIR" in err, err
