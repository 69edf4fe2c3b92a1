"""moe.train.resume, hostile and careless resumes through the command line: another number of processes keeps the
global batch (or is refused), a run resumes from any working directory, the hint names the command that was
running, a resumed run reports its own speed and the last validation loss; an edited or linked train_config.json,
progress.json or metrics.jsonl is one line that changes nothing; a damaged newest state falls back to the one
before it, with the losses of an uninterrupted run step for step (tests/hostile.py)."""

import json
import os
import re
import shutil

import pytest
from test_moe_train_state import SLOW_TRAIN

from moekit.cli import main

from helpers import moekit, single_thread
from hostile import SECRET, check_line, outside_file, refused

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, not two spinning on a busy machine
RUN = ["--steps", "6", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "8",
       "--eval-batches", "1", "--log-every", "1", "--eval-every", "0", "--no-progress"]


def ctrl_c_at_evaluation(monkeypatch, call: int, env: dict | None = None):
    """Ctrl-C at the `call`-th evaluation (after setting `env`, as a launcher would have)."""
    from moekit.moe.train import loop

    evaluate, calls = loop.evaluate, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == call:
            for k, v in (env or {}).items():
                monkeypatch.setenv(k, v)
            raise KeyboardInterrupt()
        return evaluate(*a)

    monkeypatch.setattr(loop, "evaluate", interrupted)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/whole: a run of 6 steps; root/cut.partial: the same run stopped at its last evaluation (step 6), with
    the states of steps 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        assert main(["train", "tiny", *RUN, "--out", str(root / "whole")]) == 0
        ctrl_c_at_evaluation(mp, 2)
        assert main(["train", "tiny", *RUN, "--out", str(root / "cut")]) == 130
    assert sorted(os.listdir(root / "cut.partial" / "state")) == ["step-000002", "step-000004"]
    return root


def copy_run(runs, tmp_path):
    shutil.copytree(runs / "cut.partial", tmp_path / "run.partial", symlinks=True)
    return tmp_path / "run.partial"


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data) if callable(change) else change))


def losses(path) -> dict:
    lines = [json.loads(s) for s in open(path).read().splitlines()]
    return {m["step"]: (m.get("loss"), m.get("val_loss")) for m in lines}


def same_losses(a, b) -> None:
    a, b = losses(a), losses(b)
    assert sorted(a) == sorted(b) == list(range(7))
    for step in a:
        assert all((x is None and y is None) or abs(x - y) <= 1e-6 for x, y in zip(a[step], b[step])), (step, a, b)


def resume(capsys, out, *extra):
    return moekit(capsys, "train", "--resume", "--out", out, *extra)


# ---- (a) another number of processes -------------------------------------------------------------------------

def test_resuming_with_another_process_count_keeps_the_global_batch(runs, tmp_path, capsys):
    partial = copy_run(runs, tmp_path)  # as a 2-process run of batch 2 records it: 2 x 1 x 2 = 4 sequences a step
    edit_json(partial / "train_config.json", lambda c: {**c, "processes": 2, "options": {**c["options"],
                                                                                         "grad_accum": 1}})
    rc, out, err = resume(capsys, tmp_path / "run")
    assert rc == 0, err
    assert ("resuming with 1 process(es) instead of 2: --grad-accum 2 (was 1) keeps 4 sequences a step, "
            "--eval-batches 2 (was 1)") in out  # and the 2 x 2 validation windows of two processes
    a, b = losses(runs / "whole" / "metrics.jsonl"), losses(tmp_path / "run" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(7))
    for step in range(1, 7):  # training losses: the whole run's (its validation saw half the windows)
        assert abs(a[step][0] - b[step][0]) <= 1e-6, (step, a, b)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["options"]["grad_accum"], saved["options"]["eval_batches"], saved["processes"]) == (2, 2, 1)


def test_a_process_count_that_cannot_keep_the_global_batch_is_refused(runs, tmp_path, capsys, monkeypatch):
    from accelerate import Accelerator

    partial = copy_run(runs, tmp_path)  # 2 x 2 x 1 = 4 sequences a step; 3 processes of batch 2 cannot make 4
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 3))
    err = refused(capsys, "train", "--resume", "--out", tmp_path / "run", "--no-progress", watch=[partial])
    assert "the interrupted run used 1 processes and this one 3" in err and "resume it with 1 processes" in err


# ---- (b) from another working directory ---------------------------------------------------------------------

def test_a_run_of_relative_paths_resumes_from_another_directory(tmp_path, capsys, monkeypatch):
    from moekit.llama import Llama, LlamaConfig
    from moekit.moe.train.tokenizer import ByteTokenizer

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    Llama(LlamaConfig.from_name("tiny")).save_pretrained(here / "ckpt")
    ByteTokenizer().save(str(here / "ckpt"))
    (here / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 60)
    argv = ["train", "ckpt", "--data", "corpus.txt", *RUN]
    monkeypatch.chdir(here)
    assert moekit(capsys, *argv, "--out", "whole")[0] == 0
    with monkeypatch.context() as mp:
        ctrl_c_at_evaluation(mp, 2)
        assert moekit(capsys, *argv, "--out", "cut")[0] == 130
    monkeypatch.chdir(elsewhere)
    rc, _, err = resume(capsys, here / "cut", "--no-progress")
    assert rc == 0, err
    same_losses(here / "whole" / "metrics.jsonl", here / "cut" / "metrics.jsonl")
    options = json.loads((here / "cut" / "train_config.json").read_text())["options"]
    assert (options["model"], options["data"]) == (str(here / "ckpt"), str(here / "corpus.txt"))


# ---- (c) the hint names the command that was running ---------------------------------------------------------

@pytest.mark.parametrize("launcher, env, command", [
    ("plain", {}, "moekit train --resume --out {out}"),
    ("torchrun", {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
     "torchrun --nproc_per_node 2 -m moekit train --resume --out {out}"),
    ("accelerate", {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "ACCELERATE_MIXED_PRECISION": "no"},
     "accelerate launch --num_processes 4 -m moekit train --resume --out {out}"),
])
def test_the_hint_names_the_command_that_was_running(launcher, env, command, runs, tmp_path, capsys, monkeypatch):
    copy_run(runs, tmp_path)
    ctrl_c_at_evaluation(monkeypatch, 1, env)  # the resumed run's first evaluation is its last (step 6)
    rc, _, err = resume(capsys, tmp_path / "run")
    assert rc == 130, err
    check_line(err)
    assert f"keeps the state of step 4: continue with `{command.format(out=tmp_path / 'run')}`" in err, err


# ---- (d) what a resumed run reports --------------------------------------------------------------------------

def test_a_resumed_run_reports_its_own_speed_and_the_last_validation_loss(runs, tmp_path, capsys):
    partial = copy_run(runs, tmp_path)
    edit_json(partial / "train_config.json", lambda c: {**c, "options": {**c["options"], "progress": True}})
    val0 = losses(partial / "metrics.jsonl")[0][1]
    rc, out, err = resume(capsys, tmp_path / "run")
    assert rc == 0, err
    assert "val nan" not in err and f"val {val0:.4f}" in err, err[-2000:]  # the bar before the last evaluation
    m = re.search(r"6 steps, 192 tokens; resumed at step 4: 2 steps, 64 tokens in [\d.]+ s \(([\d,]+) tokens/s in "
                  r"this run\)", out)
    assert m, out
    seconds = json.loads((tmp_path / "run" / "train_config.json").read_text())["seconds"]  # rounded to 1 ms
    rate = int(m[1].replace(",", ""))
    assert 64 / (seconds + 0.0005) - 1 <= rate <= 64 / max(seconds - 0.0005, 1e-9) + 1, (rate, seconds)


# ---- (e) edited or linked files of the run -------------------------------------------------------------------

def _edit(partial, case: str) -> str:
    """Damage the run as `case` says; returns what the error must say."""
    config, progress = partial / "train_config.json", partial / "state" / "step-000004" / "progress.json"
    options = lambda **kw: lambda c: {**c, "options": {**c["options"], **kw}}  # noqa: E731
    edits = {
        "steps-below-state": (config, options(steps=3), "steps 3 ends before the run's last saved state (step 4)"),
        "progress-step-1e6": (progress, lambda p: {**p, "step": 10**6}, "step 1000000 is outside 1..5"),
        "progress-not-dict": (progress, [1, 2], "expected a JSON object"),
        "config-not-dict": (config, "options", "expected a JSON object"),
        "model-gone": (config, options(model="/nonexistent/\x1b[2Jmodel"), "not a checkpoint directory nor a preset"),
        "absurd-batch": (config, options(batch_size=10**12), "needs about"),
        "seq-len-changed": (config, options(seq_len=16), "the state was trained with seq_len 8"),
        "lr-nan": (config, options(lr=float("nan")), "must be a finite number"),
        "processes": (config, lambda c: {**c, "processes": "two"}, "processes 'two' is not a number of processes"),
        "interval": (progress, lambda p: {**p, "interval": {"steps": 1, "sums": {"loss": {"dtype": "float32",
                                                                                          "value": [[1.0]]}}}},
                     "interval sum 'loss' is not numbers of shape []"),
    }
    if case in edits:
        path, change, words = edits[case]
        edit_json(path, change)
        return words
    if case == "progress-corrupt":
        progress.write_text('{"step": 4, "interval"')
        return "progress.json: not valid JSON"
    if case == "config-corrupt":
        config.write_text("{")
        return "train_config.json: not valid JSON"
    if case == "link-state":  # a whole state linked from elsewhere
        state, elsewhere = partial / "state" / "step-000004", partial.parent / "outside" / "step-000004"
        shutil.move(state, elsewhere)
        state.symlink_to(elsewhere)
        return "'state/step-000004' points outside"
    name = {"link-config": config, "link-progress": progress, "link-metrics": partial / "metrics.jsonl",
            "link-rng": progress.parent / "random_states_0.pkl"}[case]
    name.unlink()
    name.symlink_to(outside_file(partial.parent / "outside"))
    return "points outside the checkpoint"


@pytest.mark.parametrize("case", ["steps-below-state", "progress-step-1e6", "progress-not-dict", "progress-corrupt",
                                  "config-not-dict", "config-corrupt", "model-gone", "absurd-batch",
                                  "seq-len-changed", "lr-nan", "processes", "interval", "link-config",
                                  "link-progress", "link-metrics", "link-state", "link-rng"])
def test_an_edited_or_linked_run_file_is_one_line_and_changes_nothing(case, runs, tmp_path, capsys):
    (tmp_path / "outside").mkdir()
    partial = copy_run(runs, tmp_path)
    words = _edit(partial, case)
    err = refused(capsys, "train", "--resume", "--out", tmp_path / "run", "--no-progress",
                  watch=[partial, tmp_path / "outside"])
    assert words in err, err
    assert not (tmp_path / "run").exists()


def test_a_fifo_as_metrics_is_refused_without_blocking(runs, tmp_path, capsys):
    partial = copy_run(runs, tmp_path)
    (partial / "metrics.jsonl").unlink()
    os.mkfifo(partial / "metrics.jsonl")
    err = refused(capsys, "train", "--resume", "--out", tmp_path / "run", "--no-progress", watch=[partial])
    assert "not a regular file" in err


# ---- (f) a damaged newest state ------------------------------------------------------------------------------

def _damage(state, how: str) -> None:
    if how == "empty":
        shutil.rmtree(state)
        state.mkdir()
        return
    path = state / how
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["model.safetensors", "optimizer.bin", "empty"])
def test_a_damaged_newest_state_falls_back_to_the_one_before(how, runs, tmp_path, capsys):
    partial = copy_run(runs, tmp_path)
    _damage(partial / "state" / "step-000004", how)
    rc, out, err = resume(capsys, tmp_path / "run", "--no-progress")
    assert rc == 0, err
    said = [line for line in out.splitlines() if "resuming from the previous complete state, step 2" in line]
    assert len(said) == 1 and "step-000004" in said[0], out
    same_losses(runs / "whole" / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")


def test_no_complete_state_is_one_line_naming_the_file(runs, tmp_path, capsys):
    partial = copy_run(runs, tmp_path)
    _damage(partial / "state" / "step-000004", "model.safetensors")
    _damage(partial / "state" / "step-000002", "optimizer.bin")
    err = refused(capsys, "train", "--resume", "--out", tmp_path / "run", "--no-progress", watch=[partial])
    assert "step-000004/model.safetensors: truncated or damaged" in err and "no earlier complete" in err, err
    assert SECRET not in err


# ---- the real thing: a 2-process torchrun run stopped, resumed as one process ---------------------------------

SLOWER_TRAIN = SLOW_TRAIN.replace("time.sleep(0.15)", "time.sleep(0.3)")  # two processes: a longer step


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_resumes_as_one_process(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    args = ["tiny", "--steps", "8", "--save-every", "2", "--batch-size", "2", "--seq-len", "8", "--log-every", "1",
            "--eval-batches", "1", "--eval-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([sys.executable, "-m", "moekit", "train", *args, "--grad-accum", "2", "--eval-batches",
                            "2", "--out", str(tmp_path / "whole")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (tmp_path / "slow.py").write_text(SLOWER_TRAIN)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 str(tmp_path / "slow.py"), *args, "--out", str(tmp_path / "cut")], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "cut.partial" / "state" / "step-000004").is_dir() and time.time() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert f"continue with `torchrun --nproc_per_node 2 -m moekit train --resume --out {tmp_path / 'cut'}`" in err, \
        err[-3000:]
    again = subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", "--out", str(tmp_path / "cut")],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming with 1 process(es) instead of 2: --grad-accum 2 (was 1) keeps 4 sequences a step" in again.stdout
    a, b = losses(tmp_path / "whole" / "metrics.jsonl"), losses(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(9))
    for step in range(9):  # the same validation windows: 2 processes x 1 batch, then 1 process x 2 batches
        assert all(x == y or abs(x - y) <= 1e-5 for x, y in zip(a[step], b[step])), (step, a, b)
