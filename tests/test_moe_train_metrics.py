"""moe.train.metrics: MFU from the accounting's FLOPs, per-layer expert use (fractions, max/mean load, dead experts,
router entropy) read the way a user reads them, and the trackers."""

import json
import math

import pytest
import torch

from moekit.moe import MoEConfig, MoEFeedForward
from moekit.moe.losses import routing_stats
from moekit.moe.train import TrainOptions, train
from moekit.moe.train.metrics import Interval, flat_scalars, routing_entry, trackers, train_flops_per_token

from helpers import one_line_error


def layer_stats(bias: list[float] | None, k: int = 1, E: int = 4):
    """RouterStats of one MoE layer with a zero router (uniform scores) plus a selection bias."""
    cfg = MoEConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_local_experts=E, num_experts_per_tok=k)
    layer = MoEFeedForward(cfg)
    torch.nn.init.zeros_(layer.gate.weight)
    if bias is not None:
        layer.gate.e_score_correction_bias.copy_(torch.tensor(bias))
    _, aux = layer(torch.randn(1, 40, 16))
    return routing_stats([aux])


def test_everything_on_one_expert_reads_as_a_collapsed_router():
    interval = Interval()
    for _ in range(3):  # three steps of one micro-batch each
        interval.add_routing(layer_stats([5.0, 0.0, 0.0, 0.0]), 1.0)
        interval.steps += 1
    entry = routing_entry(interval.report(lambda v: v, lambda v: v))
    assert entry["expert_fraction"] == [[1.0, 0.0, 0.0, 0.0]] and entry["max_load"] == [4.0]  # = E
    assert entry["dead_experts"] == [3]  # E - 1
    assert entry["layer_aux_loss"] == [pytest.approx(1.0)]  # f = (1, 0, 0, 0), P uniform: E * 1 * 1/4


def test_a_uniform_router_has_entropy_log_e_and_fractions_summing_to_one():
    stats = layer_stats(None, k=2)
    interval = Interval()
    interval.add_routing(stats, 1.0)
    interval.steps = 1
    entry = routing_entry(interval.report(lambda v: v, lambda v: v))
    assert entry["entropy"] == [pytest.approx(math.log(4), abs=1e-5)]
    assert sum(entry["expert_fraction"][0]) == pytest.approx(1.0)
    assert flat_scalars({"step": 1, **entry})["expert_fraction/layer0/expert3"] == entry["expert_fraction"][0][3]


def test_training_metrics_lines(tmp_path):
    r = train(TrainOptions(model="tiny-moe", out=str(tmp_path / "run"), steps=4, batch_size=2, seq_len=16,
                           log_every=2, eval_every=4, eval_batches=1, peak_flops=1e12, progress=False), log=None)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 2, 4] and lines[0]["val_ppl"] == pytest.approx(math.exp(lines[0]["val_loss"]),
                                                                                            rel=1e-4)
    last = lines[-1]
    flops = train_flops_per_token(r.model, 16)
    # tokens_per_s is logged rounded to 0.1 (MFU from the unrounded value): on a loaded CPU a few tokens/s
    assert last["mfu"] == pytest.approx(flops * last["tokens_per_s"] / 1e12, abs=flops * 0.05 / 1e12, rel=1e-3)
    assert last["ppl"] == pytest.approx(math.exp(last["lm_loss"]), rel=1e-4)
    E = r.model.config.num_local_experts
    assert len(last["expert_fraction"]) == 2 and all(len(row) == E and sum(row) == pytest.approx(1, abs=1e-4)
                                                     for row in last["expert_fraction"])
    for key in ("layer_aux_loss", "layer_z_loss", "max_load", "dead_experts", "entropy", "dropped"):
        assert len(last[key]) == 2, key
    assert all(1 <= x <= E for x in last["max_load"]) and all(0 < h <= math.log(E) + 1e-6 for h in last["entropy"])


def test_mfu_is_not_available_on_cpu_without_a_peak(tmp_path):
    r = train(TrainOptions(model="tiny", steps=2, batch_size=2, seq_len=8, log_every=1, eval_batches=1,
                           progress=False), log=None)
    assert [m.get("mfu", "absent") for m in r.metrics[1:]] == [None, None]


def test_trackers(capsys, monkeypatch):
    assert trackers("none") == []
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert trackers("all-installed") == []
    err = one_line_error(capsys, "train", "tiny", "--out", "x", "--report-to", "wandb")
    assert "the wandb package is not installed" in err
