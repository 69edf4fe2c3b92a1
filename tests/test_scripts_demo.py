"""scripts/demo.py, the README's first command, at a toy size: the whole pipeline runs through the command line,
a second run redoes nothing, and an interrupted run resumes."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def demo(out, *args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--toy", "--out", str(out),
                        "--docs", "", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_the_demo_pipeline_at_toy_size(tmp_path):
    out = demo(tmp_path / "demo")
    for step in ("$ moekit tokenizer train builtin:python-stdlib", "$ moekit train tiny --tokenizer",
                 "$ moekit upcycle", "$ moekit verify", "$ moekit plot", "$ moekit generate"):
        assert step in out, step
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    dense, moe = summary
    assert (dense["model"], moe["model"]) == ("dense", "moe") and moe["total"] > moe["active"] > 0
    assert dense["val_before"] == pytest.approx(moe["val_before"], abs=1e-4)  # upcycling kept the function
    assert dense["tokens"] == moe["tokens"] > 0 and moe["train_flops"] > dense["train_flops"]
    pngs = [f for f in os.listdir(tmp_path / "demo" / "plots") if f.endswith(".png")]
    assert pngs and "greedy completions, moe-continued:" in out
    evaluated = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert [r["data"] for r in evaluated["rows"]] == ["held-out"] * 2 and len(evaluated["gaps"]) == 1
    assert "MoE - dense: " in out and "(paired over the files)" in out
    routing = json.loads((tmp_path / "demo" / "routing" / "results.json").read_text())["routing"][0]
    assert list(routing["fractions"]) == ["email", "json", "asyncio"]
    assert (tmp_path / "demo" / "routing" / "routing-moe-continued.png").is_file()
    again = demo(tmp_path / "demo")  # finished steps are not redone
    assert again.count("(done: ") == 6 and "$ moekit train" not in again and "$ moekit eval" not in again
    os.rename(tmp_path / "demo" / "moe-continued", tmp_path / "demo" / "gone")
    (tmp_path / "demo" / "moe-continued.partial").mkdir()  # as a kill before the first save leaves it
    (tmp_path / "demo" / "moe-continued.partial" / "train_config.json").write_text(
        (tmp_path / "demo" / "gone" / "train_config.json").read_text())
    assert "$ moekit train --resume --out" in demo(tmp_path / "demo")
    assert (tmp_path / "demo" / "moe-continued" / "model.safetensors").is_file()
