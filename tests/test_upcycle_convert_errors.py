"""Bad input to `moekit upcycle`: a one-line error, exit code 2, and nothing left at DST; a killed run leaves only
a temporary directory, which the next run removes."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moekit.cli import main
from moekit.llama.checkpoint import INDEX_NAME

from helpers import ROOT, sharded_dense


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return sharded_dense(tmp_path_factory.mktemp("src") / "dense", vocab_size=101)


def run_upcycle(capsys, *args):
    rc = main(["upcycle", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err


def left_behind(dst):
    return [n for n in os.listdir(os.path.dirname(dst)) if n.startswith(os.path.basename(dst))]


def damaged(tmp_path, dense_dir, how):
    src = tmp_path / "src"
    shutil.copytree(dense_dir, src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 100)
    elif how == "missing":
        shard.unlink()
    elif how == "not-llama":
        cfg = (src / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
        (src / "config.json").write_text(cfg)
    elif how == "no-config":
        (src / "config.json").unlink()
    return src, shard.name


@pytest.mark.parametrize("how, message", [
    ("missing-dir", "checkpoint directory not found"),
    ("no-config", "no config.json"),
    ("not-llama", "model_type 'gpt2' is not supported"),
    ("truncated", "truncated"),
    ("missing", f"listed in {INDEX_NAME} is missing"),
])
def test_bad_source(tmp_path, dense_dir, capsys, how, message):
    src = tmp_path / "nowhere" if how == "missing-dir" else damaged(tmp_path, dense_dir, how)[0]
    dst = tmp_path / "out" / "moe"
    rc, err = run_upcycle(capsys, src, dst)
    assert rc == 2 and err.startswith("moekit upcycle: error: ") and len(err.splitlines()) == 1
    assert message in err, err
    assert not os.path.exists(dst) and (not os.path.exists(dst.parent) or left_behind(str(dst)) == [])


@pytest.mark.parametrize("args, message", [
    (["--recipe", "granular", "--granularity", "3"], "intermediate_size 64 is not divisible by --granularity 3"),
    (["--shared-experts", "2"], "intermediate_size 64 is not divisible by 3 shards (--shared-experts 2 + 1)"),
    (["--top-k", "5", "--num-experts", "4"], "--top-k 5 is greater than --num-experts 4"),
    (["--format", "mixtral", "--moe-layers", "every-other"], "format 'mixtral' cannot express this config "
                                                               "(dense layers [0] (every Mixtral layer is MoE))"),
    (["--format", "mixtral", "--shared-experts", "1"], "format 'mixtral' cannot express"),
    (["--moe-layers", "0,9"], "--moe-layers: layer 9 does not exist (the model has 2 layers)"),
])
def test_bad_options(tmp_path, dense_dir, capsys, args, message):
    dst = tmp_path / "moe"
    rc, err = run_upcycle(capsys, dense_dir, dst, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert left_behind(str(dst)) == []


def test_existing_dst_needs_force_and_src_is_protected(tmp_path, dense_dir, capsys):
    dst = tmp_path / "moe"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = run_upcycle(capsys, dense_dir, dst)
    assert rc == 2 and "already exists; pass --force" in err and len(err.splitlines()) == 1
    assert os.listdir(dst) == ["keep.txt"] and left_behind(str(dst)) == ["moe"]
    rc, err = run_upcycle(capsys, dense_dir, dense_dir, "--force")
    assert rc == 2 and "must be a directory outside SRC" in err
    rc, err = run_upcycle(capsys, dense_dir, dst, "--force", "--num-experts", "2")  # a directory of the user's
    assert rc == 2 and "was not written by moekit (no .moekit file in it)" in err and os.listdir(dst) == ["keep.txt"]
    ours = tmp_path / "ours"
    assert run_upcycle(capsys, dense_dir, ours, "--num-experts", "2")[0] == 0
    (ours / "stale.txt").write_text("from the earlier run")
    assert run_upcycle(capsys, dense_dir, ours, "--force", "--num-experts", "2")[0] == 0  # moekit's own: replaced
    assert "stale.txt" not in os.listdir(ours) and left_behind(str(ours)) == ["ours"]


KILLED_CHILD = """
import sys, time
from moekit.llama import checkpoint
write = checkpoint.ShardedWriter.write
def slow_write(self, name, tensor):
    write(self, name, tensor)
    if name.endswith("experts.1.w1.weight"):
        self._file.flush()
        open(sys.argv[3], "w").close()  # tell the test we are mid-write, then wait to be killed
        time.sleep(60)
checkpoint.ShardedWriter.write = slow_write
from moekit.cli import main
main(["upcycle", sys.argv[1], sys.argv[2], "--no-progress", "--num-experts", "4", "--max-shard-size", "20KB"])
"""


@pytest.mark.slow
def test_killed_mid_write_leaves_no_dst_and_the_next_run_cleans_up(tmp_path, dense_dir, capsys):
    dst, marker = tmp_path / "moe", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(dense_dir), str(dst), str(marker)], cwd=ROOT)
    deadline = time.time() + 60
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the middle of the write"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    tmp = left_behind(str(dst))
    assert len(tmp) == 1 and tmp[0].startswith("moe.tmp-") and not dst.exists()
    assert any(n.endswith(".safetensors") for n in os.listdir(tmp_path / tmp[0]))  # it was writing shards
    assert run_upcycle(capsys, dense_dir, dst, "--num-experts", "4")[0] == 0
    assert left_behind(str(dst)) == ["moe"] and (dst / "upcycling.json").exists()
