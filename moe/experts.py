"""Routed SwiGLU experts with stacked weights, and the per-expert loop kept beside them as the readable oracle.

T tokens, H hidden, F expert width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels

from .config import MoEConfig
from .expert_parallel import ExpertGroup, dispatch_experts


class SwiGLUExperts(nn.Module):
    """E SwiGLU MLPs as stacked tensors (transformers 5 names and layout):

    gate_up_proj [E, 2F, H]: rows 0..F-1 are expert e's gate_proj, rows F..2F-1 its up_proj;
    down_proj [E, H, F]. Expert e computes down_proj[e] @ (silu(gate @ x) * (up @ x)).
    Under expert parallelism (`keep_local`) the module holds only its rank's El = E/N experts and `ep` says which.
    """

    ep: ExpertGroup | None = None

    def __init__(self, config: MoEConfig):
        super().__init__()
        E, H, Fe = config.num_local_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate_size = E, Fe
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fe, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Fe))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, k], expert_ids [T, k] -> y [T, H] = sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        if self.ep is not None:
            return dispatch_experts(x, weights, expert_ids, self.gate_up_proj, self.down_proj, self.ep)
        return kernels.swiglu_experts(x, weights, expert_ids, self.gate_up_proj, self.down_proj)

    def keep_local(self, ep: ExpertGroup) -> None:
        """Keep this rank's experts ep.first .. ep.first + El - 1 only; tokens reach the others through `ep`."""
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[ep.first:ep.first + ep.local].clone(),
                                             full.requires_grad))
        self.ep = ep

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The same, one expert at a time: the oracle the grouped path is tested against."""
        return swiglu_experts_loop(x, weights, expert_ids, self.gate_up_proj, self.down_proj)


def swiglu_experts_loop(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Per-expert loop: gather the tokens routed to e, run expert e, add their weighted outputs back."""
    y = torch.zeros_like(x)  # [T, H]
    Fe = down_proj.shape[-1]
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(expert_ids == e)  # [n], [n]
        if token.numel() == 0:
            continue
        gate, up = gate_up_proj[e, :Fe], gate_up_proj[e, Fe:]  # [F, H] each
        h = F.silu(x[token] @ gate.T) * (x[token] @ up.T)  # [n, F]
        out = h @ down_proj[e].T  # [n, H]
        y = y.index_add(0, token, out * weights[token, slot, None].to(out.dtype))
    return y
