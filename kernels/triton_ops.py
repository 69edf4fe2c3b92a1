"""The Triton kernels as `torch.library` custom ops with autograd, so torch.compile keeps them whole (no graph
break) and the backward is traced from ops with fake implementations.

Public functions mirror kernels.reference: routing_metadata, permute, grouped_mm, unpermute, swiglu_experts
(training path: fused gate_up GEMM with SwiGLU epilogue, down GEMM, gather-combine; the backward recomputes the
activation) and swiglu_experts_decode (small-token inference path). Import this module only where the kernels are
meant to run: on CUDA, or on CPU under TRITON_INTERPRET=1 set before the import.
"""

import torch
from torch import Tensor

from . import triton_decode, triton_gemm, triton_routing
from .triton_routing import INTERPRET

__all__ = ["INTERPRET", "grouped_mm", "permute", "routing_metadata", "swiglu_experts", "swiglu_experts_decode",
           "unpermute"]

_I32, _I64 = torch.int32, torch.int64


# ---- routing (no autograd) -------------------------------------------------------------------------------------

@torch.library.custom_op("moekit::route", mutates_args=())
def _route(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return triton_routing.route(expert_ids, num_experts)


@_route.register_fake
def _(expert_ids, num_experts):
    M, E = expert_ids.numel(), num_experts
    new = expert_ids.new_empty
    return new(M, dtype=_I64), new(M, dtype=_I32), new(M, dtype=_I32), new(E, dtype=_I64), new(E, dtype=_I32)


def routing_metadata(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """expert_ids [T, k] -> order [M], counts [E], offsets [E] int32, as reference.routing_metadata."""
    order, _, _, counts, offsets = _route(expert_ids, num_experts)
    return order, counts, offsets


# ---- row gather / combine ----------------------------------------------------------------------------------------

@torch.library.custom_op("moekit::combine", mutates_args=())
def _combine(y_sorted: Tensor, inv: Tensor, weights: Tensor | None, top_k: int) -> Tensor:
    return triton_routing.combine(y_sorted, inv, weights, top_k)


@_combine.register_fake
def _(y_sorted, inv, weights, top_k):
    return y_sorted.new_empty(y_sorted.shape[0] // top_k, y_sorted.shape[1])


@torch.library.custom_op("moekit::permute", mutates_args=())
def _permute(x: Tensor, order: Tensor, top_k: int) -> Tensor:
    return triton_routing.gather_rows(x, order // top_k)


@_permute.register_fake
def _(x, order, top_k):
    return x.new_empty(order.numel(), x.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.top_k = inputs[2]


def _permute_bwd(ctx, grad):
    (order,) = ctx.saved_tensors
    return _combine(grad, triton_routing.inverse(order), None, ctx.top_k), None, None


_permute.register_autograd(_permute_bwd, setup_context=_permute_setup)


def permute(x: Tensor, order: Tensor, top_k: int) -> Tensor:
    """x [T, H] -> x_sorted [M, H], as reference.permute; backward sums each token's k copies (no atomics)."""
    return _permute(x, order, top_k)


@torch.library.custom_op("moekit::combine_backward", mutates_args=())
def _combine_backward(dy: Tensor, y_sorted: Tensor, order: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    return triton_routing.combine_backward(dy, y_sorted, order, weights)


@_combine_backward.register_fake
def _(dy, y_sorted, order, weights):
    return y_sorted.new_empty(y_sorted.shape), weights.new_empty(weights.shape)


@torch.library.custom_op("moekit::unpermute", mutates_args=())
def _unpermute(y_sorted: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    return triton_routing.combine(y_sorted, triton_routing.inverse(order), weights, weights.shape[1])


@_unpermute.register_fake
def _(y_sorted, order, weights):
    return y_sorted.new_empty(weights.shape[0], y_sorted.shape[1])


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_bwd(ctx, grad):
    y_sorted, order, weights = ctx.saved_tensors
    dys, dw = _combine_backward(grad, y_sorted, order, weights)
    return dys, None, dw


_unpermute.register_autograd(_unpermute_bwd, setup_context=_unpermute_setup)


def unpermute(y_sorted: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """y_sorted [M, H], order [M], weights [T, k] -> [T, H], as reference.unpermute (gather, deterministic)."""
    return _unpermute(y_sorted, order, weights)


# ---- grouped GEMM -----------------------------------------------------------------------------------------------

@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm(x_sorted: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    return triton_gemm.grouped_mm(x_sorted, weight, offsets)


@_grouped_mm.register_fake
def _(x_sorted, weight, offsets):
    return x_sorted.new_empty(x_sorted.shape[0], weight.shape[1])


@torch.library.custom_op("moekit::grouped_wgrad", mutates_args=())
def _grouped_wgrad(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    return triton_gemm.grouped_wgrad(dy, x, offsets)


@_grouped_wgrad.register_fake
def _(dy, x, offsets):
    return dy.new_empty(offsets.numel(), dy.shape[1], x.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_bwd(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    dx = _grouped_mm(grad, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    dw = _grouped_wgrad(grad, x, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm.register_autograd(_grouped_mm_bwd, setup_context=_grouped_mm_setup)


def grouped_mm(x_sorted: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """x_sorted [M, in], weight [E, out, in], offsets [E] int32 -> [M, out], as reference.grouped_mm."""
    return _grouped_mm(x_sorted, weight, offsets.to(_I32))


# ---- the routed SwiGLU layer ------------------------------------------------------------------------------------

@torch.library.custom_op("moekit::swiglu_experts", mutates_args=())
def _swiglu_experts(x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    E, k = gate_up_proj.shape[0], expert_ids.shape[1]
    _, inv, tok, _, offsets = triton_routing.route(expert_ids, E)
    h = triton_gemm.grouped_mm(x, gate_up_proj, offsets, rows=tok, swiglu=True)  # [M, F]
    y_sorted = triton_gemm.grouped_mm(h, down_proj, offsets)  # [M, H]
    return triton_routing.combine(y_sorted, inv, weights, k)


@_swiglu_experts.register_fake
def _(x, weights, expert_ids, gate_up_proj, down_proj):
    return x.new_empty(x.shape)


@torch.library.custom_op("moekit::swiglu_experts_backward", mutates_args=())
def _swiglu_experts_backward(dy: Tensor, x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor,
                             down_proj: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    E, k = gate_up_proj.shape[0], expert_ids.shape[1]
    order, inv, tok, _, offsets = triton_routing.route(expert_ids, E)
    w_sorted = weights.reshape(-1).index_select(0, order).float()  # [M] combine weight of each sorted row
    dh = triton_gemm.grouped_mm(dy, down_proj.transpose(1, 2), offsets, rows=tok)  # [M, F] = dy[tok] @ down[e]
    dgu, hw, dw_sorted = triton_gemm.swiglu_backward(x, tok, gate_up_proj, offsets, dh, w_sorted)
    d_down = triton_gemm.grouped_wgrad(dy, hw, offsets, rows_a=tok, out_dtype=down_proj.dtype)  # [E, H, F]
    d_gate_up = triton_gemm.grouped_wgrad(dgu, x, offsets, rows_b=tok, out_dtype=gate_up_proj.dtype)  # [E, 2F, H]
    dx = triton_routing.combine(triton_gemm.grouped_mm(dgu, gate_up_proj.transpose(1, 2), offsets), inv, None, k)
    d_weights = dw_sorted.index_select(0, inv).view(weights.shape).to(weights.dtype)  # [T, k]
    return dx, d_weights, d_gate_up, d_down


@_swiglu_experts_backward.register_fake
def _(dy, x, weights, expert_ids, gate_up_proj, down_proj):
    return x.new_empty(x.shape), weights.new_empty(weights.shape), gate_up_proj.new_empty(gate_up_proj.shape), \
        down_proj.new_empty(down_proj.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_bwd(ctx, grad):
    x, weights, expert_ids, gate_up_proj, down_proj = ctx.saved_tensors
    dx, dw, dgu, dd = _swiglu_experts_backward(grad, x, weights, expert_ids, gate_up_proj, down_proj)
    return dx, dw, None, dgu, dd


_swiglu_experts.register_autograd(_swiglu_bwd, setup_context=_swiglu_setup)


def swiglu_experts(x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """x [T, H], weights/expert_ids [T, k], gate_up_proj [E, 2F, H], down_proj [E, H, F] -> y [T, H], as
    reference.swiglu_experts; differentiable in x, weights, gate_up_proj and down_proj."""
    return _swiglu_experts(x, weights, expert_ids, gate_up_proj, down_proj)


@torch.library.custom_op("moekit::swiglu_experts_decode", mutates_args=())
def _swiglu_experts_decode(x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor,
                           down_proj: Tensor) -> Tensor:
    return triton_decode.swiglu_experts(x, weights, expert_ids, gate_up_proj, down_proj)


@_swiglu_experts_decode.register_fake
def _(x, weights, expert_ids, gate_up_proj, down_proj):
    return x.new_empty(x.shape)


def swiglu_experts_decode(x: Tensor, weights: Tensor, expert_ids: Tensor, gate_up_proj: Tensor,
                          down_proj: Tensor) -> Tensor:
    """The small-token path (one matrix-vector product per copy, no sort); same contract, inference only."""
    return _swiglu_experts_decode(x, weights, expert_ids, gate_up_proj, down_proj)
