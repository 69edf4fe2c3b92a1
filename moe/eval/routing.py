"""Where tokens go (`moekit eval --routing`): per MoE layer and expert, the share of each labelled data spec's token
copies routed there, and per layer how much the choice of expert says about the data label.

Counts are taken at the positions `moe.eval.score` scores (each token of a document once), k copies per token.
Per layer, with c[label, e] the copies of `label` routed to expert e and p = c / sum(c) (copies of every label):

- fractions[label][l][e] = c[label, e] / sum_e c[label, e]: where label's copies go (each row sums to 1);
- mutual information I(label; expert) = sum p(label, e) log2(p(label, e) / (p(label) p(e))), in bits: 0 when
  every label is routed alike, at most H(label) (the label entropy: 1 bit for two equally frequent labels) when
  each expert serves one label only.
"""

from __future__ import annotations

import math

import torch


class RoutingCounts:
    """c[label] [L_moe, E] int64: token copies per MoE layer and expert, accumulated by `add`."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, label: str, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids [N, k] of MoE layer number `layer` (the layer-th MoE layer) for tokens of `label`."""
        c = self.counts.setdefault(label, torch.zeros(self.shape, dtype=torch.long))
        c[layer] += torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self.shape[1])

    def fractions(self) -> dict[str, list[list[float]]]:
        return {label: (c / c.sum(1, keepdim=True).clamp_min(1)).tolist() for label, c in self.counts.items()}

    def mutual_information(self) -> tuple[list[float], float]:
        """([I(label; expert) in bits per MoE layer], H(label) in bits: the most I can be)."""
        joint = torch.stack([c.double() for c in self.counts.values()], 1)  # [L, labels, E]
        p = joint / joint.sum((1, 2), keepdim=True).clamp_min(1)
        p_label, p_expert = p.sum(2, keepdim=True), p.sum(1, keepdim=True)  # [L, labels, 1], [L, 1, E]
        ratio = torch.where(p > 0, p / (p_label * p_expert).clamp_min(1e-300), torch.ones_like(p))
        mi = (p * ratio.log2()).sum((1, 2))  # [L]
        share = p_label[0, :, 0]  # every layer sees the same tokens
        h_label = -sum(float(s) * math.log2(float(s)) for s in share if s > 0)
        return [max(float(v), 0.0) for v in mi], h_label
