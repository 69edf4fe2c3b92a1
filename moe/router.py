"""The router: which k experts each token goes to, and with what weight.

T tokens, H hidden, E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


@dataclass
class Routing:
    weights: torch.Tensor  # [T, k] combine weights, in the activation dtype
    expert_ids: torch.Tensor  # [T, k] int64
    tokens_per_expert: torch.Tensor  # [E] int64, token copies routed to each expert (before any dropping)
    logits: torch.Tensor  # [T, E] fp32, for the losses
    scores: torch.Tensor  # [T, E] fp32 softmax or sigmoid of the logits


class Router(nn.Module):
    """Linear gate `weight` [E, H] (HF's `mlp.gate.weight`), scores in fp32, top-k.

    softmax: weights = top-k of softmax(logits) (renormalised if norm_topk_prob), as Mixtral and Qwen2-MoE.
    sigmoid: weights = top-k of sigmoid(logits) (renormalised if norm_topk_prob), as DeepSeek-V3.
    `e_score_correction_bias` [E] is added to the scores for the choice of experts only, never to the combine
    weights: the auxiliary-loss-free balancing state (zero = off), updated by `moe.losses.update_router_bias`.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.score, self.norm_topk_prob = config.router_score, config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, H] -> Routing."""
        if self.training and self.jitter_noise > 0:  # Switch: multiplicative noise on the router's input
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()  # [T, E]
        bias = self.e_score_correction_bias
        expert_ids = torch.topk(scores + bias.float(), self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, expert_ids)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = expert_ids.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # [E]; unlike bincount, no host sync on GPU
        return Routing(weights.to(x.dtype), expert_ids, counts, logits, scores)
