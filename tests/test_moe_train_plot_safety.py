"""moe.train.plot, hostile runs through `moekit plot`: a value of metrics.jsonl the figures cannot draw (a
string, dict or list where a number belongs, an infinite or 1,329-bit `tokens`, ragged routing lists) is one line
naming the file, line and key; every file is read from inside RUN, and a path recorded in train_config.json is
never followed. Each refusal writes nothing and changes nothing (tests/hostile.py)."""

import json
import os
import shutil
import struct

import pytest

from moekit.moe.train import TrainOptions, train

from helpers import moekit
from hostile import SECRET, outside_file, refused

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny-moe run: metrics.jsonl line 1 is step 0 (validation), lines 2 and 3 steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainOptions(model="tiny-moe", out=str(out), steps=4, batch_size=2, seq_len=16, log_every=2, eval_every=2,
                       eval_batches=1, progress=False), log=None)
    return out


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def edit_line(run, line: int, key: str, raw: str) -> None:
    """Set `key` of metrics.jsonl's `line` (from 1) to the JSON text `raw`."""
    rows = (run / "metrics.jsonl").read_text().splitlines()
    m = json.loads(rows[line - 1])
    m.pop(key, None)
    rows[line - 1] = json.dumps(m)[:-1] + f', "{key}": {raw}}}'
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def plot_refused(capsys, run, tmp_path) -> str:
    out = tmp_path / "plots"
    return refused(capsys, "plot", run, "--out", out, watch=[run, out])


@pytest.mark.parametrize("key, raw, shown", [
    ("lm_loss", '"abc"', "'abc'"), ("val_loss", '{"a": 1}', "{'a': 1}"), ("tokens_per_s", "[1, 2]", "[1, 2]"),
    ("lr", '"\\u001b[31m\\n"', "'\\x1b[31m\\n'"),
])
def test_a_metric_that_is_not_a_number_is_one_line(key, raw, shown, run, tmp_path, capsys):
    edit_line(run, 2, key, raw)
    err = plot_refused(capsys, run, tmp_path)
    assert f"{run / 'metrics.jsonl'} line 2: '{key}' is {shown}; expected a number" in err


@pytest.mark.parametrize("raw, words", [
    ("1e400", "line 3: expected a JSON object with integer 'step' and 'tokens'"),
    ("1" + "0" * 400, "line 3: 'tokens' is <an integer of 1,329 bits>; expected a finite integer"),
])
def test_tokens_beyond_any_float_are_one_line(raw, words, run, tmp_path, capsys):
    edit_line(run, 3, "tokens", raw)
    assert words in plot_refused(capsys, run, tmp_path)


@pytest.mark.parametrize("key, raw, want", [
    ("expert_fraction", "[[0.5, 0.5, 0, 0], [0.5, 0.5]]", "2 lists of 4 finite numbers (MoE layers x experts)"),
    ("expert_fraction", "[[0.5, 0.5], [0.5, 0.5]]", "2 lists of 4 finite numbers (MoE layers x experts)"),
    ("max_load", "[1.0]", "a list of 2 finite numbers, one per MoE layer"),
])
def test_ragged_routing_fields_are_one_line(key, raw, want, run, tmp_path, capsys):
    edit_line(run, 3, key, raw)  # line 2 (step 2) set the shape: 2 MoE layers of 4 experts
    err = plot_refused(capsys, run, tmp_path)
    assert f"metrics.jsonl line 3: '{key}' is {raw}; expected {want}" in err


@pytest.mark.parametrize("name", ["metrics.jsonl", "train_config.json", "config.json", "step-2/config.json"])
def test_a_file_linked_out_of_the_run_is_not_read(name, run, tmp_path, capsys):
    if name.startswith("step-"):  # a checkpoint directory of the run linked to one outside it
        (tmp_path / "elsewhere").mkdir()
        outside_file(tmp_path / "elsewhere", "config.json")
        os.symlink(tmp_path / "elsewhere", run / "step-2")
    else:
        os.remove(run / name)
        os.symlink(outside_file(tmp_path), run / name)
    err = plot_refused(capsys, run, tmp_path)
    assert f"'{name}' points outside the checkpoint; refusing to read it" in err


def png_width(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">I", f.read(24)[16:20])[0]


@pytest.mark.parametrize("source", ["OUTSIDE", "preset tiny-moe"])
def test_the_flops_axis_never_follows_a_recorded_path(source, finished, run, tmp_path, capsys):
    """A run without config.json: only a preset named as its source gives the FLOPs panel; a path does not."""
    outside = tmp_path / "outside"
    shutil.copytree(finished, outside)  # a checkpoint outside the run, whose config.json would count
    os.remove(run / "config.json")
    config = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**config, "source": str(outside) if source == "OUTSIDE"
                                                       else source}))
    rc, out, err = moekit(capsys, "plot", run, "--out", tmp_path / "plots")
    assert rc == 0 and SECRET not in out, err
    assert png_width(tmp_path / "plots" / "loss.png") == (650 if source == "OUTSIDE" else 1100)  # 1 or 2 panels
