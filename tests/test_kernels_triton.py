"""Every Triton kernel against the pure-torch oracle (kernels.reference), run by the Triton CPU interpreter in fp32
and fp16: outputs and all gradients, on shapes that are not multiples of the 16-wide tiles, with experts that get
zero, one or all tokens, and T = 1. (bf16 is left to tests/test_kernels_triton_gpu.py: the interpreter's tl.dot has
no bf16.) The oracle runs in fp32 on the same (rounded) inputs.

Triton reads TRITON_INTERPRET when a kernel is decorated, that is when kernels.triton_* is imported, so one process
cannot hold both kinds of kernels. In an ordinary pytest run this module therefore collects a single test that
re-runs this file in a child pytest with TRITON_INTERPRET=1; the cases below carry the `interpreted` marker, which
conftest.py collects only in that child.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.kernels import reference as ref

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}  # max error / max |oracle|
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


interpreted = pytest.mark.interpreted  # collected only under TRITON_INTERPRET=1 (see conftest.py)


@pytest.mark.slow
def test_cases_under_the_triton_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout[-8000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    summary = out.stdout.strip().splitlines()[-1]
    print(summary)
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, log


def scenario(name: str):
    """(expert_ids [T, k], E, H, F) for a named routing."""
    g = torch.Generator().manual_seed(1)
    if name == "edges":  # expert 0 gets no token, 1 exactly one, 4 all of them (21 rows: two m-tiles)
        T, k, E = 21, 2, 5
        ids = torch.stack([torch.full((T,), 4), 2 + torch.arange(T) % 2], 1)
        ids[7, 1] = 1
    elif name == "single":  # T = 1
        T, k, E = 1, 2, 3
        ids = torch.tensor([[2, 0]])
    else:  # random top-2 over 5 experts
        T, k, E = 17, 2, 5
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return ids, E, 37, 23


SCENARIOS = pytest.mark.parametrize("name", ["edges", "single", "random"])


def tensors(name: str, dtype: torch.dtype):
    """expert_ids, and x [T, H], weights [T, k], gate_up [E, 2F, H], down [E, H, F] in dtype, requiring grad."""
    ids, E, H, F = scenario(name)
    T, k = ids.shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=g)
    weights = torch.rand(T, k, generator=g)
    gate_up = torch.randn(E, 2 * F, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, F, generator=g) / F ** 0.5
    return ids, [t.to(dtype).requires_grad_() for t in (x, weights, gate_up, down)]


def oracle(ts):
    return [t.detach().float().requires_grad_() for t in ts]


def close(ours: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.dtype == dtype and ours.shape == want.shape
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(ours.detach().float(), want.detach(), atol=TOL[dtype] * scale, rtol=0)


@interpreted
def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from moekit.kernels import triton_ops
    from moekit.kernels.triton_gemm import _grouped_mm_kernel

    assert triton_ops.INTERPRET and isinstance(_grouped_mm_kernel, InterpretedFunction)


@interpreted
@SCENARIOS
def test_routing_metadata_is_the_stable_sort(name):
    from moekit.kernels import triton_routing

    ids, E, _, _ = scenario(name)
    order, inv, tok, counts, offsets = triton_routing.route(ids, E)
    for ours, want in zip((order, counts, offsets), ref.routing_metadata(ids, E)):
        assert ours.dtype == want.dtype and torch.equal(ours, want)
    assert torch.equal(inv[order], torch.arange(ids.numel(), dtype=torch.int32))
    assert torch.equal(tok.long(), order // ids.shape[1])


@interpreted
@SCENARIOS
@DTYPES
def test_permute_and_unpermute(name, dtype):
    from moekit.kernels import triton_ops

    ids, (x, weights, _, _) = tensors(name, dtype)
    k = ids.shape[1]
    order, _, _ = ref.routing_metadata(ids, ids.max().item() + 1)
    xs = triton_ops.permute(x, order, k)  # [M, H]
    y = triton_ops.unpermute(xs * 1.5, order, weights)  # [T, H]
    xr, wr = oracle((x, weights))
    yr = ref.unpermute(ref.permute(xr, order, k) * 1.5, order, wr)
    assert torch.equal(xs, ref.permute(x.detach(), order, k))  # a pure gather: exact
    close(y, yr, dtype)
    dy = torch.randn(y.shape)
    for ours, want in zip(torch.autograd.grad(y, (x, weights), dy.to(dtype)), torch.autograd.grad(yr, (xr, wr), dy)):
        close(ours, want, dtype)


@interpreted
@SCENARIOS
@DTYPES
def test_grouped_mm_forward_and_backward(name, dtype):
    from moekit.kernels import triton_ops

    ids, (x, _, gate_up, down) = tensors(name, dtype)
    order, _, offsets = ref.routing_metadata(ids, gate_up.shape[0])
    xs = ref.permute(x.detach(), order, ids.shape[1]).requires_grad_()  # [M, H]
    down_t = down.transpose(1, 2)  # [E, F, H] strided view: weights need not be contiguous
    outs = [triton_ops.grouped_mm(xs, gate_up, offsets), triton_ops.grouped_mm(xs, down_t, offsets)]
    xsr, gur, dnr = oracle((xs, gate_up, down))
    wants = [ref.grouped_mm_loop(xsr, gur, offsets), ref.grouped_mm_loop(xsr, dnr.transpose(1, 2), offsets)]
    for ours, want in zip(outs, wants):
        close(ours, want, dtype)
    dys = [torch.randn(o.shape) for o in outs]
    grads = torch.autograd.grad(outs, (xs, gate_up, down), [d.to(dtype) for d in dys])
    for ours, want in zip(grads, torch.autograd.grad(wants, (xsr, gur, dnr), dys)):
        close(ours, want, dtype)


@interpreted
@SCENARIOS
@DTYPES
def test_swiglu_experts_forward_and_all_gradients(name, dtype):
    from moekit.kernels import triton_ops

    ids, ts = tensors(name, dtype)
    y = triton_ops.swiglu_experts(*ts[:2], ids, *ts[2:])
    rs = oracle(ts)
    yr = ref.swiglu_experts(*rs[:2], ids, *rs[2:])
    close(y, yr, dtype)
    dy = torch.randn(y.shape)
    for ours, want in zip(torch.autograd.grad(y, ts, dy.to(dtype)), torch.autograd.grad(yr, rs, dy)):
        close(ours, want, dtype)  # x, weights, gate_up_proj, down_proj


@interpreted
@SCENARIOS
@DTYPES
def test_decode_path(name, dtype):
    from moekit.kernels import triton_ops

    ids, ts = tensors(name, dtype)
    with torch.no_grad():
        y = triton_ops.swiglu_experts_decode(*ts[:2], ids, *ts[2:])
    rs = oracle(ts)
    close(y, ref.swiglu_experts(*rs[:2], ids, *rs[2:]), dtype)


@interpreted
def test_public_api_with_backend_triton():
    from moekit import kernels
    ids, ts = tensors("random", torch.float32)
    rs = oracle(ts)
    want = ref.swiglu_experts(*rs[:2], ids, *rs[2:])
    y = kernels.swiglu_experts(*ts[:2], ids, *ts[2:], backend="triton")  # grads wanted: grouped path
    with torch.no_grad():
        y_big = kernels.swiglu_experts(*ts[:2], ids, *ts[2:], backend="triton")  # 34 copies: grouped path
        y_small = kernels.swiglu_experts(ts[0][:3], ts[1][:3], ids[:3], *ts[2:], backend="triton")  # decode
    close(y, want, torch.float32)
    close(y_big, want, torch.float32)
    close(y_small, ref.swiglu_experts(rs[0][:3], rs[1][:3], ids[:3], *rs[2:]), torch.float32)
    order, counts, offsets = kernels.routing_metadata(ids, 5, backend="triton")
    assert torch.equal(counts, ref.routing_metadata(ids, 5)[1])


@interpreted
def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registration, checked by torch.library.opcheck."""
    from moekit.kernels import triton_ops  # noqa: F401  (registers the moekit:: ops)

    ids, (x, weights, gate_up, down) = tensors("edges", torch.float32)
    order, _, offsets = ref.routing_metadata(ids, gate_up.shape[0])
    xs = ref.permute(x.detach(), order, 2).requires_grad_()
    ops = torch.ops.moekit
    for op, args in [(ops.route, (ids, 5)), (ops.permute, (x, order, 2)), (ops.unpermute, (xs, order, weights)),
                     (ops.grouped_mm, (xs, gate_up, offsets)), (ops.swiglu_experts, (x, weights, ids, gate_up, down)),
                     (ops.swiglu_experts_decode, (x.detach(), weights.detach(), ids, gate_up.detach(), down.detach()))]:
        torch.library.opcheck(op.default, args)


@interpreted
def test_torch_compile_fullgraph_traces_the_ops():
    """No graph break around the ops (aot_eager: the CPU has no Triton codegen target), same values and gradients."""
    from moekit import kernels
    ids, ts = tensors("random", torch.float32)

    def layer(x, weights, ids, gate_up, down):
        order, _, offsets = kernels.routing_metadata(ids, gate_up.shape[0], backend="triton")
        y = kernels.swiglu_experts(x, weights, ids, gate_up, down, backend="triton")
        xs = kernels.permute(x, order, 2, backend="triton")
        z = kernels.grouped_mm(xs, down.transpose(1, 2), offsets, backend="triton")  # [M, F]
        return y.square().mean() + kernels.unpermute(z, order, weights, backend="triton").mean()

    loss = torch.compile(layer, fullgraph=True, backend="aot_eager")(ts[0], ts[1], ids, ts[2], ts[3])
    loss_eager = layer(ts[0], ts[1], ids, ts[2], ts[3])
    torch.testing.assert_close(loss, loss_eager)
    for ours, want in zip(torch.autograd.grad(loss, ts), torch.autograd.grad(loss_eager, ts)):
        torch.testing.assert_close(ours, want)
