"""Mixture-of-Experts on the llama core: config, router, experts, MoE layer, losses, causal LM, HF formats."""

from .config import MOE_PRESETS, MoEConfig
from .experts import SwiGLUExperts, swiglu_experts_loop
from .layer import MoEAux, MoEFeedForward, capacity_keep
from .losses import RouterStats, load_balancing_loss, router_z_loss, routing_stats, update_router_bias
from .model import MoECausalLMOutput, MoEForCausalLM
from .router import Router, Routing

__all__ = ["MOE_PRESETS", "MoEAux", "MoECausalLMOutput", "MoEConfig", "MoEFeedForward", "MoEForCausalLM", "Router",
           "RouterStats", "Routing", "SwiGLUExperts", "capacity_keep", "load_balancing_loss", "router_z_loss",
           "routing_stats", "swiglu_experts_loop", "update_router_bias"]
