"""moe.train.source (and the tokenizer it loads), hostile checkpoints through the command line: a side file that
`train` or `generate` reads (config.json, tokenizer_config.json, train_config.json, upcycling.json) linked from
outside the checkpoint is refused in one line that changes nothing, while a Hugging Face hub cache snapshot (whose
files link into its model's blobs) still works; a file cannot steer the learning rate beyond what --lr allows, and a
recorded source path is never followed (tests/hostile.py)."""

import json
import os
import shutil

import pytest

from helpers import moekit, tiny_checkpoint
from hostile import SECRET, outside_file, refused

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer, whose config.json names no BOS / EOS ids (so the tokenizer's
    tokenizer_config.json is read for them)."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("src") / "ckpt")
    config = json.loads((path / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config))
    (path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return path


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    (tmp_path / "outside").mkdir()
    return tmp_path / "ckpt"


@pytest.mark.parametrize("command, name", [("train", "config.json"), ("generate", "config.json"),
                                           ("train", "tokenizer_config.json"), ("generate", "tokenizer_config.json"),
                                           ("train", "train_config.json"), ("train", "upcycling.json")])
def test_a_side_file_linked_from_outside_is_refused(command, name, ckpt, tmp_path, capsys):
    link = ckpt / name
    if link.exists():
        link.unlink()
    link.symlink_to(outside_file(tmp_path / "outside"))
    argv = (["train", ckpt, "--data", ckpt / "corpus.txt", "--out", tmp_path / "out", *TRAIN] if command == "train"
            else ["generate", ckpt, "--prompt", "def", "--max-new-tokens", "2"])
    err = refused(capsys, *argv, watch=[ckpt, tmp_path / "outside", tmp_path / "out"])
    assert f"'{name}' points outside the checkpoint" in err and SECRET not in err, err


def test_a_hub_cache_snapshot_still_works(ckpt, tmp_path, capsys):
    """models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH, as huggingface_hub lays a download out."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True), blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(ckpt))):
        shutil.copyfile(ckpt / name, blobs / f"blob{i}")
        (snapshot / name).symlink_to(f"../../blobs/blob{i}")
    rc, out, err = moekit(capsys, "generate", snapshot, "--prompt", "def", "--max-new-tokens", "2")
    assert rc == 0 and out.strip(), err
    rc, out, err = moekit(capsys, "train", snapshot, "--data", snapshot / "corpus.txt", "--out", tmp_path / "out",
                          *TRAIN)
    assert rc == 0, err


# ---- a file cannot steer training ----------------------------------------------------------------------------

def _run_lr(tmp_path) -> float:
    return json.loads((tmp_path / "out" / "train_config.json").read_text())["schedule"]["lr"]


def test_a_recorded_source_is_not_followed(ckpt, tmp_path, capsys):
    """The issue's example: upcycling.json's "source" names a directory whose train_config.json says 1e30."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "train_config.json").write_text(json.dumps({"schedule": {"final_lr": 1e30}}))
    (ckpt / "upcycling.json").write_text(json.dumps({"source": str(tmp_path / "elsewhere")}))
    rc, out, err = moekit(capsys, "train", ckpt, "--data", ckpt / "corpus.txt", "--out", tmp_path / "out", *TRAIN)
    assert rc == 0, err
    assert _run_lr(tmp_path) == 3e-5 and "lr 3e-05" in out  # the default for a checkpoint: nothing read from there


@pytest.mark.parametrize("name, record", [("train_config.json", {"schedule": {"final_lr": 1e30}}),
                                          ("upcycling.json", {"source_final_lr": float("inf")}),
                                          ("upcycling.json", {"source_final_lr": "\x1b[2J1e-4"})])
def test_a_recorded_learning_rate_passes_the_checks_of_lr(name, record, ckpt, tmp_path, capsys):
    (ckpt / name).write_text(json.dumps(record))
    err = refused(capsys, "train", ckpt, "--data", ckpt / "corpus.txt", "--out", tmp_path / "out", *TRAIN,
                  watch=[ckpt, tmp_path / "out"])
    assert f"{name}: " in err and "expected a number in (0, 1], as --lr" in err, err


def test_a_valid_recorded_learning_rate_is_used(ckpt, tmp_path, capsys):
    (ckpt / "upcycling.json").write_text(json.dumps({"source_final_lr": 2e-4}))
    rc, _, err = moekit(capsys, "train", ckpt, "--data", ckpt / "corpus.txt", "--out", tmp_path / "out", *TRAIN)
    assert rc == 0 and _run_lr(tmp_path) == 2e-4, err
