"""moe.bench.train (`moekit bench train`): at a tiny size, the JSON's fields, the same initial loss for every
contender (the same weights), the profile's breakdown, presets and one-line errors."""

import json

import pytest
import torch

from moekit.moe.bench.options import TrainBenchOptions
from moekit.moe.bench.train import bench_train, format_table

from helpers import moekit, one_line_error

TINY = ["--layers", "2", "--hidden", "64", "--ffn", "96", "--experts", "4", "--heads", "4", "--kv-heads", "2",
        "--vocab", "128", "--batch", "2", "--seq-len", "16", "--repeats", "2", "--warmup", "0", "--device", "cpu"]


def test_bench_train_cli_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    rc, out, err = moekit(capsys, "bench", "train", *TINY, "--json", path)
    assert rc == 0, err
    assert "| moekit |" in out and "| hf-grouped_mm |" in out and "| hf-eager |" in out and "USDT" not in err
    report = json.loads(path.read_text())
    s = report["setup"]
    assert (s["layers"], s["hidden"], s["experts"], s["tokens_per_step"], s["dtype"]) == (2, 64, 4, 32, "fp32")
    assert s["contenders"] == ["moekit", "hf-grouped_mm", "hf-eager"] and s["device"] == "cpu"
    assert s["torch"] == torch.__version__ and s["peak_flops"] is None and s["adamw"] == "fused"
    # 3 x forward; forward = 2 x matmul weights per token (2 layers x (q, k, v, o 12,288 + router 256 + 2 of 4
    # experts 36,864) + lm head 8,192 = 107,008) + attention 2 x 2 layers x 16 positions x 4 heads x (16 + 16)
    assert s["train_flops_per_token"] == 3 * (2 * 107_008 + 2 * 2 * 16 * 4 * 32) == 666_624
    results = {r["name"]: r for r in report["results"]}
    losses = [r["initial_loss"] for r in results.values()]
    assert max(losses) - min(losses) < 1e-5 and losses[0] == pytest.approx(4.9249, abs=1e-3)  # ~ log 128 + aux
    for r in results.values():
        assert len(r["step_runs_s"]) == 2 and r["step_s"] == pytest.approx(sum(r["step_runs_s"]) / 2)
        assert r["step_s"] == pytest.approx(r["forward_backward_s"] + r["optimizer_s"], rel=0.5)
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"]) and r["mfu"] is None
        p = r["profile"]
        assert 0 < p["matmul_s"] < p["wall_s"] and p["matmul_share"] == pytest.approx(p["matmul_s"] / p["wall_s"])
        assert p["attention_s"] > 0 and "aten::mm" in [op[0] for op in p["top_ops"]]
        assert p["non_gemm_share"] == pytest.approx(1 - (p["matmul_s"] + p["attention_s"]) / p["wall_s"])
        assert r["model_non_gemm_s"] == pytest.approx(r["forward_backward_s"] * p["non_gemm_share"])
        assert r["non_gemm_s"] == pytest.approx(r["model_non_gemm_s"] + r["optimizer_s"])
    fastest = min(("hf-grouped_mm", "hf-eager"), key=lambda n: results[n]["step_s"])
    assert report["fastest"] == fastest
    assert report["moekit_speedup"] == pytest.approx(results[fastest]["step_s"] / results["moekit"]["step_s"])
    assert report["non_gemm_ratio"] == pytest.approx(results["moekit"]["model_non_gemm_s"] /
                                                     results[fastest]["model_non_gemm_s"])
    assert f"{report['moekit_speedup']:.2f}x as fast; outside matrix products (forward+backward) " \
           f"{report['non_gemm_ratio']:.2f}x its time" in out


def test_mfu_with_a_peak_and_no_profile():
    report = bench_train(layers=1, hidden=32, ffn=48, experts=4, heads=2, kv_heads=1, vocab=64, batch=1, seq_len=8,
                         device="cpu", repeats=1, warmup=0, contenders=["moekit", "hf-eager"], peak_flops=1e12,
                         profile_steps=0, adamw="foreach")
    r = report["results"][0]
    assert r["mfu"] == pytest.approx(report["setup"]["train_flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert "profile" not in r and report["non_gemm_ratio"] is None and report["setup"]["adamw"] == "foreach"
    assert format_table(report).endswith("outside matrix products (forward+backward) not profiled")


def test_preset_and_overrides():
    assert TrainBenchOptions(preset="1b", batch=2).model_kwargs() == dict(
        layers=12, hidden=2048, ffn=5632, experts=8, top_k=2, heads=16, kv_heads=8, vocab=32000, batch=2,
        seq_len=2048, dtype="bf16")
    assert TrainBenchOptions().model_kwargs()["hidden"] == 512  # the CPU size: 4 layers, H=512, 8 experts top-2


def test_the_1b_preset_has_about_1b_active_parameters(capsys):
    from moekit.moe.accounting import count_params
    from moekit.moe.bench.train import moe_config

    count = count_params(moe_config(**TrainBenchOptions(preset="1b").model_kwargs()))
    assert round(count.matmul_active_params / 1e9, 2) == 1.05 and round(count.total_params / 1e9, 1) == 3.6


@pytest.mark.parametrize("argv, words", [
    (["--only", "moekit"], "--only needs moekit and at least one hf-* contender"),
    (["--only", "hf-eager", "hf-grouped_mm"], "--only needs moekit"),
    (["--top-k", "5", "--experts", "4"], "--top-k 5 is greater than --experts 4"),
    (["--heads", "3"], "--heads 3 must divide --hidden 512"),
    (["--batch", "0"], "--batch must be in [1, 2147483648], got 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_options_are_one_line(argv, words, capsys):
    assert words in one_line_error(capsys, "bench", "train", *argv)
