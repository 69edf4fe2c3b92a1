"""The routed layer's ops in pure PyTorch: the CPU path and the oracle every fast path is tested against.

T tokens, k copies per token, E experts, H hidden, F expert width, M = T*k token copies.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> order [M] (flat copy index, grouped by expert, stable), counts [E], offsets [E] int32.

    offsets[e] is the end of expert e's rows in the sorted copies (a cumulative sum, as grouped_mm takes)."""
    flat = expert_ids.reshape(-1)  # [M]
    order = torch.argsort(flat, stable=True)  # [M]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    return order, counts, counts.cumsum(0).to(torch.int32)


def permute(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """x [T, H] -> x_sorted [M, H]: the token row of each copy, in expert order."""
    return x.index_select(0, order // top_k)


def grouped_mm(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x_sorted [M, in], weight [E, out, in], offsets [E] -> [M, out]: rows of expert e times weight[e]^T."""
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(0, weight.shape[1])
    w_t = weight.transpose(-2, -1)  # [E, in, out]
    if not (_aligned(x_sorted) and _aligned(w_t) and _torch_grouped_mm(x_sorted.device.type, x_sorted.dtype)):
        return grouped_mm_loop(x_sorted, weight, offsets)  # torch's needs 16-byte aligned strides, fp32/16
    return F.grouped_mm(x_sorted, w_t, offs=offsets)


@functools.cache
def _torch_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch's F.grouped_mm runs `dtype` on `device_type` (2.13 runs fp32, fp16 and bf16 on the CPU and
    CUDA; older releases lack it, or take bf16 on CUDA only); where it does not, the per-expert loop."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a, b = (torch.zeros(*shape, dtype=dtype, device=device_type) for shape in ((16, 16), (2, 16, 16)))
        F.grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device_type))
    except RuntimeError:  # (NotImplementedError, for a device or dtype without a kernel, is one)
        return False
    return True


def _aligned(t: torch.Tensor) -> bool:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1)


def grouped_mm_loop(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The same product, one matmul per expert: the readable oracle."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(x_sorted[start:end] @ weight[e].T)
        start = end
    return torch.cat(out) if out else x_sorted.new_zeros(0, weight.shape[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [M, H] (expert order), weights [T, k] -> y [T, H] = sum over the k copies of weight * row."""
    T, k = weights.shape
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to copy order [M, H]
    return (y.view(T, k, -1) * weights.to(y.dtype)[..., None]).sum(1)


def grouped_mm_weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a [M, p], b [M, q], offsets [E] -> [E, p, q]: per expert e, a_e^T @ b_e over its rows (zeros if none)."""
    E = offsets.shape[0]
    if a.shape[0] and _aligned(a.t()) and _aligned(b) and _torch_grouped_mm(a.device.type, a.dtype):
        return F.grouped_mm(a.t(), b, offs=offsets)
    out, start = a.new_zeros(E, a.shape[1], b.shape[1]), 0
    for e, end in enumerate(offsets.tolist()):
        out[e] = a[start:end].t() @ b[start:end]
        start = end
    return out


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """The whole routed SwiGLU: x [T, H], weights/expert_ids [T, k], gate_up_proj [E, 2F, H] (gate rows, then up),
    down_proj [E, H, F] -> y [T, H] = sum_j weights[:, j] * down(silu(gate(x)) * up(x)) of expert expert_ids[:, j].

    One autograd Function (below) with a hand-written backward: it saves the gate/up activations only and
    recomputes the gathered input and the SwiGLU, so forward+backward costs about what a dense SwiGLU of width
    k*F costs. `swiglu_experts_composed` is the same computation built from the ops above (autograd through them)."""
    return _SwiGLUExperts.apply(x, weights, expert_ids, gate_up_proj, down_proj)


def swiglu_experts_composed(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                            gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """swiglu_experts from permute -> grouped_mm -> swiglu -> grouped_mm -> unpermute, differentiated by autograd."""
    E, k = gate_up_proj.shape[0], expert_ids.shape[1]
    order, _, offsets = routing_metadata(expert_ids, E)
    h = grouped_mm(permute(x, order, k), gate_up_proj, offsets)  # [M, 2F]
    gate, up = h.chunk(2, dim=-1)
    return unpermute(grouped_mm(swiglu(gate, up), down_proj, offsets), order, weights)


class _SwiGLUExperts(torch.autograd.Function):
    """Forward: x_s = x[token of each sorted copy]; h = x_s W_gu^T [M, 2F]; a = silu(gate) * up [M, F];
    o = a W_d^T [M, H]; y[t] = sum_j w[t, j] * o[copy (t, j)]. Saves x_s, h, a and o.

    The backward allocates less than a dense SwiGLU's autograd does (on CPU a fresh large tensor costs page
    faults comparable to the arithmetic on it): unless the graph is kept (retain_graph), the SwiGLU gradient
    [d gate | d up] is written over h's storage, with `a`'s storage as scratch."""

    @staticmethod
    def forward(ctx, x, weights, expert_ids, gate_up_proj, down_proj):
        T, k = expert_ids.shape
        Fe = down_proj.shape[-1]
        order, _, offsets = routing_metadata(expert_ids, gate_up_proj.shape[0])  # [M], [E], [E]
        token = order // k  # [M] token of each copy, in expert order
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        x_s = x.index_select(0, token)  # [M, H]
        h = grouped_mm(x_s, gate_up_proj, offsets)  # [M, 2F]
        a = F.silu(h[:, :Fe]).mul_(h[:, Fe:])  # [M, F]
        o = grouped_mm(a, down_proj, offsets)  # [M, H]
        ctx.save_for_backward(weights, gate_up_proj, down_proj, x_s, h, a, o, order, token, inverse, offsets)
        return _combine(o, inverse.view(T, k), weights.to(o.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        weights, gate_up_proj, down_proj, x_s, h, a, o, order, token, inverse, offsets = ctx.saved_tensors
        T, k = weights.shape
        Fe = down_proj.shape[-1]
        go = gy.contiguous().index_select(0, token)  # [M, H] grad of each copy's output, before its weight
        g_weights = g_gate_up = g_down = g_x = None
        if ctx.needs_input_grad[1]:
            g_w = torch.linalg.vecdot(go, o)  # [M]
            g_weights = torch.empty_like(g_w).scatter_(0, order, g_w).view(T, k).to(weights.dtype)
        go.mul_(weights.reshape(-1).index_select(0, order).to(go.dtype)[:, None])  # [M, H] grad of o
        if ctx.needs_input_grad[4]:
            g_down = grouped_mm_weight_grad(go, a, offsets)  # [E, H, F]
        ga = grouped_mm(go, down_proj.transpose(1, 2), offsets)  # [M, F] grad of a
        reuse = not _keep_graph()  # h and a are not needed again: overwrite them
        gh = h if reuse else torch.empty_like(h)  # [M, 2F]: grad of gate, then of up
        gate, up = h[:, :Fe], h[:, Fe:]
        ga_up = torch.mul(ga, up, out=a) if reuse else ga * up
        torch.ops.aten.silu.out(gate, out=gh[:, Fe:]).mul_(ga)  # d up = silu(gate) * ga
        torch.ops.aten.silu_backward.grad_input(ga_up, gate, grad_input=gh[:, :Fe])  # d gate = silu'(gate) ga up
        del ga, ga_up
        if ctx.needs_input_grad[3]:
            g_gate_up = grouped_mm_weight_grad(gh, x_s, offsets)  # [E, 2F, H]
        if ctx.needs_input_grad[0]:
            g_x = _combine(grouped_mm(gh, gate_up_proj.transpose(1, 2), offsets), inverse.view(T, k))  # [T, H]
        return g_x, g_weights, None, g_gate_up, g_down


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when torch cannot say."""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if get is None else bool(get())


def _combine(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, H], index/weights [T, k] -> [T, H] = sum_j weights[:, j] * rows[index[:, j]] (weights 1 if None)."""
    y = rows.index_select(0, index[:, 0])
    if weights is not None:
        y.mul_(weights[:, :1])
    for j in range(1, index.shape[1]):
        if weights is None:
            y.add_(rows.index_select(0, index[:, j]))
        else:
            y.addcmul_(rows.index_select(0, index[:, j]), weights[:, j:j + 1])
    return y
