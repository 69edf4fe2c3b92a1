"""Formulas for MoE models with standard (GQA) attention in every layer: gpt-oss, Llama 4, GLM-4.5, Phi-3.5-MoE,
Granite MoE, ERNIE 4.5, Hunyuan-A13B, dots.llm1, FlexOlmo and MiniMax-M2. Each reads its transformers config
class's field names and defaults; the per-layer dense / routed pattern follows that class's rule.
"""

from __future__ import annotations

from moekit.llama.errors import ConfigError, shown

from .blocks import (
    Arch,
    Fields,
    Tally,
    attention_arch,
    core,
    ffn_layers,
    finish,
    glu,
    gqa,
    routed,
    sparse_kinds,
)


def _arch(c: Fields, L: int, N: int, K: int, D: int, E: int, k: int, window_default: int | None = None,
          layer_types: list[str] | None = None) -> Arch:
    window = c.opt("sliding_window", window_default)
    kinds = layer_types or c.per_layer("layer_types", L, lambda i: "sliding_attention" if window else
                                       "full_attention")
    return attention_arch(L, N, D, 2 * K * D, kinds, window, E, k)


def gpt_oss(c: Fields, t: Tally, mt: str):
    """gpt-oss: biases on q/k/v/o, a learned attention sink per head, a router with bias, experts with biases
    on gate_up and down; sliding-window and full attention alternate (no effect on the counts)."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts", "num_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    ab = c.flag("attention_bias", True)
    t.add("attention", gqa(H, N, K, D, ab, ab) + N, L)  # + sinks [N]
    t.add("norm", 2 * H, L)
    for _ in range(L):
        routed(t, H, E, F, router_bias=True, expert_bias=True)
    kinds = c.per_layer("layer_types", L, lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k, 128, kinds), k


def llama4_text(c: Fields, t: Tally, mt: str):
    """Llama 4 text model: routed layers are moe_layers (else every interleave_moe_layer_step-th), each with a
    shared expert as wide as the routed ones; dense layers use intermediate_size_mlp; QK L2-norm has no
    weights."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    step = c.opt("interleave_moe_layer_step", 1)
    moe = c.opt("moe_layers", list(range(step - 1, L, step)))
    kinds = sparse_kinds(L, lambda i: i in moe)
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H, L)
    ffn_layers(t, H, kinds, c.req("intermediate_size_mlp") if "dense" in kinds else 0, E, F, shared_F=F)
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k), k


def glm4_moe(c: Fields, t: Tally, mt: str):
    """GLM-4.5 (and Sarvam's sarvam_moe, built on it): q/k/v biases (none on o), optional per-head q/k norms,
    first_k_dense_replace dense layers, n_shared_experts fused, a routing-score correction bias."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("n_routed_experts", "num_local_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    sarvam = mt == "sarvam_moe"
    t.add("attention", gqa(H, N, K, D, c.flag("attention_bias", False)), L)
    t.add("norm", 2 * H + (2 * D if c.flag("use_qk_norm", sarvam) else 0), L)
    first = c.opt("first_k_dense_replace", 1, positive=False)
    kinds = sparse_kinds(L, lambda i: i >= first)
    ffn_layers(t, H, kinds, c.req("intermediate_size") if first else 0, E, Fe,
               shared_F=Fe * c.opt("n_shared_experts", 1, positive=False), correction_bias=True)
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k, layer_types=["full_attention"] * L), k


def phimoe(c: Fields, t: Tally, mt: str):
    """Phi-3.5-MoE: LayerNorms with bias, optional attention and LM-head biases, every layer routed."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 4 * H, L)
    for _ in range(L):
        routed(t, H, E, F)
    tied = finish(t, c, V, H, final_norm=2 * H, head_bias=c.flag("lm_head_bias", False))
    return tied, _arch(c, L, N, K, D, E, k), k


def granitemoe(c: Fields, t: Tally, mt: str):
    """granitemoe / granitemoeshared: Mixtral-like, optional attention biases; granitemoeshared adds a shared
    SwiGLU MLP (input_linear [2·Fs, H], output_linear [H, Fs]) when shared_intermediate_size > 0."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H, L)
    Fs = c.opt("shared_intermediate_size", 0, positive=False) if mt == "granitemoeshared" else 0
    ffn_layers(t, H, ["sparse"] * L, E=E, Fe=F, shared_F=Fs)
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k), k


def ernie4_5_moe(c: Fields, t: Tally, mt: str):
    """ERNIE 4.5 MoE: routed layers i in [moe_layer_start_index, moe_layer_end_index] with (i + 1) %
    moe_layer_interval == 0; use_bias on attention, MLPs and LM head; moe_num_shared_experts fused; tied by
    default. Its routing-score correction bias is a frozen parameter in transformers, so a parameter here."""
    V, H, L, N, K, D = core(c)
    E, k = c.req("moe_num_experts", "num_experts"), c.req("moe_k", "num_experts_per_tok")
    Fe, bias = c.req("moe_intermediate_size"), c.flag("use_bias", False)
    start, interval = c.opt("moe_layer_start_index", 1, positive=False), c.opt("moe_layer_interval", 1)
    end = None if c.d.get("moe_layer_end_index") == -1 else c.opt("moe_layer_end_index", None, positive=False)
    end = L - 1 if end is None else end
    kinds = sparse_kinds(L, lambda i: (i + 1) % interval == 0 and start <= i <= end)
    t.add("attention", gqa(H, N, K, D, bias, bias), L)
    t.add("norm", 2 * H, L)
    ffn_layers(t, H, kinds, c.req("intermediate_size") if "dense" in kinds else 0, E, Fe,
               shared_F=Fe * c.opt("moe_num_shared_experts", 0, positive=False), bias=bias)
    # modeling_ernie4_5_moe.Ernie4_5_MoeStatics: e_score_correction_bias [1, E], nn.Parameter(requires_grad=False)
    t.add("router", E, kinds.count("sparse"))
    return finish(t, c, V, H, tied_default=True, head_bias=bias), _arch(c, L, N, K, D, E, k), k


def hunyuan_v1_moe(c: Fields, t: Tally, mt: str):
    """Hunyuan-A13B: per-head q/k norms (query_layernorm, key_layernorm), optional attention biases; every layer
    routed with experts and one shared MLP all of width intermediate_size; moe_topk may differ per layer."""
    V, H, L, N, K, D = core(c)
    E, F = c.req("num_experts", "num_local_experts"), c.req("intermediate_size")
    topk = c.d.get("moe_topk", c.d.get("num_experts_per_tok", 1))
    ks = topk[:L] if isinstance(topk, list) else [topk] * L
    if len(ks) < L or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
        raise ConfigError(f"{c.source}: field 'moe_topk' must be a positive integer or a list of one per layer, "
                          f"got {shown(topk)}")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H + 2 * D, L)
    for k in ks:
        routed(t, H, E, F, k=k)
        t.add("shared_experts", glu(H, F))
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, max(ks)), max(ks)


def dots1(c: Fields, t: Tally, mt: str):
    """dots.llm1: per-head q/k norms, optional attention biases, first_k_dense_replace dense layers,
    n_shared_experts fused, a routing-score correction bias; sliding window above max_window_layers."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("n_routed_experts"), c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H + 2 * D, L)
    first = c.opt("first_k_dense_replace", 0, positive=False)
    ffn_layers(t, H, sparse_kinds(L, lambda i: i >= first), c.req("intermediate_size") if first else 0, E, Fe,
               shared_F=Fe * c.req("n_shared_experts", positive=False), correction_bias=True)
    window, top = c.opt("sliding_window", 4096), c.opt("max_window_layers", L, positive=False)
    kinds = c.per_layer("layer_types", L, lambda i: "sliding_attention" if window and i >= top else
                        "full_attention")
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k, 4096, kinds), k


def flex_olmo(c: Fields, t: Tally, mt: str):
    """FlexOlmo (OLMo 2 style): q/k norms over the full projection widths, norms after attention and after the
    FFN, every layer routed."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H + N * D + K * D, L)
    for _ in range(L):
        routed(t, H, E, F)
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k), k


def minimax_m2(c: Fields, t: Tally, mt: str):
    """MiniMax-M2: q/k norms over the full projection widths, every layer routed with experts of width
    intermediate_size, a routing-score correction bias."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts", "num_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    t.add("attention", gqa(H, N, K, D), L)
    t.add("norm", 2 * H + N * D + K * D, L)
    for _ in range(L):
        routed(t, H, E, F, correction_bias=True)
    return finish(t, c, V, H), _arch(c, L, N, K, D, E, k), k


FORMULAS = {"gpt_oss": gpt_oss, "llama4_text": llama4_text, "glm4_moe": glm4_moe, "sarvam_moe": glm4_moe,
            "phimoe": phimoe, "granitemoe": granitemoe, "granitemoeshared": granitemoe,
            "ernie4_5_moe": ernie4_5_moe, "hunyuan_v1_moe": hunyuan_v1_moe, "dots1": dots1,
            "flex_olmo": flex_olmo, "minimax_m2": minimax_m2}
