"""moe.train.plot: `moekit plot` on two real runs (a dense model and an MoE) writes readable PNG files whose figures
hold exactly the runs' numbers; bad input is one line and writes nothing."""

import json
import os
import struct
import sys

import pytest

from moekit.moe.train import TrainOptions, train
from moekit.moe.train.metrics import train_flops_per_token
from moekit.moe.train.plot import figures, read_metrics, read_runs

from helpers import moekit, one_line_error

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished dense run and an MoE run still in progress (OUT.partial: the same files, not yet renamed)."""
    root = tmp_path_factory.mktemp("runs")
    models = {}
    for name, preset in (("dense", "tiny"), ("moe", "tiny-moe")):
        r = train(TrainOptions(model=preset, out=str(root / name), steps=6, batch_size=2, seq_len=16, log_every=2,
                               eval_every=3, eval_batches=1, progress=False), log=None)
        models[name] = r.model
    os.rename(root / "moe", root / "moe.partial")
    return root, models


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file; asserts the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_the_pngs_of_both_runs(runs, tmp_path, capsys):
    root, models = runs
    out = tmp_path / "plots"
    rc, stdout, err = moekit(capsys, "plot", root / "dense", root / "moe", "--out", out)  # moe: read from .partial
    assert rc == 0, err
    names = ["loss.png", "lr_throughput.png", "experts-moe.png", "load-moe.png"]  # the dense run has no experts
    assert sorted(os.listdir(out)) == sorted([".moekit", *names])
    assert stdout == f"wrote 4 plots of 2 run(s) to {out}: {', '.join(names)}\n"
    for name in names:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 250 and os.path.getsize(out / name) > 10_000, name
    assert png_size(out / "loss.png") == (1100, 420)  # two panels, 11 x 4.2 inches at 100 dpi


def test_the_loss_figure_holds_every_runs_numbers(runs):
    root, models = runs
    figs = figures(read_runs([str(root / "dense"), str(root / "moe.partial")]))  # as plot() draws them
    tokens_ax, flops_ax = figs["loss.png"].axes
    dense, moe = (read_metrics(str(root / d / "metrics.jsonl")) for d in ("dense", "moe.partial"))
    for ax in (tokens_ax, flops_ax):  # one line per run per curve
        assert [line.get_label() for line in ax.get_lines()] == [
            "dense train", "dense validation", "moe (in progress) train", "moe (in progress) validation"]
    lines = {line.get_label(): line for line in tokens_ax.get_lines()}
    assert list(lines["dense train"].get_xdata()) == [2 * 32, 4 * 32, 6 * 32]  # steps x 2 x 16 tokens
    assert list(lines["dense train"].get_ydata()) == [m["loss"] for m in dense if "loss" in m]
    assert list(lines["moe (in progress) train"].get_ydata()) == [m["lm_loss"] for m in moe if "lm_loss" in m]
    assert list(lines["dense validation"].get_xdata()) == [0, 3 * 32, 6 * 32]
    assert list(lines["moe (in progress) validation"].get_ydata()) == [m["val_loss"] for m in moe if "val_loss" in m]
    flops = {line.get_label(): line for line in flops_ax.get_lines()}
    per_token = train_flops_per_token(models["moe"], 16)  # what the run's MFU used: 1,084,416 for tiny-moe
    assert per_token == 1_084_416
    assert list(flops["moe (in progress) validation"].get_xdata()) == [0, 96 * per_token, 192 * per_token]
    assert flops["dense train"].get_xdata()[-1] == 192 * train_flops_per_token(models["dense"], 16)


def test_the_expert_figures_show_the_routing_fields(runs):
    root, _ = runs
    figs = figures(read_runs([str(root / "moe")]))
    moe = [m for m in read_metrics(str(root / "moe.partial" / "metrics.jsonl")) if "expert_fraction" in m]
    heat = figs["experts-moe.png"].axes[:2]  # tiny-moe: 2 MoE layers of 4 experts (then the colour bar)
    cells = heat[1].collections[0].get_array()  # [E, logged steps] of layer 1
    assert cells.shape == (4, 3) and cells[2, 1] == moe[1]["expert_fraction"][1][2]
    assert [round(sum(cells[:, j]), 3) for j in range(3)] == [1.0, 1.0, 1.0]
    load, dead, entropy = figs["load-moe.png"].axes
    assert list(load.get_lines()[0].get_ydata()) == [m["max_load"][0] for m in moe]
    assert list(dead.get_lines()[1].get_xdata()) == [2, 4, 6]
    assert entropy.get_lines()[-1].get_ydata()[0] == pytest.approx(1.3863, abs=1e-4)  # the log 4 reference


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    root, _ = runs
    out = tmp_path / "plots"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 0, "tokens": 0}\nnot json\n{"step": 1, "tokens": 1}\n')
    (tmp_path / "bare").mkdir()
    for run, words in ((tmp_path / "nothing", "no such run directory"), (tmp_path / "bare", "no metrics.jsonl"),
                       (tmp_path / "empty", "empty; the run has not logged a step yet"),
                       (tmp_path / "bad", "metrics.jsonl line 2: not valid JSON")):
        err = one_line_error(capsys, "plot", root / "dense", run, "--out", out)
        assert words in err, err
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert "needs matplotlib" in one_line_error(capsys, "plot", root / "dense", "--out", out)
    assert not out.exists()
    monkeypatch.undo()
    out.mkdir()
    assert "already exists; pass --force" in one_line_error(capsys, "plot", root / "dense", "--out", out)
    assert "overlap" in one_line_error(capsys, "plot", root / "dense", "--out", root, "--force")
    assert "overlap" in one_line_error(capsys, "plot", root / "dense", "--out", root / "dense" / "plots")
    assert os.listdir(out) == [] and sorted(os.listdir(root)) == ["dense", "moe.partial"]


def test_a_line_being_written_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "tokens": 0, "val_loss": 5.5}) + '\n{"step": 2, "tok')
    assert read_metrics(str(path)) == [{"step": 0, "tokens": 0, "val_loss": 5.5}]


def test_training_flops_of_a_run_in_progress_come_from_its_source(runs, tmp_path):
    """No config.json yet (OUT.partial without --save-every): the preset named in train_config.json."""
    root, models = runs
    partial = tmp_path / "run.partial"
    partial.mkdir()
    for name in ("metrics.jsonl", "train_config.json"):
        (partial / name).write_bytes((root / "moe.partial" / name).read_bytes())
    assert json.loads((partial / "train_config.json").read_text())["source"] == "preset tiny-moe"
    [run] = read_runs([str(tmp_path / "run")])
    assert run.name == "run (in progress)" and run.flops_per_token == train_flops_per_token(models["moe"], 16)
    (partial / "train_config.json").write_text(json.dumps({"options": {"seq_len": 16}, "source": "/gone"}))
    assert read_runs([str(partial)])[0].flops_per_token is None  # left off the FLOPs panel
