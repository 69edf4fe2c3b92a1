"""moe.train.state: a run lives in OUT.partial until it ends; a killed run resumes from its last state with the
same losses step for step and the same final weights; an interrupted run is never started over or shared by
accident."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moekit.moe.train.source import load_model

from helpers import ROOT, moekit, one_line_error

RUN = ["tiny-moe", "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--log-every", "1", "--eval-every", "4",
       "--eval-batches", "1", "--save-every", "3", "--lr", "3e-3", "--router-bias-rate", "0.01", "--no-progress"]

# A training child that sleeps after each optimizer step, so the test can kill it between two saved states.
SLOW_TRAIN = """
import sys, time, torch
step = torch.optim.AdamW.step
def slow(self, *a, **k):
    out = step(self, *a, **k)
    time.sleep(0.15)
    return out
torch.optim.AdamW.step = slow
from moekit import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def losses(path) -> dict:
    lines = [json.loads(s) for s in open(path).read().splitlines()]
    return {m["step"]: (m.get("loss"), m.get("val_loss"), m.get("aux_loss"), str(m.get("expert_fraction")))
            for m in lines}


def weights(path) -> dict:
    return {k: v.float() for k, v in load_model(str(path)).model.state_dict().items()}


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    from moekit.cli import main

    assert main(["train", *RUN, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    child = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *RUN, "--out", str(out)], cwd=ROOT)
    state = tmp_path / "cut.partial" / "state"
    deadline = time.time() + 120
    while not (state / "step-000006").is_dir() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists() and (state / "step-000006").is_dir()
    kept = sorted(os.listdir(state))
    assert kept[-1] in ("step-000006", "step-000009") and len(kept) <= 2  # --keep-last 2
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0  # no options retyped
    a, b = losses(tmp_path / "whole" / "metrics.jsonl"), losses(out / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(13))
    for step in a:
        for x, y in zip(a[step], b[step]):
            assert (x == y) if isinstance(x, str) or x is None else abs(x - y) <= 1e-6, (step, a[step], b[step])
    wa, wb = weights(tmp_path / "whole"), weights(out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) == 0.0
    assert not (tmp_path / "cut.partial").exists() and "state" not in os.listdir(out)


def test_an_interrupted_run_is_not_started_over_by_accident(tmp_path, capsys, monkeypatch):
    from moekit.cli import main
    from moekit.moe.train import loop

    evaluate, calls = loop.evaluate, []

    def ctrl_c_at_the_last_evaluation(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        return evaluate(*a)

    monkeypatch.setattr(loop, "evaluate", ctrl_c_at_the_last_evaluation)
    argv = ["train", "tiny", "--out", tmp_path / "run", "--steps", "4", "--save-every", "2", "--batch-size", "2",
            "--seq-len", "8", "--eval-batches", "1", "--no-progress"]
    assert main([str(a) for a in argv]) == 130  # interrupted at the very end: OUT.partial keeps step 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.partial keeps the state of step 2: continue with `moekit train --resume" in err
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert "holds an interrupted run (last saved state: step 2); pass --resume" in one_line_error(capsys, *argv)
    assert "--lr 0.01 differs from the interrupted run's" in one_line_error(
        capsys, "train", "--resume", "--out", tmp_path / "run", "--lr", "0.01")
    assert "MODEL 'tiny-moe' differs" in one_line_error(capsys, "train", "tiny-moe", "--resume", "--out",
                                                        tmp_path / "run")
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--no-progress", "--eval-every", "1"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["options"]["eval_every"] == 1


@pytest.mark.parametrize("case", ["nothing", "finished", "not-a-run"])
def test_resume_of_something_that_is_not_an_interrupted_run(tmp_path, capsys, case):
    out = tmp_path / "run"
    if case == "finished":
        out.mkdir()
    if case == "not-a-run":
        (tmp_path / "run.partial").mkdir()
    err = one_line_error(capsys, "train", "--resume", "--out", out)
    assert {"nothing": "no interrupted run to resume", "finished": "OUT is a finished run",
            "not-a-run": "not a moekit training run"}[case] in err


def test_a_run_another_process_works_in_is_not_taken_over(tmp_path, capsys):
    from moekit.llama.io import locked_dir, mark

    fd = locked_dir(str(tmp_path / "run.partial"))
    mark(str(tmp_path / "run.partial"))  # as a run of moekit marks it
    try:
        (tmp_path / "run.partial" / "train_config.json").write_text(json.dumps({"options": {}}))
        assert "another run is working in it" in one_line_error(capsys, "train", "--resume", "--out", tmp_path / "run")
        assert "another run is working in it" in one_line_error(capsys, "train", "tiny", "--out", tmp_path / "run",
                                                                "--force", "--steps", "1")
    finally:
        os.close(fd)


def test_a_diverging_loss_stops_with_the_last_good_state(tmp_path, capsys, monkeypatch):
    step, calls = torch.optim.AdamW.step, []

    def diverge_after_three_steps(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # as a too-high learning rate would: the weights become NaN
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverge_after_three_steps)
    rc, _, err = moekit(capsys, "train", "tiny", "--out", tmp_path / "run", "--steps", "40", "--save-every", "2",
                        "--log-every", "5", "--batch-size", "2", "--seq-len", "8", "--eval-batches", "1",
                        "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "the training loss became non-finite by step 4" in err and "keeps the state of step 2" in err, err
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path / "run.partial" / "state") == ["step-000002"]
    assert json.loads((tmp_path / "run.partial" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def test_a_source_with_nan_weights_stops_at_the_first_log_step(tmp_path, capsys):
    from moekit.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig.from_name("tiny"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    rc, _, err = moekit(capsys, "train", tmp_path / "nan", "--tokenizer", "bytes", "--out", tmp_path / "run",
                        "--steps", "6", "--log-every", "3", "--batch-size", "2", "--seq-len", "8", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "the training loss became nan by step 3" in err and sorted(os.listdir(tmp_path)) == ["nan"]


def test_resume_drops_a_metrics_line_cut_by_the_kill(tmp_path):
    from moekit.moe.train.state import WorkDir

    work = WorkDir(str(tmp_path / "run"), main=True)
    os.makedirs(work.path)
    path = os.path.join(work.path, "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1, "tokens": 8}\n{"step": 2, "tokens": 16}\n{"step": 3, "tok')  # killed mid-line
    assert work.truncate_metrics(1) == [{"step": 1, "tokens": 8}]
    with open(path) as f:
        assert f.read() == '{"step": 1, "tokens": 8}\n'


def test_a_checkpoint_without_a_tokenizer_trained_on_ids_gets_no_byte_tokenizer(tmp_path, capsys):
    import numpy as np

    from helpers import tiny_checkpoint

    src = tiny_checkpoint(tmp_path / "src", tokenizer=False)
    np.save(tmp_path / "ids.npy", np.arange(2000) % 300)
    rc, out, err = moekit(capsys, "train", str(src), "--data", str(tmp_path / "ids.npy"), "--out",
                          str(tmp_path / "out"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                          "--eval-batches", "1", "--no-progress")
    assert rc == 0, err
    assert not os.path.exists(tmp_path / "out" / "tokenizer.json")  # its ids are not bytes: nothing to guess
