"""The Triton kernels on a CUDA GPU, compiled (not interpreted): bf16/fp16/fp32 against the fp32 oracle on CPU,
determinism, torch.compile(fullgraph=True) of the routed op, and no host-device sync in the forward.
Skipped without CUDA; the same kernels run on CPU in tests/test_kernels_triton.py."""

import os

import pytest
import torch

from moekit import kernels
from moekit.kernels import reference as ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}  # max error / max |oracle|
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])


def routing(name: str):
    """(expert_ids [T, k] on CUDA, E, H, F): shapes off every tile size, and experts with 0, 1 and all tokens."""
    g = torch.Generator().manual_seed(0)
    if name == "edges":
        T, E = 301, 8
        ids = torch.stack([torch.full((T,), 7), 2 + torch.arange(T) % 4], 1)  # expert 7: all tokens
        ids[5, 1] = 1  # expert 1: one token; experts 0 and 6: none
        H, F = 200, 136
    elif name == "single":
        ids, E, H, F = torch.tensor([[3, 1]]), 8, 256, 320
    else:
        T, E = 1000, 8
        ids = torch.randn(T, E, generator=g).topk(2, dim=-1).indices
        H, F = 512, 704
    return ids.cuda(), E, H, F


def tensors(name, dtype):
    ids, E, H, F = routing(name)
    T, k = ids.shape
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(T, H, generator=g), torch.rand(T, k, generator=g),
          torch.randn(E, 2 * F, H, generator=g) / H ** 0.5, torch.randn(E, H, F, generator=g) / F ** 0.5]
    return ids, [t.to("cuda", dtype).requires_grad_() for t in ts]


def close(ours, want, dtype):
    assert ours.dtype == dtype and ours.is_cuda
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(ours.detach().float().cpu(), want.detach(), atol=TOL[dtype] * scale, rtol=0)


def oracle_layer(ids, ts, dy):
    """Reference output and gradients (x, weights, gate_up, down) in fp32 on CPU."""
    rs = [t.detach().float().cpu().requires_grad_() for t in ts]
    y = ref.swiglu_experts(rs[0], rs[1], ids.cpu(), rs[2], rs[3])
    return y, torch.autograd.grad(y, rs, dy.float().cpu())


@pytest.mark.parametrize("name", ["edges", "single", "random"])
@DTYPES
def test_swiglu_experts_matches_reference(name, dtype):
    ids, ts = tensors(name, dtype)
    y = kernels.swiglu_experts(ts[0], ts[1], ids, ts[2], ts[3])  # CUDA: Triton by default
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, dy)
    want, want_grads = oracle_layer(ids, ts, dy)
    close(y, want, dtype)
    for ours, w in zip(grads, want_grads):
        close(ours, w, dtype)
    with torch.no_grad():  # inference: the decode path for <= DECODE_MAX_COPIES copies, grouped otherwise
        close(kernels.swiglu_experts(ts[0], ts[1], ids, ts[2], ts[3]), want, dtype)


@DTYPES
def test_ops_match_reference(dtype):
    ids, (x, weights, gate_up, _) = tensors("edges", dtype)
    E, k = gate_up.shape[0], ids.shape[1]
    order, counts, offsets = kernels.routing_metadata(ids, E)
    for ours, want in zip((order, counts, offsets), ref.routing_metadata(ids.cpu(), E)):
        assert torch.equal(ours.cpu(), want)
    y = kernels.unpermute(kernels.grouped_mm(kernels.permute(x, order, k), gate_up[:, :200], offsets), order, weights)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weights, gate_up), dy)
    xr, wr, gr = [t.detach().float().cpu().requires_grad_() for t in (x, weights, gate_up)]
    o = order.cpu()
    yr = ref.unpermute(ref.grouped_mm_loop(ref.permute(xr, o, k), gr[:, :200], offsets.cpu()), o, wr)
    close(y, yr, dtype)
    for ours, want in zip(grads, torch.autograd.grad(yr, (xr, wr, gr), dy.float().cpu())):
        close(ours, want, dtype)


def test_forward_and_backward_are_deterministic():
    ids, ts = tensors("random", torch.bfloat16)
    runs = []
    for _ in range(2):
        y = kernels.swiglu_experts(ts[0], ts[1], ids, ts[2], ts[3])
        runs.append([y, *torch.autograd.grad(y, ts, torch.ones_like(y))])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_torch_compile_fullgraph():
    ids, ts = tensors("random", torch.bfloat16)

    def layer(x, weights, ids, gate_up, down):
        order, _, offsets = kernels.routing_metadata(ids, gate_up.shape[0])
        y = kernels.swiglu_experts(x, weights, ids, gate_up, down)
        z = kernels.unpermute(kernels.grouped_mm(kernels.permute(x, order, 2), down.transpose(1, 2), offsets)[:, :16],
                              order, weights)
        return y.float().square().mean() + z.float().mean()

    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(ts[0], ts[1], ids, ts[2], ts[3])
    grads = torch.autograd.grad(loss, ts)
    loss_eager = layer(ts[0], ts[1], ids, ts[2], ts[3])
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, torch.autograd.grad(loss_eager, ts)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_forward_has_no_host_sync(grad):
    for T in (1000, 4):  # grouped and (inference) decode paths
        ids, ts = tensors("random", torch.bfloat16)
        ids, ts = ids[:T], [t.detach()[:T].requires_grad_(grad) if i < 2 else t for i, t in enumerate(ts)]
        with torch.set_grad_enabled(grad):
            kernels.swiglu_experts(ts[0], ts[1], ids, ts[2], ts[3])  # warm-up: autotuning syncs
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                kernels.swiglu_experts(ts[0], ts[1], ids, ts[2], ts[3])
            finally:
                torch.cuda.set_sync_debug_mode(0)
