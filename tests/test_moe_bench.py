import json

from moe.cli import main


def test_bench_layer_cli_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "layer.json"
    rc = main(["bench", "layer", "--hidden", "32", "--ffn", "48", "--experts", "4", "--tokens", "64",
               "--repeats", "1", "--warmup", "0", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| moekit |" in out and "| hf-grouped_mm |" in out and "| dense-equivalent |" in out
    report = json.loads(path.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent"}
    assert results["dense-equivalent"]["forward_backward_x_dense"] == 1.0
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in results.values())
    # transformers' blocks got our weights and routing: same outputs
    assert results["hf-eager"]["max_abs_diff_vs_moekit"] < 1e-5
    assert results["hf-grouped_mm"]["max_abs_diff_vs_moekit"] < 1e-5
    assert report["setup"]["tokens"] == 64 and report["setup"]["top_k"] == 2


def test_bench_layer_rejects_bad_shapes(capsys):
    assert main(["bench", "layer", "--experts", "2", "--top-k", "3", "--tokens", "8", "--hidden", "8",
                 "--ffn", "8", "--repeats", "1"]) == 2
    assert "num_experts_per_tok (3) must be at most num_local_experts (2)" in capsys.readouterr().err
