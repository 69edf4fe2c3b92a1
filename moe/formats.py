"""Hugging Face MoE checkpoint formats: the one place that knows their on-disk names and config fields.

In memory (transformers 5 names):   model.layers.N.mlp.gate.weight [E, H], mlp.experts.gate_up_proj [E, 2F, H]
                                    (gate rows, then up rows), mlp.experts.down_proj [E, H, F], mlp.shared_expert.*
On disk, `mixtral`:                 model.layers.N.block_sparse_moe.gate.weight,
                                    block_sparse_moe.experts.J.{w1 (gate) [F, H], w3 (up) [F, H], w2 (down) [H, F]}
On disk, `qwen2_moe`:               model.layers.N.mlp.gate.weight, mlp.experts.J.{gate,up,down}_proj.weight,
                                    mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight
Reading also accepts the fused in-memory names (gate_up_proj / down_proj) under either prefix.

The small pure functions here (names, config.json) let a converter stream a checkpoint expert by expert
without building a model; `to_disk` / `from_disk` turn a whole in-memory state dict into either format and back.
"""

from __future__ import annotations

from llama.errors import ConfigError

from .config import MoEConfig

FORMATS = ("mixtral", "qwen2_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}
_EXPERT = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
           "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}
# moekit fields with no meaning to transformers: dropped from an HF config.json (training-only ones are kept).
_OURS_ONLY = ("num_shared_experts", "shared_expert_gate", "router_score", "capacity_factor", "first_k_dense_replace",
              "qkv_bias", "attention_bias", "mlp_bias", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "num_local_experts")
_FOREIGN = ("architectures", "torch_dtype", "dtype", "transformers_version", "layer_types", "max_window_layers",
            "use_sliding_window", "sliding_window", "num_experts", "output_router_logits")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format '{format}'; expected one of {FORMATS} or 'auto'")


def problems(config: MoEConfig, format: str) -> list[str]:
    """What in `config` the format cannot express (empty: it can)."""
    _check_format(format)
    out = []
    if config.router_score != "softmax":
        out.append(f"router_score '{config.router_score}' (it routes with softmax)")
    if config.capacity_factor is not None:
        out.append(f"capacity_factor {config.capacity_factor} (it is dropless)")
    if config.mlp_bias:
        out.append("mlp_bias (its MLPs have no biases)")
    if format == "mixtral":
        dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
        if dense:
            out.append(f"dense layers {dense} (every Mixtral layer is MoE)")
        if config.has_shared_expert:
            out.append("a shared expert")
        if not config.norm_topk_prob:
            out.append("norm_topk_prob false (Mixtral renormalises the top-k weights)")
        if config.attention_bias or config.attention_qkv_bias:
            out.append("attention biases")
    else:
        if config.has_shared_expert and not config.shared_expert_gate:
            out.append("a shared expert without shared_expert_gate (Qwen2-MoE always gates it)")
        if config.attention_bias:
            out.append("an o_proj bias (Qwen2-MoE has q/k/v biases only: use qkv_bias)")
    return out


def choose_format(config: MoEConfig, format: str = "auto") -> str:
    """The format to write `config` in: `auto` picks mixtral when it can express the config, else qwen2_moe.

    Raises ConfigError naming the format that can express the config when the requested one cannot."""
    if format == "auto":
        if not problems(config, "mixtral"):
            return "mixtral"
        if not problems(config, "qwen2_moe"):
            return "qwen2_moe"
        raise ConfigError(_neither(config))
    found = problems(config, format)
    if not found:
        return format
    other = next(f for f in FORMATS if f != format)
    if problems(config, other):
        raise ConfigError(_neither(config))
    raise ConfigError(f"format '{format}' cannot express this config ({'; '.join(found)}); use format '{other}'")


def _neither(config: MoEConfig) -> str:
    why = "; ".join(f"{f}: {', '.join(problems(config, f))}" for f in FORMATS)
    return f"neither HF format can express this config ({why})"


def hf_config_dict(config: MoEConfig, format: str) -> dict:
    """The config.json to write for `config` in `format`: model_type, architectures and that format's field names."""
    choose_format(config, format)
    d = config.to_dict()
    for k in _FOREIGN + _OURS_ONLY + ("model_type",):
        d.pop(k, None)
    d = {"architectures": [ARCHITECTURES[format]], "model_type": format, **d}
    d["num_experts_per_tok"] = config.num_experts_per_tok
    d["router_aux_loss_coef"] = config.router_aux_loss_coef
    if format == "mixtral":
        d["intermediate_size"] = config.moe_intermediate_size  # Mixtral's experts use intermediate_size
        d["num_local_experts"] = config.num_local_experts
        d["sliding_window"] = None
    else:
        d.pop("router_jitter_noise", None)
        d["num_experts"] = config.num_local_experts
        d["moe_intermediate_size"] = config.moe_intermediate_size
        d["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
        d["norm_topk_prob"] = config.norm_topk_prob
        d["decoder_sparse_step"] = config.decoder_sparse_step
        d["mlp_only_layers"] = sorted(set(config.mlp_only_layers) | set(range(config.first_k_dense_replace)))
        d["qkv_bias"] = config.attention_qkv_bias
        d["use_sliding_window"] = False
        if config.num_shared_experts > 1:  # how many experts the fused shared MLP counts for (accounting)
            d["num_shared_experts"] = config.num_shared_experts
    if config.head_dim == config.hidden_size // config.num_attention_heads:
        d.pop("head_dim", None)
    return d


# ---- tensor names on disk --------------------------------------------------------------------------

def router_name(format: str, layer: int) -> str:
    _check_format(format)
    return f"model.layers.{layer}.{_PREFIX[format]}.gate.weight"


def router_bias_name(format: str, layer: int) -> str:
    """The auxiliary-loss-free bias (DeepSeek-V3's name); neither HF format reads it (see `to_disk`)."""
    _check_format(format)
    return f"model.layers.{layer}.{_PREFIX[format]}.gate.e_score_correction_bias"


def expert_names(format: str, layer: int, expert: int) -> dict[str, str]:
    """{"gate": ..., "up": ..., "down": ...}: disk names of expert `expert`'s [F, H], [F, H], [H, F] weights."""
    _check_format(format)
    base = f"model.layers.{layer}.{_PREFIX[format]}.experts.{expert}"
    return {role: f"{base}.{name}.weight" for role, name in _EXPERT[format].items()}


def shared_expert_names(format: str, layer: int) -> dict[str, str]:
    """{"gate", "up", "down", "shared_gate"}: disk names of the shared expert (qwen2_moe only)."""
    _check_format(format)
    if format != "qwen2_moe":
        raise ConfigError(f"format '{format}' has no shared expert; use format 'qwen2_moe'")
    base = f"model.layers.{layer}.mlp"
    return {"gate": f"{base}.shared_expert.gate_proj.weight", "up": f"{base}.shared_expert.up_proj.weight",
            "down": f"{base}.shared_expert.down_proj.weight", "shared_gate": f"{base}.shared_expert_gate.weight"}


def dense_mlp_names(layer: int) -> dict[str, str]:
    """{"gate", "up", "down"}: a dense layer's MLP, llama names (both formats)."""
    return {role: f"model.layers.{layer}.mlp.{role}_proj.weight" for role in ("gate", "up", "down")}
