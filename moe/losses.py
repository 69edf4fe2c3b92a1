"""Router losses, routing statistics, and the auxiliary-loss-free bias update.

T tokens (B*S, in batch-major order), E experts, k experts per token, L_moe MoE layers. Nothing here
moves a value to the host: every result is a tensor on the activations' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layer import MoEAux
from .router import Router


def _flat_mask(attention_mask: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """attention_mask [B, L] (1 = real token) -> [T] float over the B*S rows routed this step (last S columns)."""
    if attention_mask is None:
        return None
    B = attention_mask.shape[0]
    return attention_mask[:, attention_mask.shape[1] - T // B:].reshape(-1).to(device=device, dtype=torch.float32)


def router_probs(aux: MoEAux, score: str) -> torch.Tensor:
    """[T, E] routing probabilities for the balancing loss: softmax scores, or sigmoid scores normalised."""
    return aux.scores if score == "softmax" else aux.scores / aux.scores.sum(-1, keepdim=True)


def load_balancing_loss(probs: Sequence[torch.Tensor], expert_ids: Sequence[torch.Tensor],
                        attention_mask: torch.Tensor | None = None,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss over all MoE layers together, as transformers'
    `load_balancing_loss_func`: E * sum_e f_e * P_e, where f_e is the fraction of (unpadded) tokens that chose
    expert e (counting every one of the k choices) and P_e the mean routing probability of e, both averaged
    over the layers' rows. probs [T, E] and expert_ids [T, k] per layer; attention_mask [B, S] or None.
    `reduce` (e.g. a sum over data-parallel processes) turns the local token counts into global-batch counts
    before f_e is taken; P_e stays local, so each process's gradient is its share of the global loss."""
    E = probs[0].shape[-1]
    device = probs[0].device
    counts = torch.zeros(E, device=device)  # [E]
    prob_sum = torch.zeros(E, device=device)  # [E]
    rows = torch.zeros((), device=device)
    for p, ids in zip(probs, expert_ids):
        mask = _flat_mask(attention_mask, p.shape[0], device)  # [T] or None
        k = ids.shape[-1]
        ones = torch.ones(ids.numel(), device=device) if mask is None else mask.repeat_interleave(k)
        counts = counts + torch.zeros(E, device=device).scatter_add_(0, ids.reshape(-1), ones)
        prob_sum = prob_sum + (p.float() if mask is None else p.float() * mask[:, None]).sum(0)
        rows = rows + (p.shape[0] if mask is None else mask.sum())
    fraction = counts / rows
    if reduce is not None:
        fraction = reduce(torch.cat([counts, rows.reshape(1)]))
        fraction = fraction[:E] / fraction[E]
    return E * torch.sum(fraction * (prob_sum / rows))


def router_z_losses(logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss of each layer: [L_moe] means over (unpadded) tokens of logsumexp(router logits)^2."""
    total = []
    for lg in logits:
        z = torch.logsumexp(lg.float(), dim=-1).square()  # [T]
        mask = _flat_mask(attention_mask, lg.shape[0], lg.device)
        total.append(z.mean() if mask is None else (z * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(total)


def router_z_loss(logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: the mean over layers of `router_z_losses`."""
    return router_z_losses(logits, attention_mask).mean()


@dataclass
class RouterStats:
    """Per-MoE-layer routing statistics of one forward; row i describes decoder layer `layers[i]`."""

    layers: list[int]
    tokens_per_expert: torch.Tensor  # [L_moe, E] int64 token copies routed to each expert
    dropped: torch.Tensor  # [L_moe] int64 copies dropped by the capacity limit
    max_load: torch.Tensor  # [L_moe] max / mean of tokens_per_expert (1 = perfectly balanced)
    entropy: torch.Tensor  # [L_moe] mean entropy (nats) of the routing distribution per token
    aux_loss: torch.Tensor  # [L_moe] the load-balancing loss of each layer alone (unscaled)
    z_loss: torch.Tensor  # [L_moe] the router z-loss of each layer alone (unscaled)


def routing_stats(aux: Sequence[MoEAux | None], score: str = "softmax", attention_mask: torch.Tensor | None = None,
                  z_losses: torch.Tensor | None = None) -> RouterStats | None:
    """RouterStats from the per-layer aux list (None entries are dense layers); None without MoE layers.
    z_losses: the per-layer z-losses when the caller has them already ([L_moe]), else computed here."""
    layers = [i for i, a in enumerate(aux) if a is not None]
    if not layers:
        return None
    with torch.no_grad():
        counts = torch.stack([aux[i].tokens_per_expert for i in layers])  # [L_moe, E]
        c = counts.float()
        max_load = c.max(-1).values / c.mean(-1).clamp(min=1e-9)
        ents, balance = [], []
        for i in layers:
            p = router_probs(aux[i], score)
            ents.append(-(p * torch.log(p.clamp(min=1e-20))).sum(-1).mean())
            balance.append(load_balancing_loss([p], [aux[i].expert_ids], attention_mask))
        if z_losses is None:
            z_losses = router_z_losses([aux[i].logits for i in layers], attention_mask)
        return RouterStats(layers, counts, torch.stack([aux[i].dropped for i in layers]), max_load,
                           torch.stack(ents), torch.stack(balance), z_losses.detach())


@torch.no_grad()
def update_router_bias(model: nn.Module, counts_per_layer, rate: float | None = None) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3), once per optimizer step: for every MoE layer,
    bias_e += rate * sign(mean load - load_e), so overloaded experts are chosen less next step.

    counts_per_layer: [L_moe, E] (rows in the order of the model's MoE layers, as RouterStats.tokens_per_expert,
    summed over the step's micro-batches), or a dict {layer index: [E]}. rate: default
    config.router_bias_update_rate; 0 does nothing."""
    rate = model.config.router_bias_update_rate if rate is None else rate
    if not rate:
        return
    routers = [m for m in model.modules() if isinstance(m, Router)]  # in layer order
    if isinstance(counts_per_layer, dict):
        layers = model.config.moe_layers
        counts_per_layer = [counts_per_layer[i] for i in layers]
    if len(counts_per_layer) != len(routers):
        raise ValueError(f"got counts for {len(counts_per_layer)} layers; the model has {len(routers)} MoE layers")
    for router, counts in zip(routers, counts_per_layer):
        load = counts.to(router.e_score_correction_bias.device).float()  # [E]
        router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
