"""The Mixture-of-Experts model on the llama core, and nothing else: config (`config`), router, stacked SwiGLU
experts (computed through `kernels`, or split over processes by `expert_parallel`), the MoE feed-forward layer,
the router losses, the causal LM, and the Hugging Face MoE checkpoint formats (`formats`). It imports only `llama`
and `kernels`.

Beside the model, rooms for the jobs built on it: `moekit.moe.accounting` (total vs active parameters, FLOPs, memory,
cost), `moekit.moe.train` (the accelerate trainer and its data) and `moekit.moe.bench` (benchmarks). Exports load on first use.
"""

from moekit.llama._lazy import lazy_exports

_EXPORTS = {
    "MOE_PRESETS": "config", "MoEConfig": "config",
    "SwiGLUExperts": "experts", "swiglu_experts_loop": "experts",
    "MoEAux": "layer", "MoEFeedForward": "layer", "capacity_keep": "layer",
    "RouterStats": "losses", "load_balancing_loss": "losses", "router_z_loss": "losses", "routing_stats": "losses",
    "update_router_bias": "losses",
    "MoECausalLMOutput": "model", "MoEForCausalLM": "model",
    "Router": "router", "Routing": "router",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
