"""moe.train.state, a full disk while a run saves through the command line: a training state or checkpoint that
cannot be written is one line naming the user's path (never a temporary one), leaves no temporary, and keeps the
last complete state resumable (tests/hostile.py)."""

import errno
import os

import pytest
from test_moe_train_data_safety import refused_when_files_are_limited

from helpers import moekit
from hostile import check_line

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["tiny", "--steps", "6", "--save-every", "2", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1",
       "--no-progress"]


def full_disk_at_save(monkeypatch, call: int):
    """accelerate's save_state writes part of model.safetensors, then fails as a full disk does, at the `call`-th
    save."""
    from accelerate import Accelerator

    save_state, calls = Accelerator.save_state, []

    def save(self, output_dir, *a, **k):
        calls.append(1)
        if len(calls) < call:
            return save_state(self, output_dir, *a, **k)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "model.safetensors"))

    monkeypatch.setattr(Accelerator, "save_state", save)


def test_a_full_disk_at_the_first_state_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    full_disk_at_save(monkeypatch, 1)
    rc, _, err = moekit(capsys, "train", *RUN, "--out", tmp_path / "run")
    assert rc == 2 and os.listdir(tmp_path) == [], err  # nothing to resume from: OUT.partial removed
    check_line(err)
    assert f"{tmp_path / 'run.partial' / 'state' / 'step-000002'}: cannot save the training state (No space left on " \
           "device)" in err and ".tmp" not in err, err


def test_a_full_disk_at_a_later_state_keeps_the_last_one_resumable(tmp_path, capsys, monkeypatch):
    full_disk_at_save(monkeypatch, 2)
    rc, _, err = moekit(capsys, "train", *RUN, "--out", tmp_path / "run")
    assert rc == 2, err
    check_line(err)
    assert "step-000004: cannot save the training state (No space left on device)" in err, err
    assert f"keeps the state of step 2: continue with `moekit train --resume --out {tmp_path / 'run'}`" in err
    assert os.listdir(tmp_path / "run.partial" / "state") == ["step-000002"]  # no step-000004.tmp
    monkeypatch.undo()
    rc, _, err = moekit(capsys, "train", "--resume", "--out", tmp_path / "run")
    assert rc == 0 and sorted(os.listdir(tmp_path)) == ["run"], err


def test_a_file_size_limit_while_writing_a_checkpoint_is_one_line(tmp_path):
    """A real failed write (EFBIG from RLIMIT_FSIZE): the weights of the step-2 checkpoint do not fit."""
    (tmp_path / "d.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "cache").mkdir()
    err = refused_when_files_are_limited(64 << 10, "train", *RUN, "--data", tmp_path / "d.txt", "--token-cache",
                                         tmp_path / "cache", "--out", tmp_path / "run",
                                         watch=[tmp_path / "run", tmp_path / "run.partial", tmp_path / "d.txt"],
                                         started=True)
    assert f"{tmp_path / 'run.partial' / 'step-000002'}: cannot write the checkpoint (File too large)" in err, err
