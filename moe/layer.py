"""The MoE feed-forward layer that replaces llama's MLP: router -> experts -> optional shared expert.

B batch, S sequence, T = B*S tokens, H hidden, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.llama.model import MLP

from .config import MoEConfig
from .experts import SwiGLUExperts
from .router import Router


@dataclass
class MoEAux:
    """What an MoE layer returns beside y, for the losses and the routing statistics (all tensors, no syncs)."""

    logits: torch.Tensor  # [T, E] fp32 router logits
    scores: torch.Tensor  # [T, E] fp32 router scores (softmax or sigmoid)
    expert_ids: torch.Tensor  # [T, k] chosen experts
    tokens_per_expert: torch.Tensor  # [E] token copies routed to each expert (before capacity dropping)
    dropped: torch.Tensor  # [] token copies dropped by the capacity limit


def capacity_keep(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """expert_ids [T, k] -> keep [T, k] bool: each expert keeps its first `capacity` copies, first choices
    of every token before second choices (GShard), tokens in order within a choice."""
    T, k = expert_ids.shape
    onehot = F.one_hot(expert_ids.t().reshape(-1), num_experts)  # [k*T, E], choice-major
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # [k*T] place in its expert's queue
    return (position < capacity).view(k, T).t()


class MoEFeedForward(nn.Module):
    """`gate` (Router), `experts` (SwiGLUExperts), optional `shared_expert` (MLP) and `shared_expert_gate`.

    forward: x [B, S, H] -> (y [B, S, H], MoEAux). With a capacity factor, copies over an expert's capacity
    contribute zero (they are still counted in `tokens_per_expert`, and in `dropped`)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = SwiGLUExperts(config)
        if config.has_shared_expert:
            self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, oracle: bool = False) -> tuple[torch.Tensor, MoEAux]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        r = self.gate(x)
        weights, dropped = r.weights, torch.zeros((), dtype=torch.long, device=x.device)
        capacity = self.config.capacity(x.shape[0])
        if capacity is not None:
            keep = capacity_keep(r.expert_ids, self.config.num_local_experts, capacity)  # [T, k]
            weights = weights * keep
            dropped = (~keep).sum()
        experts = self.experts.forward_loop if oracle else self.experts
        y = experts(x, weights, r.expert_ids)  # [T, H]
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)  # [T, H]
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.view(shape), MoEAux(r.logits, r.scores, r.expert_ids, r.tokens_per_expert, dropped)
