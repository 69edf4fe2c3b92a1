"""moe.bench.layer (`moekit bench layer`): the table and JSON, presets and overrides, contenders (megablocks
faked on CPU), errors."""

import json

import pytest
import torch

import moekit.moe.bench.layer as bench
from moekit.cli import main
from moekit.kernels import reference
from moekit.moe import MoEConfig, MoEFeedForward

TINY = ["--hidden", "32", "--ffn", "48", "--experts", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu"]


def test_bench_layer_cli_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "layer.json"
    rc = main(["bench", "layer", *TINY, "--tokens", "64", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| moekit |" in out and "| hf-grouped_mm |" in out and "| dense-equivalent |" in out
    assert "T=64 float32, " in out and " threads, median of 1" in out  # the CPU header
    assert "megablocks" not in out and "syncs" not in out  # no megablocks, no sync check on CPU
    report = json.loads(path.read_text())
    assert report["setup"]["tokens"] == [64] and report["setup"]["top_k"] == 2
    assert report["setup"]["device"] == "cpu" and report["setup"]["gpu"] is None
    assert report["setup"]["torch"] == torch.__version__ and "commit" in report["setup"] and "triton" in report["setup"]
    [run] = report["runs"]
    results = {r["name"]: r for r in run["results"]}
    assert set(results) == {"moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent"}
    assert results["dense-equivalent"]["forward_backward_x_dense"] == 1.0
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in results.values())
    # transformers' blocks got our weights and routing: same outputs
    assert results["hf-eager"]["max_abs_diff_vs_moekit"] < 1e-5
    assert results["hf-grouped_mm"]["max_abs_diff_vs_moekit"] < 1e-5
    assert set(run["moekit_speedup"]) == {"hf-eager", "hf-grouped_mm"}
    sp = run["moekit_speedup"]["hf-grouped_mm"]["forward_backward"]
    assert sp == pytest.approx(results["hf-grouped_mm"]["forward_backward_s"] / results["moekit"]["forward_backward_s"])
    assert run["syncs_in_forward"] is None and run["tokens"] == 64


def test_bench_layer_several_token_counts(tmp_path, capsys):
    path = tmp_path / "layer.json"
    assert main(["bench", "layer", *TINY, "--tokens", "16", "40", "--only", "moekit", "dense-equivalent",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| moekit |") == 2 and "T=16 " in out and "T=40 " in out
    report = json.loads(path.read_text())
    assert report["setup"]["tokens"] == [16, 40] and report["setup"]["contenders"] == ["moekit", "dense-equivalent"]
    assert [r["tokens"] for r in report["runs"]] == [16, 40]
    assert report["runs"][1]["forward_gflop"] == pytest.approx(6 * 40 * 2 * 48 * 32 / 1e9)
    assert all([r["name"] for r in run["results"]] == ["moekit", "dense-equivalent"] for run in report["runs"])
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically


def test_bench_layer_preset_and_overrides(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "bench_layer", lambda **kw: calls.append(kw) or {"setup": {"threads": 1}, "runs": []})
    assert main(["bench", "layer", "--preset", "mixtral", "--device", "cpu"]) == 0
    assert main(["bench", "layer", "--preset", "mixtral", "--tokens", "8", "--dtype", "fp32", "--only", "moekit"]) == 0
    assert main(["bench", "layer"]) == 0  # the defaults are bench_layer's own (fp32 on CPU, bf16 on CUDA)
    mixtral = dict(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, dtype=torch.bfloat16,
                   tokens=[4096, 16384, 65536])
    assert calls == [dict(mixtral, contenders=None, device="cpu"),
                     dict(mixtral, tokens=[8], dtype=torch.float32, contenders=["moekit"], device="auto"),
                     dict(contenders=None, device="auto")]


def test_bench_layer_errors(capsys, monkeypatch):
    def error(*argv):
        assert main(["bench", "layer", *TINY, "--tokens", "8", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moekit bench layer: error: ")
        return err

    assert "'megablocks' runs on CUDA only (device cpu)" in error("--only", "megablocks")
    assert "--device must be auto, cpu, cuda or cuda:N; got 'tpu'" in error("--device", "tpu")
    assert "--tokens must be in [1, 2147483648], got 0" in error("--tokens", "8", "0")
    assert "num_experts_per_tok (3) must be at most num_local_experts (2)" in error("--experts", "2", "--top-k", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = error("--device", "cuda")
    assert "--device cuda: torch " in err and "sees no CUDA GPU (torch.cuda.is_available() is False)" in err
    monkeypatch.setattr(bench, "has_megablocks", lambda: False)
    with pytest.raises(bench.MoekitError, match="needs the megablocks package"):
        bench.check_contenders(["moekit", "megablocks"], torch.device("cuda"))
    assert bench.default_contenders(torch.device("cuda")) == ("moekit", "hf-grouped_mm", "dense-equivalent")
    monkeypatch.setattr(bench, "has_megablocks", lambda: True)
    assert bench.default_contenders(torch.device("cuda")) == ("moekit", "hf-grouped_mm", "megablocks",
                                                              "dense-equivalent")
    assert bench.default_contenders(torch.device("cpu")) == ("moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent")


def fake_megablocks_run(x, weights, expert_ids, num_experts, w1, v1, w2):
    """megablocks.run's contract computed by the reference, from megablocks' layout back to ours."""
    E, (EF, H) = num_experts, w1.shape
    gate_up = torch.cat([w1.view(E, EF // E, H), v1.view(E, EF // E, H)], 1)  # [E, 2F, H]
    return reference.swiglu_experts(x, weights, expert_ids, gate_up, w2.view(E, EF // E, H).transpose(1, 2))


def test_megablocks_contender_runs_on_our_weights(monkeypatch, capsys):
    """The megablocks contender's plumbing on CPU: megablocks itself (CUDA only) replaced by the reference."""
    monkeypatch.setattr(bench.megablocks, "run", fake_megablocks_run)
    monkeypatch.setattr(bench.megablocks, "_import", lambda: None)
    ours = MoEFeedForward(MoEConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=1,
                                    num_local_experts=4, num_experts_per_tok=2, vocab_size=8))
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.25)
    mb = bench.MegablocksLayer(ours)
    assert {n for n, _ in mb.named_parameters()} == {"gate.weight", "w1", "v1", "w2"}
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mb(x), ours(x)[0])
    monkeypatch.setattr(bench, "check_contenders", lambda *a: None)
    report = bench.bench_layer(16, 24, 4, 2, tokens=(8,), repeats=1, warmup=0, contenders=("moekit", "megablocks"))
    [run] = report["runs"]
    assert run["results"][1]["name"] == "megablocks" and run["results"][1]["max_abs_diff_vs_moekit"] < 1e-5
    assert set(run["moekit_speedup"]) == {"megablocks"}


def test_format_table_on_cuda():
    result = lambda name, f, fb, **kw: dict(name=name, forward_s=f, forward_backward_s=fb, forward_x_dense=1.0,
                                            forward_backward_x_dense=1.0, **kw)
    report = {"setup": dict(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, dtype="bfloat16",
                            repeats=10, device="cuda", gpu="NVIDIA Test GPU", threads=16),
              "runs": [{"tokens": 4096, "syncs_in_forward": 0, "results": [
                  result("moekit", 0.001, 0.003), result("megablocks", None, None, error="out of memory")],
                  "moekit_speedup": {"hf-grouped_mm": {"forward": 1.5, "forward_backward": 2.0},
                                     "megablocks": {"forward": None, "forward_backward": None}}}]}
    out = bench.format_table(report)
    assert "T=4096 bfloat16, NVIDIA Test GPU, median of 10" in out
    assert "| moekit | 1.0 | 1.00 | 3.0 | 1.00 |" in out and "| megablocks (out of memory) | - |" in out
    assert "moekit vs hf-grouped_mm: forward 1.50x, forward+backward 2.00x faster" in out
    assert "moekit vs megablocks: forward -, forward+backward - faster" in out
    assert "host-device syncs under set_sync_debug_mode('error'): 0" in out


def test_megablocks_left_out_or_failing(monkeypatch, capsys):
    """Chosen by default but not importable: left out and said so; asked for: a one-line error; failing in a run:
    reported in its row while the others are timed."""
    monkeypatch.setattr(bench, "check_contenders", lambda *a: None)
    monkeypatch.setattr(bench, "default_contenders", lambda device: ("moekit", "megablocks"))
    monkeypatch.setattr(bench.megablocks, "_import", lambda: (_ for _ in ()).throw(ImportError("no megablocks here")))
    kw = dict(hidden_size=16, intermediate_size=24, num_experts=4, top_k=2, tokens=8, repeats=1, warmup=0)
    report = bench.bench_layer(**kw)
    assert report["setup"]["left_out"] == {"megablocks": "no megablocks here"}
    assert report["setup"]["contenders"] == ["moekit"] and len(report["runs"][0]["results"]) == 1
    assert bench.format_table(report).startswith("left out: megablocks (no megablocks here)\n\nMoE layer, H=16")
    with pytest.raises(bench.MoekitError, match="^contender 'megablocks': no megablocks here$"):
        bench.bench_layer(**kw, contenders=("moekit", "megablocks"))

    def broken(*a):
        raise ValueError("bad shapes\nsecond line")

    monkeypatch.setattr(bench.megablocks, "_import", lambda: None)
    monkeypatch.setattr(bench.megablocks, "run", broken)
    [run] = bench.bench_layer(**kw)["runs"]
    moekit, mb = run["results"]
    assert mb["error"] == "ValueError: bad shapes" and mb["forward_s"] is None and moekit["forward_s"] > 0
    assert run["moekit_speedup"] == {"megablocks": {"forward": None, "forward_backward": None}}
