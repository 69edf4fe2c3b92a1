"""The routed layer's ops in pure PyTorch: the CPU path and the oracle every fast path is tested against.

T tokens, k copies per token, E experts, H hidden, F expert width, M = T*k token copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    if not (_aligned(x_sorted) and _aligned(w_t)):  # torch's grouped_mm needs 16-byte aligned strides
        return grouped_mm_loop(x_sorted, weight, offsets)
    return F.grouped_mm(x_sorted, w_t, offs=offsets)


def _aligned(t: torch.Tensor) -> bool:
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


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """The whole routed SwiGLU: x [T, H], weights/expert_ids [T, k], gate_up_proj [E, 2F, H] (gate rows, then up),
    down_proj [E, H, F] -> y [T, H] = sum_j weights[:, j] * down(silu(gate(x)) * up(x)) of expert expert_ids[:, j]."""
    E, k = gate_up_proj.shape[0], expert_ids.shape[1]
    order, _, offsets = routing_metadata(expert_ids, E)
    h = grouped_mm(permute(x, order, k), gate_up_proj, offsets)  # [M, 2F]
    gate, up = h.chunk(2, dim=-1)
    return unpermute(grouped_mm(swiglu(gate, up), down_proj, offsets), order, weights)
