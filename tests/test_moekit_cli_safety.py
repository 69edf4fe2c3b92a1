"""moekit.cli, data safety: a source is never destroyed, an output is never replaced without --force (not even by
a concurrent run), a live run's temporary directory is never taken for a stale one, and the file system's
errors, SIGTERM and Ctrl-C end in one line with the temporary directory removed."""

import errno
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from test_llama_checkpoint_safety import digest

from moekit.cli import main
from moekit.llama.io import locked_dir
from moekit.upcycle import verify_checkpoints

from helpers import ROOT, moekit, one_line_error, sharded_dense


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return sharded_dense(tmp_path_factory.mktemp("src") / "dense", vocab_size=300)


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---- sources are never destroyed ------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["alias", "alias-inside", "dst-contains-src", "dot-dot"])
def test_upcycle_never_writes_over_its_source_however_spelled(dense_dir, tmp_path, capsys, spelling):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "dense"
    os.symlink(dense_dir, src)  # the source reached through a link
    before = digest(dense_dir)
    dst = {"alias": work / "dense", "alias-inside": src / "moe", "dst-contains-src": dense_dir.parent,
           "dot-dot": dense_dir / ".." / dense_dir.name}[spelling]
    if spelling == "alias":
        dst = tmp_path / "alias2"
        os.symlink(dense_dir, dst)
    err = one_line_error(capsys, "upcycle", src, dst, "--force", "--no-progress")
    assert "overlap" in err and digest(dense_dir) == before


def test_train_never_writes_over_its_source(dense_dir, tmp_path, capsys):
    alias = tmp_path / "alias"
    os.symlink(dense_dir, alias)
    before = digest(dense_dir)
    for out in (alias, dense_dir / "trained"):
        err = one_line_error(capsys, "train", dense_dir, "--out", out, "--force", "--steps", "1", "--no-progress")
        assert "overlap" in err
    assert digest(dense_dir) == before


@pytest.mark.parametrize("argv", [["upcycle", "SRC", ""], ["train", "tiny", "--out", ""], ["upcycle", "", "x"]])
def test_empty_paths_are_refused(dense_dir, tmp_path, capsys, argv):
    argv = [str(dense_dir) if a == "SRC" else a for a in argv]
    before = names(tmp_path)
    assert "empty" in one_line_error(capsys, *argv)
    assert names(tmp_path) == before


# ---- outputs are never replaced without --force ----------------------------------------------------------

RACER = """
import os, sys, time
from moekit.llama import io
publish = io.publish
def publish_together(tmp, dst, force):  # every racer has checked that DST is absent; now all publish at once
    open(sys.argv[3] + "." + sys.argv[4], "w").close()
    deadline = time.time() + 60
    while len([f for f in os.listdir(os.path.dirname(sys.argv[3])) if f.startswith("ready.")]) < 3:
        time.sleep(0.01)
        assert time.time() < deadline
    publish(tmp, dst, force)
io.publish = publish_together
from moekit.cli import main
sys.exit(main(["upcycle", sys.argv[1], sys.argv[2], "--no-progress", "--seed", sys.argv[4], *sys.argv[5:]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_concurrent_upcycles_to_one_dst(dense_dir, tmp_path, force):
    dst = tmp_path / "moe"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(dense_dir), str(dst), str(tmp_path / "ready"),
                                str(seed), *(["--force"] if force else [])], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for seed in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in racers]
    codes = sorted(rc for rc, _ in results)
    if force:
        assert codes == [0, 0, 0], results
    else:
        assert codes == [0, 2, 2], results
        for rc, err in results:
            if rc:
                assert err.count("\n") == 1 and "appeared while this run was writing it" in err, err
    assert [n for n in names(tmp_path) if n.startswith("moe")] == ["moe"]  # no temporaries left
    assert verify_checkpoints(dense_dir, dst).ok  # the survivor is complete and valid


HOLDER = """
import sys, time
from moekit.llama.io import locked_dir, mark
fd = locked_dir(sys.argv[1])
mark(sys.argv[1])  # as every run of moekit marks its temporary
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_runs_temporary_is_not_stale_whatever_its_name_says(dense_dir, tmp_path, capsys):
    dst = tmp_path / "moe"
    live = tmp_path / "moe.tmp-999999-0badc0de"  # a PID that does not exist here: another PID namespace
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (live / "step-000300").mkdir()  # the other run's work
        assert main(["upcycle", str(dense_dir), str(dst), "--num-experts", "2", "--no-progress"]) == 0
        assert (live / "step-000300").is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert main(["upcycle", str(dense_dir), str(dst), "--num-experts", "2", "--no-progress", "--force"]) == 0
    assert not live.exists()  # its lock died with its process: now it is stale, and cleaned
    fd = locked_dir(str(tmp_path / "moe.tmp-mine"))  # a lock held by this very process also counts
    try:
        assert main(["upcycle", str(dense_dir), str(dst), "--num-experts", "2", "--no-progress", "--force"]) == 0
        assert (tmp_path / "moe.tmp-mine").is_dir()
    finally:
        os.close(fd)


def test_too_little_free_space_is_refused_up_front(dense_dir, tmp_path, capsys, monkeypatch):
    from moekit.llama import io

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 5000, 5000))
    err = one_line_error(capsys, "upcycle", dense_dir, tmp_path / "moe", "--num-experts", "2000", "--no-progress")
    assert "the MoE needs 0.10 GB but" in err and "--ignore-free-space" in err
    assert names(tmp_path) == []
    assert main(["upcycle", str(dense_dir), str(tmp_path / "moe"), "--num-experts", "2", "--no-progress",
                 "--ignore-free-space"]) == 0


# ---- the file system's errors are one line ----------------------------------------------------------------

def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/the/output/file")
    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["disk-full", "read-only", "denied"])
def test_write_errors_are_one_line_and_leave_nothing(dense_dir, tmp_path, capsys, monkeypatch, code):
    from moekit.llama import checkpoint

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", fail_with(code))
    for argv, where in ((["upcycle", dense_dir, tmp_path / "moe", "--no-progress"], "/the/output/file: "),
                        (["train", "tiny", "--out", tmp_path / "run", "--steps", "1", "--no-progress", "--seq-len",
                          "8"], f"{tmp_path / 'run.partial'}: cannot write the checkpoint (")):
        rc, _, err = moekit(capsys, *argv)  # (train has printed its first line: the schedule)
        assert rc == 2 and err.count("\n") == 1 and f"{where}{os.strerror(code)}" in err, err
        assert names(tmp_path) == []


def test_an_error_inside_the_temporary_names_the_users_path(dense_dir, tmp_path, capsys, monkeypatch):
    from moekit.llama import checkpoint

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.dir, "model.safetensors"))

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", disk_full)
    err = one_line_error(capsys, "upcycle", dense_dir, tmp_path / "moe", "--no-progress")
    assert f"{tmp_path / 'moe' / 'model.safetensors'}: No space left on device" in err and ".tmp-" not in err, err
    assert names(tmp_path) == []


def test_a_parent_that_is_a_file(dense_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv in (["upcycle", dense_dir, tmp_path / "file" / "moe", "--no-progress"],
                 ["train", "tiny", "--out", tmp_path / "file" / "run", "--steps", "1", "--no-progress"],
                 ["bench", "gemm", "--tokens", "8", "--hidden", "8", "--ffn", "8", "--experts", "2", "--iters", "1",
                  "--warmup", "0", "--sections", "gemm", "--passes", "fwd", "--json", tmp_path / "file" / "g.json"]):
        err = one_line_error(capsys, *argv)
        assert "Not a directory" in err and str(tmp_path / "file") in err, err
    assert names(tmp_path) == ["file"]


def test_train_into_a_directory_that_does_not_exist_yet(tmp_path, capsys):
    out = tmp_path / "runs" / "deeper" / "x"
    assert main(["train", "tiny", "--out", str(out), "--steps", "2", "--seq-len", "8", "--batch-size", "2",
                 "--eval-batches", "1", "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file() and names(out.parent) == ["x"]


# ---- signals ---------------------------------------------------------------------------------------------

SLOW_UPCYCLE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even if a launcher ignores it
from moekit.llama import checkpoint
write = checkpoint.ShardedWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    if name.endswith("experts.1.w1.weight"):
        open(sys.argv[3], "w").close()  # mid-write: tell the test, then wait for the signal
        time.sleep(60)
checkpoint.ShardedWriter.write = slow_write
from moekit.cli import main
sys.exit(main(["upcycle", sys.argv[1], sys.argv[2], "--no-progress", "--num-experts", "4"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_write_is_one_line_and_removes_the_temporary(dense_dir, tmp_path, sig, code, word):
    dst, marker = tmp_path / "moe", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", SLOW_UPCYCLE, str(dense_dir), str(dst), str(marker)], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists() and [n for n in names(tmp_path) if n.startswith("moe.tmp-")]
    child.send_signal(sig)
    assert child.wait(timeout=30) == code
    assert child.stderr.read() == f"moekit upcycle: {word}\n"
    assert names(tmp_path) == ["marker"]


SLOW_CLEANUP = SLOW_UPCYCLE.replace("from moekit.cli import main", """import shutil
rmtree = shutil.rmtree
def slow_rmtree(path, *a, **k):
    open(sys.argv[3] + "-cleanup", "w").close()  # the clean-up has begun: a second signal now
    time.sleep(1)
    rmtree(path, *a, **k)
shutil.rmtree = slow_rmtree
from moekit.cli import main""")


@pytest.mark.slow
def test_a_second_sigterm_during_the_clean_up_changes_nothing(dense_dir, tmp_path):
    dst, marker = tmp_path / "moe", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP, str(dense_dir), str(dst), str(marker)], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    for wait_for in (marker, tmp_path / "marker-cleanup"):
        deadline = time.time() + 60
        while not wait_for.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert wait_for.exists()
        child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 143
    assert child.stderr.read() == "moekit upcycle: terminated\n"  # no "Exception ignored ... Terminated"
    assert names(tmp_path) == ["marker", "marker-cleanup"]


STARTING = """
import sys
from moekit import main  # the entry point itself (the interpreter's own start-up is not ours to handle)
print("ready", flush=True)
sys.exit(main(["params", "mixtral-8x7b"]))
"""


@pytest.mark.slow
def test_ctrl_c_while_starting_up_prints_no_traceback():
    for delay in (0.0, 0.1, 0.4):  # while the command line, torch and the rooms import
        child = subprocess.Popen([sys.executable, "-c", STARTING], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert "Traceback" not in err and child.returncode in (0, 130), (delay, child.returncode, err)
        assert child.returncode == 0 or err.endswith("interrupted\n"), err


@pytest.mark.slow
def test_output_to_a_terminal_that_cannot_show_it(tmp_path):
    from helpers import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "m")
    p = subprocess.run([sys.executable, "-m", "moekit", "generate", str(model), "--prompt", "héllo \x1b[2J wörld",
                        "--max-new-tokens", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stdout.startswith("h\\xe9llo \\x1b[2J w\\xf6rld")  # escaped for the terminal, never raw


def test_ctrl_c_inside_a_class_statement_while_importing_is_one_line(monkeypatch, capsys):
    import builtins

    import moekit

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):  # what Python 3.11 raises for Ctrl-C in a dataclass field's __set_name__
        if name == "cli" or name.endswith(".cli"):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    monkeypatch.delitem(sys.modules, "moekit.cli", raising=False)
    assert moekit.main(["--help"]) == 130
    assert capsys.readouterr().err == "moekit: interrupted\n"
