"""Formulas for the DeepSeek family: multi-head latent attention (MLA), fine-grained routed experts with
shared experts and first dense layers. DeepSeek-V2/V3 and the models built on them: DeepSeek-V3.2 and GLM-5
(a sparse-attention indexer per layer), GLM-4.7-Flash, Sarvam-M, A.X K1, Kimi Linear (MLA layers between
Kimi delta-attention layers) and LongCat-Flash (two attention and dense sublayers per layer, zero-computation
experts).
"""

from __future__ import annotations

from moekit.llama.errors import ConfigError, shown

from .blocks import Arch, Fields, Tally, ffn_layers, finish, glu, linear, mla, routed

# transformers' defaults where config.json leaves them out: (q_lora_rank, first_k_dense_replace, n_shared_experts)
_DEFAULTS = {"deepseek_v2": (1536, 0, 2), "deepseek_v3": (1536, 3, 1), "deepseek_v32": (1536, 3, 1),
             "glm_moe_dsa": (2048, 3, 1), "glm4_moe_lite": (768, 1, 1), "sarvam_mla": (None, 1, 1),
             "axk1": (1536, 1, 1)}


def _mlp_kinds(c: Fields, L: int, first: int) -> list[str]:
    """mlp_layer_types where given, else layers i >= first_k_dense_replace with i % moe_layer_freq == 0 are
    routed."""
    first, freq = c.opt("first_k_dense_replace", first, positive=False), c.opt("moe_layer_freq", 1)
    return c.per_layer("mlp_layer_types", L, lambda i: "sparse" if i >= first and i % freq == 0 else "dense")


def _indexer(c: Fields, t: Tally, H: int, L: int, mt: str) -> None:
    """DeepSeek sparse attention's lightning indexer: wq_b from the q latent, one key head wk, a LayerNorm on
    it, per-head weights. GLM-5 layers marked 'shared' reuse the previous layer's indexer."""
    r_q, heads, dim = c.req("q_lora_rank"), c.req("index_n_heads"), c.req("index_head_dim")
    n = L
    if mt == "glm_moe_dsa":
        n = c.per_layer("indexer_types", L, lambda i: _dsa_indexer_kind(c, i)).count("full")
    t.add("attention", linear(r_q, heads * dim) + linear(H, dim) + linear(H, heads), n)
    t.add("norm", 2 * dim, n)


def _dsa_indexer_kind(c: Fields, i: int) -> str:
    pattern = c.d.get("index_topk_pattern")
    if pattern is not None and (not isinstance(pattern, str) or len(pattern) <= i):
        raise ConfigError(f"{c.source}: field 'index_topk_pattern' must be a string of F and S, one per layer, got "
                          f"{shown(pattern)}")
    if pattern is not None:
        return {"F": "full", "S": "shared"}.get(pattern[i], pattern[i])
    freq, offset = max(c.opt("index_topk_freq", 1), 1), c.opt("index_skip_topk_offset", 2, positive=False)
    return "full" if max(i - offset + 1, 0) % freq == 0 else "shared"


def deepseek(c: Fields, t: Tally, mt: str):
    """deepseek_v2 / v3 / v32, glm_moe_dsa, glm4_moe_lite, sarvam_mla, axk1: MLA in every layer; routed layers
    with n_shared_experts fused into one MLP of n·moe_intermediate_size; V3 on: a routing-score correction
    bias (a buffer)."""
    V, H, L, N = (c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers"),
                  c.req("num_attention_heads"))
    q_lora, first, n_shared = _DEFAULTS[mt]
    Dqk, Dv, kv = mla(c, t, H, N, L, q_lora, c.flag("attention_bias", False))
    t.add("norm", 2 * H, L)  # input and post-attention norms
    if mt in ("deepseek_v32", "glm_moe_dsa"):
        _indexer(c, t, H, L, mt)
    if mt == "glm4_moe_lite":  # transformers ignores first_k_dense_replace here: layer 0 dense, the rest routed
        kinds = c.per_layer("mlp_layer_types", L, lambda i: "dense" if i == 0 else "sparse")
    else:
        kinds = _mlp_kinds(c, L, first)
    sparse = kinds.count("sparse")
    E, k = (c.req("n_routed_experts", "num_local_experts", "num_experts"), c.req("num_experts_per_tok")) \
        if sparse else (0, 0)
    Fe = c.req("moe_intermediate_size") if sparse else 0
    ffn_layers(t, H, kinds, c.req("intermediate_size") if sparse < L else 0, E, Fe,
               shared_F=Fe * c.opt("n_shared_experts", n_shared, positive=False),
               bias=c.flag("mlp_bias", False) and mt == "deepseek_v2", correction_bias=mt != "deepseek_v2")
    if mt == "axk1":
        t.add("norm", H, sparse)  # post_mlp_layernorm in each routed layer
    return finish(t, c, V, H), Arch(L, N, Dqk, Dv, kv, None, E, k), k


def kimi_linear(c: Fields, t: Tally, mt: str):
    """Kimi Linear: MLA layers (plain q_proj) among Kimi delta-attention (KDA) layers: q/k/v with a short
    depthwise conv, a low-rank forget gate (f_a, f_b, dt_bias, A_log) and output gate (g_a, g_b), a beta
    projection and a gated RMSNorm. Linear-attention fields may sit in a linear_attn_config sub-dict."""
    V, H, L, N = (c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers"),
                  c.req("num_attention_heads"))
    sub = c.sub("linear_attn_config").d
    kinds = c.per_layer("layer_types", L, lambda i: _kimi_layer(sub, i))
    full, lin = kinds.count("full_attention"), kinds.count("linear_attention")
    Dqk, Dv, kv = mla(c, t, H, N, full, None, c.flag("attention_bias", False))
    dh = sub.get("head_dim") or c.opt("linear_head_dim", 128)
    heads = sub.get("num_heads") or c.opt("linear_num_heads", 32)
    conv = sub.get("short_conv_kernel_size") or c.opt("linear_conv_kernel_dim", 4)
    qkv = dh * heads
    kda = 3 * linear(H, qkv) + 3 * qkv * conv + 2 * (linear(H, dh) + linear(dh, qkv)) + qkv + heads + \
        linear(H, heads) + linear(qkv, H)
    t.add("attention", kda, lin)
    t.add("norm", dh, lin)  # o_norm
    t.add("norm", 2 * H, L)
    E, k = _linear_hybrid_ffn(c, t, H, L, first_dense=1)
    return finish(t, c, V, H), Arch(L, N, Dqk, Dv, kv, None, E, k, attention_layers=full), k


def bailing_hybrid(c: Fields, t: Tally, mt: str):
    """Ring-linear (bailing_hybrid): an MLA layer with a per-head output gate every layer_group_size-th layer,
    delta-attention layers elsewhere (q/k/v with a short conv, forget gate f_proj + dt_bias + A_log, beta
    projection, output gate g_proj, gated RMSNorm); the linear layers' head_dim and heads are config.json's
    head_dim and num_attention_heads (transformers keeps them as linear_head_dim / linear_num_heads)."""
    V, H, L, N = (c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers"),
                  c.req("num_attention_heads"))
    every = c.opt("layer_group_size", 6)
    kinds = c.per_layer("layer_types", L, lambda i: "full_attention" if (i + 1) % every == 0 else "linear_attention")
    full, lin = kinds.count("full_attention"), kinds.count("linear_attention")
    Dqk, Dv, kv = mla(c, t, H, N, full, None, c.flag("attention_bias", False))
    t.add("attention", linear(H, N), full)  # g_proj
    dh = c.opt("linear_head_dim", 0) or c.opt("head_dim", 128)
    heads = c.opt("linear_num_heads", 0) or N
    conv = c.opt("linear_conv_kernel_dim", 0) or c.opt("short_conv_kernel_size", 4)
    qkv = dh * heads
    t.add("attention", 5 * linear(H, qkv) + 3 * qkv * conv + heads + qkv + linear(H, heads) + linear(qkv, H), lin)
    t.add("norm", dh, lin)  # o_norm
    t.add("norm", 2 * H, L)
    E, k = _linear_hybrid_ffn(c, t, H, L, first_dense=2)
    return finish(t, c, V, H), Arch(L, N, Dqk, Dv, kv, None, E, k, attention_layers=full), k


def _linear_hybrid_ffn(c: Fields, t: Tally, H: int, L: int, first_dense: int) -> tuple[int, int]:
    """The FFNs of Kimi Linear and Ring-linear (their own field names: num_experts, num_experts_per_token,
    num_shared_experts): first dense layers, then routed ones with fused shared experts and a correction
    bias. Returns (E, k)."""
    mlp = _mlp_kinds(c, L, first_dense)
    sparse = mlp.count("sparse")
    E = c.req("num_experts", "num_local_experts") if sparse else 0
    k = c.req("num_experts_per_token", "num_experts_per_tok") if sparse else 0
    Fe = c.req("moe_intermediate_size") if sparse else 0
    shared = c.opt("num_shared_experts", c.opt("n_shared_experts", 1, positive=False), positive=False)
    ffn_layers(t, H, mlp, c.req("intermediate_size") if sparse < L else 0, E, Fe, shared_F=Fe * shared,
               correction_bias=True)
    return E, k


def _kimi_layer(sub: dict, i: int) -> str:
    if "full_attn_layers" in sub and "kda_layers" in sub:  # 1-indexed in the released config
        return "full_attention" if i + 1 in sub["full_attn_layers"] else "linear_attention"
    return "full_attention" if i and i % 4 == 0 else "linear_attention"


def longcat_flash(c: Fields, t: Tally, mt: str):
    """LongCat-Flash: each of num_layers layers has two MLA sublayers, two dense FFNs and one shortcut-connected
    routed layer whose router picks top-k of n_routed_experts real experts plus zero_expert_num
    zero-computation (identity) experts. Active counts the real experts a token gets on average when the
    router's k picks are spread over all E + Z choices: k·E/(E + Z)."""
    V, H, N = c.req("vocab_size"), c.req("hidden_size"), c.req("num_attention_heads")
    L = c.opt("num_layers", 0) or c.req("num_hidden_layers") // 2  # transformers: num_hidden_layers = 2·num_layers
    Dqk, Dv, kv = mla(c, t, H, N, 2 * L, 1536, c.flag("attention_bias", False))
    t.add("dense_ffn", glu(H, c.req("ffn_hidden_size", "intermediate_size")), 2 * L)
    t.add("norm", 4 * H, L)  # input and post-attention norm of each sublayer
    E, k = c.req("n_routed_experts", "num_local_experts"), c.req("moe_topk", "num_experts_per_tok")
    Z = c.opt("zero_expert_num", 0, positive=False)
    Fe = c.req("expert_ffn_hidden_size", "moe_intermediate_size")
    for _ in range(L):
        routed(t, H, E, Fe, router_bias=c.flag("router_bias", False), correction_bias=True, zero_experts=Z)
    arch = Arch(L, N, Dqk, Dv, kv, None, E, k, attention_layers=2 * L, zero_experts=Z)
    return finish(t, c, V, H), arch, k


FORMULAS = {mt: deepseek for mt in _DEFAULTS} | {"kimi_linear": kimi_linear, "bailing_hybrid": bailing_hybrid,
                                                "longcat_flash": longcat_flash}
