"""Expert parallelism: the experts of every MoE layer split over the N ranks of an expert-parallel group (E/N
each, rank r owning experts r*E/N .. (r+1)*E/N - 1), each token copy sent to the rank that owns its expert and
back with `all_to_all_single` (uneven splits, differentiable), as Megatron-Core and torchtitan dispatch.

T tokens, k experts per token, H hidden, E experts, N ranks, El = E/N local experts, M copies a rank receives.
The router runs on every rank; the routing weights are applied where the token lives, after the copies return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit import kernels


@dataclass(frozen=True)
class ExpertGroup:
    """The ranks that split one MoE layer's experts between them."""

    group: dist.ProcessGroup
    size: int  # N
    rank: int  # this rank's place in the group
    num_experts: int  # E, all ranks together

    @property
    def local(self) -> int:
        return self.num_experts // self.size

    @property
    def first(self) -> int:
        """The global index of this rank's first expert."""
        return self.rank * self.local


def dispatch_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor, ep: ExpertGroup) -> torch.Tensor:
    """x [T, H], weights [T, k], expert_ids [T, k] (global ids), this rank's experts gate_up_proj [El, 2F, H] and
    down_proj [El, H, F] -> y [T, H] = sum_j weights[:, j] * expert_{ids[:, j]}(x), whichever rank owns the expert.

    1. copies sorted by expert (hence by owner rank); the per-expert counts exchanged (one all_to_all);
    2. the copies sent to their owners, run through the grouped experts there, and sent back (two all_to_all);
    3. the copies put back in token order and combined with the routing weights."""
    T, k = expert_ids.shape
    N, El = ep.size, ep.local
    flat = expert_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k] copies grouped by expert
    counts = torch.bincount(flat, minlength=ep.num_experts)  # [E] copies this rank sends to each expert
    received = torch.empty_like(counts)  # [N*El]: from rank s, its copies for each of my experts
    dist.all_to_all_single(received, counts, group=ep.group)
    send = counts.view(N, El).sum(1).tolist()  # copies to each rank (a host sync, as every EP dispatcher has)
    recv = received.view(N, El).sum(1).tolist()
    x_recv = _exchange(x[order // k], recv, send, ep.group)  # [M, H], by source rank, by expert within each
    local_ids = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(N), received)  # [M]
    ones = torch.ones(x_recv.shape[0], 1, dtype=x.dtype, device=x.device)
    y_recv = kernels.swiglu_experts(x_recv, ones, local_ids[:, None], gate_up_proj, down_proj)  # [M, H]
    y_sorted = _exchange(y_recv, send, recv, ep.group)  # [T*k, H] in `order`
    y_copies = y_sorted[torch.argsort(order)].view(T, k, x.shape[1])  # [T, k, H] in token order
    return (y_copies * weights[..., None].to(y_copies.dtype)).sum(1)


def _exchange(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """t [sum(in_splits), H] -> [sum(out_splits), H]: rows in_splits[r] go to rank r, out_splits[r] come from it."""
    return _AllToAll.apply(t.contiguous(), out_splits, in_splits, group)


class _AllToAll(torch.autograd.Function):
    """torch.distributed.all_to_all_single with its gradient: the same exchange, splits swapped."""

    @staticmethod
    def forward(ctx, t, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = t.new_empty(sum(out_splits), *t.shape[1:])
        dist.all_to_all_single(out, t, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None
