"""moe.bench.gemm (`moekit bench gemm`): the CPU smoke run (torch rows), its JSON and the command line."""

import json

import pytest

from moekit.cli import main


def test_bench_gemm_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gemm.json"
    argv = ["--tokens", "32", "--hidden", "32", "--ffn", "48", "--experts", "4", "--iters", "1", "--warmup", "0",
            "--json", str(out)]
    assert main(["bench", "gemm", *argv]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["section"], r["impl"], r["pass"]) for r in rows} == {
        (s, i, p) for s, impls in (("gemm", ("dense matmul", "torch.grouped_mm")),
                                   ("experts", ("dense swiglu", "torch reference")))
        for i in impls for p in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    dense = next(r for r in rows if r["impl"] == "dense matmul" and r["pass"] == "fwd")
    assert dense["x_dense"] == 1.0 and result["shapes"] == {"hidden": 32, "ffn": 48, "experts": 4, "top_k": 2}
    assert "TFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize("sep", [[], ["--"]], ids=["plain", "double-dash"])
def test_moekit_bench_gemm_passes_its_options_through(tmp_path, sep):
    out = tmp_path / "gemm.json"
    argv = ["bench", "gemm", *sep, "--tokens", "16", "--hidden", "16", "--ffn", "24", "--experts", "2", "--iters",
            "1", "--warmup", "0", "--sections", "gemm", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["shapes"] == {"hidden": 16, "ffn": 24, "experts": 2, "top_k": 2}


