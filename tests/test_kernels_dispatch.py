"""kernels' public API on CPU: dispatch to the reference, backend selection and its errors.
(The Triton kernels themselves: tests/test_kernels_triton.py on CPU, tests/test_kernels_triton_gpu.py.)"""

import importlib.util
import os

import pytest
import torch

from moekit import kernels
from moekit.kernels import reference


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


def test_a_torch_without_grouped_mm_takes_the_per_expert_loop(monkeypatch):
    x, weights, ids, gate_up, down = _layer()
    order, _, offsets = kernels.routing_metadata(ids, 4)
    xs = kernels.permute(x, order, 2)
    with_torch = reference.grouped_mm(xs, gate_up, offsets)
    monkeypatch.delattr(reference.F, "grouped_mm")  # as in releases before it, or one that refuses the dtype
    reference._torch_grouped_mm.cache_clear()
    try:
        assert torch.allclose(reference.grouped_mm(xs, gate_up, offsets), with_torch, atol=1e-5)
        g = torch.randn(xs.shape[0], 24)
        assert torch.allclose(reference.grouped_mm_weight_grad(xs, g, offsets),
                              torch.stack([xs[a:b].T @ g[a:b] for a, b in zip([0, *offsets[:-1]], offsets)]),
                              atol=1e-5)
    finally:
        reference._torch_grouped_mm.cache_clear()


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






@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_autotune_pruning(monkeypatch):
    """The CUDA config lists, pruned for shared memory (H100: 227 KiB), accumulator registers and tiny batches."""
    from moekit.kernels import triton_gemm as g

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
