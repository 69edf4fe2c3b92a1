"""Optional adapter: megablocks' dropless MoE experts (grouped GLU) run on moekit's stacked weights, so
`swiglu_experts(..., backend="megablocks")` and the benchmark can compare against it.

megablocks is imported only when this backend is used; without it the call raises a one-line ImportError.
Its layout: w1 (gate) and v1 (up) [E*F, H], w2 [E*F, H] (down transposed); its grouped GEMM reads the token counts
on the host (one sync per call), which is megablocks' design, not ours.
"""

import functools

import torch


def _import():
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP
    except ImportError as err:
        raise ImportError("backend='megablocks' needs the megablocks package (pip install 'moekit[megablocks]' or "
                          f"pip install megablocks; CUDA only): {err}") from err
    return Arguments, ParallelDroplessMLP


@functools.cache
def _experts(hidden: int, ffn: int, num_experts: int, top_k: int, dtype: torch.dtype):
    """A ParallelDroplessMLP with its own weights removed (ours are attached per call); built on the meta device."""
    Arguments, ParallelDroplessMLP = _import()
    args = Arguments(hidden_size=hidden, ffn_hidden_size=ffn, moe_num_experts=num_experts, moe_top_k=top_k,
                     mlp_type="glu", mlp_impl="grouped", activation_fn=torch.nn.functional.silu, bias=False,
                     return_bias=False, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     device=torch.device("meta"))
    experts = ParallelDroplessMLP(args)
    for name in ("w1", "v1", "w2"):
        delattr(experts.mlp, name)
    return experts


def prepare(gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
    """gate_up_proj [E, 2F, H], down_proj [E, H, F] -> megablocks' (w1, v1, w2), each [E*F, H] (differentiable)."""
    E, F2, H = gate_up_proj.shape
    F = F2 // 2
    return (gate_up_proj[:, :F].reshape(E * F, H), gate_up_proj[:, F:].reshape(E * F, H),
            down_proj.transpose(1, 2).reshape(E * F, H))


def run(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, w1: torch.Tensor,
        v1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [T, H], weights/expert_ids [T, k], (w1, v1, w2) from prepare -> y [T, H]."""
    H, k = x.shape[1], expert_ids.shape[1]
    experts = _experts(H, w1.shape[0] // num_experts, num_experts, k, x.dtype)
    experts.mlp.w1, experts.mlp.v1, experts.mlp.w2 = w1, v1, w2
    try:
        y, _ = experts.forward_once(x, weights.to(x.dtype), expert_ids)
    finally:
        experts.mlp.w1 = experts.mlp.v1 = experts.mlp.w2 = None  # hold no reference to the caller's weights
    return y.view(x.shape)


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.swiglu_experts, computed by megablocks (weights re-laid out on every call)."""
    _import()
    return run(x, weights, expert_ids, gate_up_proj.shape[0], *prepare(gate_up_proj, down_proj))
