"""Exact parameter counts from a config, by formula: one function per Hugging Face ``model_type`` (the field
names and defaults of transformers 5's config classes, read from plain ``config.json`` dicts), plus moekit's
own MoE configs. Each returns a `ParamCount`: per component, total and active-per-token parameters.

Shape fields (vocabulary, width, layers, heads, FFN widths, expert count, top-k) are required: a default for
them would silently count a different model. Every other key takes transformers' default when absent.
"""

from __future__ import annotations

from typing import Any

from moekit.llama.errors import ConfigError, shown

from . import formulas_gqa, formulas_hybrid, formulas_mla, formulas_moe
from .blocks import COMPONENTS, Arch, Fields, ParamCount, Tally, core, finish, glu, gqa, linear, routed

__all__ = ["COMPONENTS", "FORMULAS", "FROZEN_ROUTING_BIAS", "SUPPORTED_MODEL_TYPES", "Arch", "Fields", "ParamCount",
           "Tally", "count_config"]


def dense_llama(c: Fields, t: Tally, mt: str):
    """llama and mistral: GQA attention, SwiGLU MLP, two RMSNorms per layer."""
    V, H, L, N, K, D = core(c)
    F = c.req("intermediate_size")
    ab = bool(c.opt("attention_bias", False)) if mt == "llama" else False
    mb = bool(c.opt("mlp_bias", False)) if mt == "llama" else False
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("dense_ffn", glu(H, F, mb), L)
    t.add("norm", 2 * H, L)
    window = c.opt("sliding_window", 4096) if mt == "mistral" else None
    return finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, window), 0


def mixtral(c: Fields, t: Tally, mt: str):
    """Every layer routed: E experts of width intermediate_size, top-k, a bias-free router."""
    V, H, L, N, K, D = core(c)
    F, E, k = c.req("intermediate_size"), c.req("num_local_experts", "num_experts"), c.req("num_experts_per_tok")
    t.add("attention", gqa(H, N, K, D, False, False), L)
    t.add("norm", 2 * H, L)
    for _ in range(L):
        routed(t, H, E, F)
    return finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, c.opt("sliding_window", None), E, k), k


def qwen_moe(c: Fields, t: Tally, mt: str):
    """qwen2_moe / qwen3_moe: routed layers where (i+1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    Qwen2-MoE: q/k/v biases, one gated shared expert per routed layer. Qwen3-MoE: q/k RMSNorm per head."""
    V, H, L, N, K, D = core(c)
    E, k = c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok")
    Fe = c.req("moe_intermediate_size")
    step, dense = c.opt("decoder_sparse_step", 1), set(c.opt("mlp_only_layers", []))
    if mt == "qwen2_moe":
        qkv_bias = c.opt("qkv_bias", True)
        t.add("attention", gqa(H, N, K, D, qkv_bias, False), L)
        Fs = c.req("shared_expert_intermediate_size", positive=False)
    else:
        ab = bool(c.opt("attention_bias", False))
        t.add("attention", gqa(H, N, K, D, ab, ab), L)
        t.add("norm", 2 * D, L)  # q_norm, k_norm over the head dim
    t.add("norm", 2 * H, L)
    sparse = [i for i in range(L) if i not in dense and (i + 1) % step == 0]
    if len(sparse) < L:
        t.add("dense_ffn", glu(H, c.req("intermediate_size")), L - len(sparse))
    for _ in sparse:
        routed(t, H, E, Fe)
        if mt == "qwen2_moe":
            t.add("shared_experts", glu(H, Fs) + H)  # shared expert and its sigmoid gate [1, H]
    window = c.opt("sliding_window", 4096) if c.opt("use_sliding_window", False) else None
    return finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, window, E, k), k


def olmoe(c: Fields, t: Tally, mt: str):
    """Every layer routed; q_norm over the full query width (H), k_norm over K·(H // N)."""
    V, H, L, N, K, D = core(c)
    F, E, k = c.req("intermediate_size"), c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok")
    ab = bool(c.opt("attention_bias", False))
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H + H + (H // N) * K, L)
    for _ in range(L):
        routed(t, H, E, F)
    return finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, None, E, k), k


def dbrx(c: Fields, t: Tally, mt: str):
    """DBRX: fused Wqkv, bias-free LayerNorms, every layer routed; attn_config / ffn_config nested."""
    V, H, L, N = c.req("vocab_size"), c.req("d_model", "hidden_size"), c.req("n_layers"), c.req("n_heads")
    a, f = c.sub("attn_config"), c.sub("ffn_config")
    K, D = a.opt("kv_n_heads", 1), H // N
    F, E, k = f.req("ffn_hidden_size"), f.req("moe_num_experts"), f.req("moe_top_k")
    t.add("attention", linear(H, H + 2 * K * D) + linear(H, H), L)
    t.add("norm", 2 * H, L)
    for _ in range(L):
        routed(t, H, E, F)
    return finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, None, E, k), k


def moekit(cfg, t: Tally):
    """moekit's own MoEConfig (model_type 'moe', or any MoEConfig object): the llama core with routed layers
    where `cfg.is_moe_layer(i)`, an optional (gated) shared expert, q/k/v biases per `attention_qkv_bias`; every
    router keeps a correction-bias buffer."""
    V, H, L, N, K, D = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim)
    E, k, Fe = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    t.add("attention", gqa(H, N, K, D, cfg.attention_qkv_bias, cfg.attention_bias), L)
    t.add("norm", 2 * H, L)
    for i in range(L):
        if cfg.is_moe_layer(i):
            routed(t, H, E, Fe, correction_bias=True)  # moe/router.py Router: e_score_correction_bias buffer [E]
            if cfg.shared_expert_intermediate_size:
                t.add("shared_experts", glu(H, cfg.shared_expert_intermediate_size) + (H if cfg.shared_expert_gate
                                                                                       else 0))
        else:
            t.add("dense_ffn", glu(H, cfg.intermediate_size, cfg.mlp_bias))
    t.add("embedding", V * H)
    t.add("norm", H)
    if not cfg.tie_word_embeddings:
        t.add("lm_head", V * H)
    return bool(cfg.tie_word_embeddings), Arch(L, N, D, D, 2 * K * D, None, E, k), k


FORMULAS = {"llama": dense_llama, "mistral": dense_llama, "mixtral": mixtral, "qwen2_moe": qwen_moe,
            "qwen3_moe": qwen_moe, "olmoe": olmoe, "dbrx": dbrx, **formulas_mla.FORMULAS, **formulas_moe.FORMULAS,
            **formulas_gqa.FORMULAS, **formulas_hybrid.FORMULAS}
SUPPORTED_MODEL_TYPES = (*FORMULAS, "moe")
# the model types whose routing-score correction bias transformers holds as nn.Parameter(requires_grad=False), not
# as a buffer: a parameter (under router) in their formulas, and in their checkpoints, whatever the tensor's name
# there (ERNIE's mlp.moe_statics.e_score_correction_bias, AFMoE's mlp.expert_bias, Laguna's
# mlp.experts.e_score_correction_bias); everyone else's is a buffer, apart from the totals
FROZEN_ROUTING_BIAS = frozenset({"ernie4_5_moe", "afmoe", "laguna"})


def _moe_config_class():
    from moekit.moe.config import MoEConfig  # lazily: the formulas above depend on plain dicts only

    return MoEConfig


def count_config(config: Any, target: str = "config", source: str = "config") -> ParamCount:
    """Exact counts from a config: a config.json dict, a LlamaConfig/MoEConfig, or a transformers config."""
    if not isinstance(config, dict):
        MoEConfig = _moe_config_class()
        if isinstance(config, MoEConfig):
            t = Tally()
            tied, arch, k = moekit(config, t)
            arch.hidden_size = config.hidden_size
            return t.result(k, target=target, source=source, tied=tied, arch=arch, model_type=config.model_type)
        if not hasattr(config, "to_dict"):
            raise ConfigError(f"{target}: expected a config dict or config object, got {type(config).__name__}")
        config = config.to_dict()
    mt = config.get("model_type")
    if not isinstance(mt, str):
        raise ConfigError(f"{target}: field 'model_type' must be a string, got {shown(mt)}")
    if mt == "moe":
        return count_config(_moe_config_class().from_dict(config, source=target), target, source)
    text = config.get("text_config")
    if mt not in FORMULAS and isinstance(text, dict) and isinstance(text.get("model_type"), str) and \
            text["model_type"] in FORMULAS:
        count = count_config(text, f"{target}: text_config", source)  # e.g. Llama 4's llama4 -> llama4_text
        count.target = target
        count.notes.append(f"model_type {shown(mt)}: the language model (text_config, model_type "
                           f"{text['model_type']!r}) only; the vision encoder and projector are not counted")
        return count
    if mt not in FORMULAS:
        raise ConfigError(f"{target}: model_type {shown(mt)} is not supported; expected one of "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    t = Tally()
    tied, arch, k = FORMULAS[mt](Fields(config, target), t, mt)
    if arch and isinstance(config.get("hidden_size"), int):
        arch.hidden_size = config["hidden_size"]
    count = t.result(k, target=target, source=source, tied=tied, arch=arch, model_type=mt)
    mtp = config.get("num_nextn_predict_layers") or config.get("num_mtp_modules") or 0
    if mtp:
        count.notes.append(f"{shown(mtp)} multi-token-prediction layer(s) that a checkpoint may also store are not counted "
                           "(transformers does not build them; some publishers include them)")
    return count
