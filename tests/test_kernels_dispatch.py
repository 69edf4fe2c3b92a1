"""kernels' public API on CPU: dispatch to the reference, backend selection and its errors, the benchmark's CPU
smoke run. (The Triton kernels themselves: tests/test_kernels_interp.py on CPU, tests/test_kernels_gpu.py.)"""

import importlib.util
import json
import os

import pytest
import torch

import kernels
from kernels import bench, reference


def _layer(T=9, k=2, E=4, H=16, F=24):
    x = torch.randn(T, H)
    weights, ids = torch.randn(T, E).softmax(-1).topk(k, dim=-1)
    return x, weights, ids, torch.randn(E, 2 * F, H) / H ** 0.5, torch.randn(E, H, F) / F ** 0.5


def test_cpu_tensors_take_the_reference_path():
    x, weights, ids, gate_up, down = _layer()
    assert kernels.resolve_backend(None, x) == "torch"
    assert torch.equal(kernels.swiglu_experts(x, weights, ids, gate_up, down),
                       reference.swiglu_experts(x, weights, ids, gate_up, down))
    order, counts, offsets = kernels.routing_metadata(ids, 4)
    assert counts.sum() == ids.numel() and offsets[-1] == ids.numel()
    xs = kernels.permute(x, order, 2)
    assert torch.equal(kernels.grouped_mm(xs, gate_up, offsets), reference.grouped_mm(xs, gate_up, offsets))
    assert torch.equal(kernels.unpermute(xs, order, weights), reference.unpermute(xs, order, weights))


def test_backend_errors():
    x, weights, ids, gate_up, down = _layer()
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.swiglu_experts(x, weights, ids, gate_up, down, backend="cuda")
    with pytest.raises(ValueError, match="swiglu_experts only"):
        kernels.grouped_mm(x, gate_up, torch.tensor([9, 9, 9, 9], dtype=torch.int32), backend="megablocks")
    with pytest.raises(ValueError, match=r"down_proj \[E, H, F\]"):
        kernels.swiglu_experts(x, weights, ids, gate_up, down.transpose(1, 2))
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.swiglu_experts(x.half(), weights, ids, gate_up, down, backend="torch")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or importlib.util.find_spec("triton") is None,
                    reason="needs triton, outside the interpreter")
def test_triton_on_cpu_needs_the_interpreter():
    x, weights, ids, gate_up, down = _layer()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.swiglu_experts(x, weights, ids, gate_up, down, backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("megablocks") is not None, reason="megablocks is installed")
def test_megablocks_backend_without_megablocks_says_how_to_get_it():
    with pytest.raises(ImportError, match="pip install megablocks"):
        kernels.swiglu_experts(*_layer(), backend="megablocks")


def test_bench_gemm_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gemm.json"
    argv = ["--tokens", "32", "--hidden", "32", "--ffn", "48", "--experts", "4", "--iters", "1", "--warmup", "0",
            "--json", str(out)]
    assert bench.main(argv) == 0
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
    from moe.cli import main

    out = tmp_path / "gemm.json"
    argv = ["bench", "gemm", *sep, "--tokens", "16", "--hidden", "16", "--ffn", "24", "--experts", "2", "--iters",
            "1", "--warmup", "0", "--sections", "gemm", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["shapes"] == {"hidden": 16, "ffn": 24, "experts": 2, "top_k": 2}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_autotune_pruning(monkeypatch):
    """The CUDA config lists, pruned for shared memory (H100: 227 KiB), accumulator registers and tiny batches."""
    from kernels import triton_gemm as g

    monkeypatch.setattr(g, "_device_limits", lambda index: (9, 227 * 1024))
    monkeypatch.setattr(g.torch.cuda, "current_device", lambda: 0)
    a = torch.empty(0, dtype=torch.bfloat16)
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in cs}
    prune = lambda shapes, mode, m=1 << 17: tiles(g._prune([g._cfg(*s) for s in shapes], {"a_ptr": a, "M_BUCKET": m},
                                                           MODE=mode))
    assert prune(g.HOPPER, g.MODE_PLAIN) == {s[:4] for s in g.HOPPER}  # one B tile: everything fits
    assert prune(g.HOPPER, g.MODE_SWIGLU) == {(128, 128, 64, 8), (64, 128, 64, 4), (64, 128, 64, 8),
                                              (128, 64, 64, 4), (128, 64, 64, 8), (64, 64, 64, 4)}
    assert prune(g.HOPPER, g.MODE_SWIGLU_BWD) == {(64, 128, 64, 8), (128, 64, 64, 8), (64, 64, 64, 4)}
    assert {t[0] for t in prune(g.HOPPER, g.MODE_PLAIN, m=8)} == {64}  # decode-sized batch: no 128-row tiles
    monkeypatch.setattr(g, "_device_limits", lambda index: (8, 99 * 1024))  # e.g. an RTX 3090 (sm_86)
    assert prune(g.AMPERE, g.MODE_SWIGLU) == {(64, 128, 32, 4), (64, 128, 32, 8), (128, 64, 32, 4),
                                              (128, 64, 32, 8), (64, 64, 32, 4)}
