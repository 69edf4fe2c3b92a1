"""llama.io, hostile and careless outputs through the command line: a user's directories that merely look like
moekit's temporaries survive a run; no output replaces an input (equal, inside or containing, by real path) or a
device, FIFO, symlink or directory moekit did not write, even with --force; a --json file is replaced only with
--force. Each refusal is one line and changes nothing (tests/hostile.py)."""

import json
import os

import pytest

from moekit.llama.io import MARKER

from helpers import moekit, sharded_dense
from hostile import refused

TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return sharded_dense(tmp_path_factory.mktemp("src") / "dense", vocab_size=300)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return tmp_path / "corpus"


def user_lookalikes(parent, base: str) -> list:
    """Directories of the user's named like moekit's temporaries of an output `base`, with content."""
    made = []
    for suffix in (".old-2023", ".tmp-1", ".tmp-0badc0de", ".old-0123456789ab"):
        d = parent / (base + suffix)
        d.mkdir()
        (d / "f").write_text("mine")
        made.append(d)
    return made


@pytest.mark.parametrize("command", ["upcycle", "tokenizer", "plot"])
def test_cleanup_never_removes_a_users_directory(command, dense_dir, corpus, tmp_path, capsys):
    out = tmp_path / "m"
    mine = user_lookalikes(tmp_path, "m")
    if command == "upcycle":
        argv = ["upcycle", dense_dir, out, "--num-experts", "2", "--no-progress"]
    elif command == "tokenizer":
        argv = ["tokenizer", "train", corpus, "--out", out, "--vocab-size", "300", "--no-progress"]
    else:
        run = tmp_path / "run"
        assert moekit(capsys, "train", "tiny", "--out", run, *TRAIN)[0] == 0
        argv = ["plot", run, "--out", out]
    rc, _, err = moekit(capsys, *argv)
    assert rc == 0, err
    assert all((d / "f").read_text() == "mine" for d in mine)  # untouched
    assert (out / MARKER).is_file()
    rc, _, err = moekit(capsys, *argv, "--force")  # replacing moekit's own output: still none of the user's
    assert rc == 0, err
    assert all((d / "f").read_text() == "mine" for d in mine)


def test_tokenizer_train_never_replaces_its_corpus(corpus, tmp_path, capsys):
    err = refused(capsys, "tokenizer", "train", corpus, "--out", corpus, "--force", "--no-progress", watch=[corpus])
    assert "overlap" in err
    err = refused(capsys, "tokenizer", "train", corpus / "a.txt", "--out", tmp_path, "--force", "--no-progress",
                  watch=[corpus])  # an output containing the data
    assert "overlap" in err


@pytest.mark.parametrize("flag", ["--data", "--val-data", "--tokenizer", "MODEL"])
def test_train_never_replaces_an_input(flag, dense_dir, corpus, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert moekit(capsys, "tokenizer", "train", corpus, "--out", tok, "--vocab-size", "300", "--no-progress")[0] == 0
    target = {"--data": corpus, "--val-data": corpus, "--tokenizer": tok, "MODEL": dense_dir}[flag]
    args = ["train", dense_dir if flag != "MODEL" else target, "--data", corpus]
    args += {"--val-data": ["--val-data", corpus], "--tokenizer": ["--tokenizer", tok]}.get(flag, [])
    for out in (target, target / "inside"):  # equal, then inside
        err = refused(capsys, *args, "--out", out, "--force", *TRAIN, watch=[target])
        assert "overlap" in err, err


@pytest.mark.parametrize("special", ["/dev/null", "fifo", "symlink", "file", "users-dir"])
def test_force_replaces_only_a_directory_moekit_wrote(special, dense_dir, tmp_path, capsys):
    target = {"/dev/null": "/dev/null"}.get(special, str(tmp_path / "out"))
    if special == "fifo":
        os.mkfifo(target)
    elif special == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / MARKER).write_text("even a marked directory behind a link")
        os.symlink(tmp_path / "elsewhere", target)
    elif special == "file":
        (tmp_path / "out").write_text("mine")
    elif special == "users-dir":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "f").write_text("mine")
    watch = [tmp_path] if special != "/dev/null" else []
    for argv in (["upcycle", dense_dir, target, "--num-experts", "2", "--no-progress"],
                 ["train", "tiny", "--out", target, *TRAIN]):
        err = refused(capsys, *argv, "--force", watch=watch)
        assert "moekit does not replace it, even with --force" in err or "mount point" in err, err


@pytest.mark.parametrize("what", ["checkpoint config.json", "fifo", "directory"])
def test_bench_json_replaces_only_a_regular_file_and_only_with_force(what, dense_dir, tmp_path, capsys):
    if what == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    elif what == "directory":
        target = tmp_path
    else:
        target = dense_dir / "config.json"
    argv = ["bench", "gemm", "--tokens", "8", "--hidden", "8", "--ffn", "8", "--experts", "2", "--iters", "1",
            "--warmup", "0", "--json", target]
    err = refused(capsys, *argv, watch=[target])
    assert "already exists; pass --force" in err or "not a regular file" in err
    if what != "checkpoint config.json":
        err = refused(capsys, *argv, "--force", watch=[target])
        assert "not a regular file" in err
    mine = tmp_path / "results.json"
    mine.write_text("{}")
    rc, _, err = moekit(capsys, *argv[:-1], mine, "--force")
    assert rc == 0 and json.loads(mine.read_text())["rows"], err


@pytest.mark.parametrize("kind", ["path", "name"])
def test_an_output_path_too_long_creates_nothing(kind, dense_dir, tmp_path, capsys):
    out = tmp_path.joinpath(*["d" * 200] * 25) / "moe" if kind == "path" else tmp_path / ("x" * 300)
    for argv in (["upcycle", dense_dir, out, "--no-progress"], ["train", "tiny", "--out", out, *TRAIN]):
        err = refused(capsys, *argv, watch=[tmp_path])
        assert "path is too long for the file system" in err


def test_the_root_is_no_output(dense_dir, capsys):
    for argv in (["upcycle", dense_dir, "/", "--force", "--no-progress"], ["train", "tiny", "--out", "/", *TRAIN]):
        err = refused(capsys, *argv)
        assert "mount point" in err or "overlap" in err or "already exists" in err, err
