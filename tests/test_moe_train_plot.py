"""moe.train.plot: `moekit plot` on two real runs (a dense model and an MoE) writes readable PNG files whose figures
hold exactly the runs' numbers; bad input is one line and writes nothing. A run of 32 MoE layers (every other layer
of 64) is drawn with the model's layer indices, a distinct colour per layer and nothing cut or covered, and
`routing_heatmaps` draws one panel per label or refuses its input in one line."""

import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import struct
import sys

import pytest

from moekit.llama.errors import ConfigError
from moekit.moe.config import MoEConfig
from moekit.moe.formats import hf_config_dict
from moekit.moe.train import TrainOptions, train
from moekit.moe.train.metrics import routing_entry, train_flops_per_token
from moekit.moe.train.plot import expert_figure, figures, load_figure, routing_figure, routing_heatmaps
from moekit.moe.train.runs import read_metrics, read_runs

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


# ---- deep runs: 32 MoE layers -------------------------------------------------------------------------------------

ODD = list(range(1, 64, 2))  # the MoE layers of a 64-layer model with decoder_sparse_step 2


def fake_run(out, config: MoEConfig, source: str) -> list[dict]:
    """A finished `moekit train` OUT of `config` with the files the trainer leaves (config.json, train_config.json,
    metrics.jsonl with `routing_entry`'s fields), without training: validation at step 0, a line every 10 steps to
    100 (expert 3 of the middle MoE layer dead from step 60). Returns the metrics lines."""
    out.mkdir()
    rng, L, E = random.Random(0), len(config.moe_layers), config.num_local_experts
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, "qwen2_moe"), indent=2))
    options = TrainOptions(model=source, out=str(out), steps=100, batch_size=2, seq_len=16, log_every=10,
                           eval_every=50)
    (out / "train_config.json").write_text(json.dumps({
        "options": dataclasses.asdict(options), "source": source, "data_source": "builtin:arith (seed 0)",
        "tokenizer": "bytes", "processes": 1, "layout": "replicated", "model_type": "qwen2_moe", "tokens": 3200}))
    lines = [{"step": 0, "tokens": 0, "val_loss": 5.5, "val_ppl": 244.69}]
    for step in range(10, 101, 10):
        counts = [[0 if (layer, e) == (L // 2, 3) and step >= 60 else rng.randrange(1, 50 + 20 * layer)
                   for e in range(E)] for layer in range(L)]  # [L, E]
        loss = 5.5 - step / 100
        lines.append({"step": step, "tokens": 32 * step, "lr": 1e-3, "loss": loss + 0.02, "ppl": math.exp(loss),
                      "lm_loss": loss, "aux_loss": 2.0, "z_loss": 0.0, "grad_norm": 1.0, "tokens_per_s": 300.0,
                      "mfu": None, "peak_memory_gb": 0.4, "train_state_gb": 0.01, **routing_entry({
                          "counts": counts, "layer_aux_loss": [1.0] * L, "layer_z_loss": [0.0] * L,
                          "layer_entropy": [math.log(E) - layer / 50 for layer in range(L)], "dropped": [0] * L}),
                      **({"val_loss": loss + 0.05, "val_ppl": math.exp(loss + 0.05)} if step % 50 == 0 else {})})
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return lines


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """"deep": 32 MoE layers x 8 experts (layers 1, 3, ..., 63), upcycled from a checkpoint path; "few": 2 MoE
    layers x 4 experts (layers 1 and 2 of 3)."""
    root = tmp_path_factory.mktemp("fakes")
    deep = MoEConfig.from_name("tiny-moe-8x2", num_hidden_layers=64, decoder_sparse_step=2)
    few = MoEConfig.from_name("tiny-moe-shared")
    lines = {"deep": fake_run(root / "deep", deep, str(root / "upcycled")),
             "few": fake_run(root / "few", few, "preset tiny-moe-shared")}
    return root, lines


def drawn(fig):
    """The figure drawn (Agg, as it is saved) and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def test_a_deep_run_is_drawn_with_the_models_layer_indices(fakes, tmp_path, capsys):
    root, lines = fakes
    rc, _, err = moekit(capsys, "plot", root / "deep", root / "few", "--out", tmp_path / "plots")
    assert rc == 0, err
    for name in ("experts-deep.png", "load-deep.png", "experts-few.png", "load-few.png"):
        assert png_size(tmp_path / "plots" / name)[1] >= (700 if "deep" in name else 250), name
    [run] = read_runs([str(root / "deep")])
    assert run.layers == ODD and run.layer_names() == ("layer", ODD)
    figs, routing = figures([run]), [m for m in lines["deep"] if "expert_fraction" in m]

    *panels, bar = figs["load-deep.png"].axes  # three panels and the colour bar of the layers, no legend
    assert len(panels) == 3 and not figs["load-deep.png"].legends and all(ax.get_legend() is None for ax in panels)
    assert bar.get_ylabel() == "layer" and [t.get_text() for t in bar.get_yticklabels()] == [str(i) for i in ODD]
    from matplotlib.colors import to_rgba
    for ax, key in zip(panels, ("max_load", "dead_experts", "entropy")):
        layer_lines = [line for line in ax.get_lines() if line.get_label().startswith("layer")]
        assert [line.get_label() for line in layer_lines] == [f"layer {i}" for i in ODD]
        assert len({to_rgba(line.get_color()) for line in layer_lines}) == 32  # no colour repeats
        assert list(layer_lines[16].get_ydata()) == [m[key][16] for m in routing]  # layer 33: MoE layer 16

    last, *over_steps, share = figs["experts-deep.png"].axes  # every layer's last interval, 4 layers over steps
    assert [t.get_text() for t in last.get_yticklabels()] == [str(i) for i in ODD] and last.get_ylabel() == "layer"
    assert last.images[0].get_array().tolist() == routing[-1]["expert_fraction"]  # [32 layers, 8 experts]
    assert [ax.get_title() for ax in over_steps] == ["layer 1", "layer 21", "layer 43", "layer 63"]
    cells = over_steps[1].collections[0].get_array()  # [E, logged steps] of MoE layer 10 (model layer 21)
    assert cells.shape == (8, 10) and cells[5, 7] == routing[7]["expert_fraction"][10][5]
    assert share.get_ylabel() == "share of token copies"

    shutil.copytree(root / "deep", tmp_path / "deep")
    os.remove(tmp_path / "deep" / "config.json")  # the model unknown (its source a path): MoE layers 0..31
    [run] = read_runs([str(tmp_path / "deep")])
    bar = figures([run])["load-deep.png"].axes[-1]
    assert run.layers is None and bar.get_ylabel() == "MoE layer"
    assert [t.get_text() for t in bar.get_yticklabels()] == [str(i) for i in range(32)]
    config = json.loads((root / "deep" / "config.json").read_text())  # a hostile model: not looked at, no hang
    (tmp_path / "deep" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**12}))
    assert read_runs([str(tmp_path / "deep")])[0].layers is None


@pytest.mark.parametrize("name", ["deep", "few"])
def test_nothing_is_cut_and_no_legend_covers_the_data(name, fakes):
    root, _ = fakes
    [run] = read_runs([str(root / name)])
    assert run.layers == (ODD if name == "deep" else [1, 2])
    for fig in (expert_figure(run), load_figure(run)):
        renderer = drawn(fig)
        saved = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # what save() keeps, at least
        for ax in fig.axes:  # every panel with its labels, ticks and title lies inside the figure
            box = ax.get_tightbbox(renderer)
            assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, (fig._suptitle, ax.get_title())
            assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, (fig._suptitle, ax.get_title())
            label = ax.yaxis.label.get_window_extent(renderer)
            assert not ax.get_ylabel() or (saved.x0 <= label.x0 and label.x1 <= saved.x1
                                           and saved.y0 <= label.y0 and label.y1 <= saved.y1)
        for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            box = legend.get_window_extent(renderer)
            assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
            assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes if ax.has_data())
    if name == "few":  # two layers: a legend at the right of the panels, named by model layer
        assert [t.get_text() for t in load_figure(run).legends[0].get_texts()] == ["layer 1", "layer 2"]


def shares(L: int, E: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    rows = [[rng.random() for _ in range(E)] for _ in range(L)]
    return [[round(x / sum(row), 5) for x in row] for row in rows]


def test_routing_heatmaps_draws_one_panel_per_label(tmp_path):
    assert str(inspect.signature(routing_heatmaps)) == (
        "(fractions: 'dict[str, list[list[float]]]', layers: 'list[int]', path: 'str', title: 'str' = '') -> 'None'")
    fractions = {"code": shares(32, 8, 0), "math": shares(32, 8, 1), "prose": shares(32, 8, 2)}
    path = tmp_path / "out" / "routing.png"
    routing_heatmaps(fractions, ODD, str(path), "routing by domain")
    assert png_size(path)[1] >= 700 and os.listdir(tmp_path / "out") == ["routing.png"]  # no temporary left
    fig = routing_figure(fractions, ODD, "routing by domain")
    *panels, bar = fig.axes
    vmax = max(max(row) for grid in fractions.values() for row in grid)
    assert [ax.get_title() for ax in panels] == ["code", "math", "prose"] and bar.get_ylabel() == "share of token copies"
    for ax, grid in zip(panels, fractions.values()):
        assert ax.images[0].get_array().tolist() == grid and ax.images[0].get_clim() == (0, vmax)  # one scale
        assert ax.get_yticks().tolist() == list(range(32)) and ax.get_shared_y_axes().joined(ax, panels[0])
    assert [t.get_text() for t in panels[0].get_yticklabels()] == [str(i) for i in ODD]  # beside the first panel
    assert panels[0].get_ylabel() == "layer" and [t.get_text() for t in panels[0].get_xticklabels()] == [
        str(e) for e in range(8)]
    renderer = drawn(fig)  # the colour bar outside the panels
    assert not any(bar.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in panels)
    routing_heatmaps({"all": shares(2, 4, 3)}, [1, 3], str(tmp_path / "small.png"))  # 2 layers x 4 experts
    assert png_size(tmp_path / "small.png")[0] >= 250


@pytest.mark.parametrize("fractions, layers, words", [
    ({}, [0, 1], "fractions is {}"),
    ([[0.5, 0.5]], [0], "fractions is [[0.5, 0.5]]"),
    ({"a": []}, [0, 1], "fractions['a'] is []; expected 2 lists"),
    ({"a": [[0.5, 0.5], [1.0]]}, [0, 1], "fractions['a'] is [[0.5, 0.5], [1.0]]; expected 2 lists"),
    ({"a": [[0.5, 0.5], [0.5, 0.5]], "b": [[1, 0, 0], [1, 0, 0]]}, [0, 1], "fractions['b']"),
    ({"a": [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]}, [0, 1], "expected 2 lists (one per MoE layer, as layers)"),
    ({"a": [[0.5, float("nan")]]}, [0], "expected 1 lists (one per MoE layer, as layers) of 2 finite shares"),
    ({"a": [["x", 1]]}, [0], "fractions['a'] is [['x', 1]]"),
    ({"a": [[0.5, 0.5]]}, [], "layers is []"),
    ({"a": [[0.5, 0.5]]}, ["1"], "layers is ['1']"),
])
def test_routing_heatmaps_refuses_empty_or_ragged_input_in_one_line(fractions, layers, words, tmp_path, monkeypatch):
    path = tmp_path / "routing.png"
    with pytest.raises(ConfigError) as e:
        routing_heatmaps(fractions, layers, str(path))
    assert str(e.value).startswith("routing heatmaps: ") and "\n" not in str(e.value) and words in str(e.value)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: the same line as moekit plot's
    with pytest.raises(ConfigError, match="needs matplotlib"):
        routing_heatmaps({"a": [[0.5, 0.5]]}, [0], str(path))
    assert os.listdir(tmp_path) == []
