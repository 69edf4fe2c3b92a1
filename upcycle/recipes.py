"""Upcycling recipes, on tensors: how one expert's weights are made from the dense FFN's.

Dense SwiGLU FFN (H hidden, F intermediate neurons):  f(x) = W_down (silu(W_gate x) * (W_up x)),
W_gate, W_up [F, H], W_down [H, F]. f is a sum over neurons, so cutting the neurons into shards
S_1..S_G gives f = sum_g f_g with f_g(x) = W_down[:, S_g] (silu(W_gate[S_g] x) * (W_up[S_g] x)).

An MoE layer computes y = shared(x) + sum_{j in topK(x)} w_j(x) f_j(x), with softmax routing weights
renormalised over the top K (sum_j w_j = 1). Every recipe below builds f_j from one shard of f:

- copy (sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055): f_j = f. Then y = (sum_j w_j) f = f for
  any router: the MoE computes the dense function exactly.
- noise: f_j's weights W + eps, eps ~ N(0, (alpha * std(W))^2) per matrix (alpha = noise scale). Breaks the
  symmetry between experts; not function-preserving (alpha = 0 is copy).
- drop (Drop-Upcycling, Nakamura et al., ICLR 2025, arXiv:2502.19261): per expert, a random set D of
  round(r * F) neurons is re-initialised consistently in W_gate[D], W_up[D] and W_down[:, D], each from
  N(mean(W), std(W)^2) of the matrix it replaces; the other neurons are copied. Not function-preserving (r = 0 is copy).
- granular (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts", arXiv:2410.07524):
  R shards, each copied E times: E*R experts of width F/R, top-(k*R). Virtual-group router: the R experts of
  group e share router row e, so their logits tie and top-(k*R) picks whole groups; each shard's weights then
  sum to 1/R and y = f / R. Weight scaling restores f: `down` multiplies W_down by R (exact, since f_j is linear
  in W_down); `cube-root` multiplies W_gate, W_up and W_down by R^(1/3) (Megatron-LM's rule for GLU experts
  with renormalised top-k; exact only for a degree-1 homogeneous activation, approximate for SiLU).
- shared expert (Qwen-MoE / DeepSeek-MoE style): shards 0..s-1 form the shared expert, the rest the routed experts,
  so shared + routed partition the neurons and y = f. Qwen2-MoE always gates the shared expert with
  sigmoid(x . w): moekit writes w = 0 (sigmoid(0) = 1/2 exactly) and W_down * 2 (exact in any float format).
"""

from __future__ import annotations

import numpy as np
import torch

ROLES = ("gate", "up", "down")  # W_gate [F, H], W_up [F, H], W_down [H, F]
CHUNK = 1 << 24  # elements per temporary (64 MiB in fp32): keeps recipe temporaries bounded
SHARED_GATE_COMPENSATION = 2.0  # 1 / sigmoid(0)


def generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from integers (seed, layer, expert, role...): reproducible, independent streams."""
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state & (2**63 - 1))


def neuron_dim(role: str) -> int:
    """The dimension of a weight that indexes the FFN's intermediate neurons: rows of gate/up, columns of down."""
    return 1 if role == "down" else 0


def shard(w: torch.Tensor, role: str, index: int, num_shards: int) -> torch.Tensor:
    """Shard `index` of G along the neurons: gate/up [F, H] -> [F/G, H] rows, down [H, F] -> [H, F/G] columns."""
    Fs = w.shape[neuron_dim(role)] // num_shards
    return w.narrow(neuron_dim(role), index * Fs, Fs)


def router_weight(num_experts: int, routed_shards: int, hidden: int, init: str, std: float,
                  gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Router [E*R, H]: E rows drawn N(0, std^2) (or zeros), each repeated R times (virtual groups e*R .. e*R+R-1)."""
    base = torch.zeros(num_experts, hidden) if init == "zeros" else torch.randn(num_experts, hidden, generator=gen) * std
    return base.repeat_interleave(routed_shards, dim=0).to(dtype)  # [E*R, H]


def scaled(w: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """w * factor in `dtype` (factor 1: w itself, no copy when the dtype already matches)."""
    w = w.to(dtype)
    return w if factor == 1 else w * factor


def granular_scales(routed_shards: int, rule: str) -> dict[str, float]:
    """Per-role weight factors that undo the 1/R each shard receives from renormalised top-(k*R) routing."""
    R = routed_shards
    if rule == "down":
        return {"gate": 1.0, "up": 1.0, "down": float(R)}
    if rule == "cube-root":
        return dict.fromkeys(ROLES, R ** (1 / 3))
    return dict.fromkeys(ROLES, 1.0)


def tensor_stats(w: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of all elements, accumulated in fp64 chunk by chunk (no full-size fp32 copy)."""
    flat, n, s, s2 = w.reshape(-1), w.numel(), 0.0, 0.0
    for a in range(0, n, CHUNK):
        c = flat[a:a + CHUNK].double()
        s, s2 = s + c.sum().item(), s2 + c.square().sum().item()
    mean = s / max(n, 1)
    return mean, max(s2 / max(n, 1) - mean * mean, 0.0) ** 0.5


def noise_expert(w: torch.Tensor, scale: float, gen: torch.Generator, dtype: torch.dtype,
                 std: float | None = None) -> torch.Tensor:
    """w + N(0, (scale * std(w))^2), computed in fp32 row chunks, returned in `dtype` [same shape as w]."""
    sigma = scale * (tensor_stats(w)[1] if std is None else std)
    out = torch.empty(w.shape, dtype=dtype)
    rows = max(1, CHUNK // max(w.shape[1], 1))
    for a in range(0, w.shape[0], rows):
        c = w[a:a + rows].float()
        out[a:a + rows] = c + torch.randn(c.shape, generator=gen) * sigma
    return out


def drop_indices(num_neurons: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """The round(ratio * F) neurons one expert re-initialises, uniform without replacement, sorted [n] int64."""
    n = round(ratio * num_neurons)
    return torch.randperm(num_neurons, generator=gen)[:n].sort().values


def drop_expert(w: torch.Tensor, role: str, index: torch.Tensor, mean: float, std: float,
                gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A copy of w with neurons `index` (rows of gate/up, columns of down) redrawn from N(mean, std^2)."""
    out = w.to(dtype, copy=True)
    dim, other = neuron_dim(role), w.shape[1 - neuron_dim(role)]
    step = max(1, CHUNK // max(other, 1))
    for a in range(0, index.numel(), step):
        idx = index[a:a + step]
        fresh = torch.randn((idx.numel(), other), generator=gen) * std + mean  # [n, other]
        if dim == 0:
            out[idx] = fresh.to(dtype)
        else:
            out[:, idx] = fresh.t().to(dtype)
    return out


def shared_gate_weight(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Qwen2-MoE's shared_expert_gate [1, H], all zeros: sigmoid(0) = 1/2 for every token."""
    return torch.zeros(1, hidden, dtype=dtype)
