"""Formulas for hybrid MoE models, whose layers alternate softmax attention with a linear-time mixer: Jamba
(Mamba), Granite 4.0 and Nemotron-H (Mamba-2), Qwen3-Next, Qwen3.5 and Lara-Mini (gated delta-net),
MiniMax-Text-01 (lightning attention), LFM2-MoE (gated short convolutions). Mixers count under 'attention' (the
token mixer of their layer), their inner norms under 'norm'. Only the softmax-attention layers have a KV cache
(`Arch.attention_layers`).
"""

from __future__ import annotations

import math

from moekit.llama.errors import ConfigError, shown

from .blocks import Fields, Tally, attention_arch, core, ffn_layers, finish, gqa, linear, mamba2, sparse_kinds


def jamba(c: Fields, t: Tally, mt: str):
    """Jamba: attention where i % attn_layer_period == attn_layer_offset, Mamba elsewhere (in_proj, depthwise
    conv, x_proj, dt_proj with bias, A_log [Di, S], D, out_proj, RMSNorms on dt, B, C); routed FFN where
    i % expert_layer_period == expert_layer_offset, dense elsewhere."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    ap, ao = c.opt("attn_layer_period", 8), c.opt("attn_layer_offset", 4, positive=False)
    ep, eo = c.opt("expert_layer_period", 2), c.opt("expert_layer_offset", 1, positive=False)
    kinds = ["full_attention" if i % ap == ao else "linear_attention" for i in range(L)]
    S, conv, Di = c.opt("mamba_d_state", 16), c.opt("mamba_d_conv", 4), c.opt("mamba_expand", 2) * H
    r = c.opt("mamba_dt_rank", "auto")
    r = math.ceil(H / 16) if r == "auto" else c.req("mamba_dt_rank")
    pb = c.flag("mamba_proj_bias", False)
    mixer = linear(H, 2 * Di, pb) + Di * conv + (Di if c.flag("mamba_conv_bias", True) else 0) + \
        linear(Di, r + 2 * S) + linear(r, Di, True) + Di * S + Di + linear(Di, H, pb)
    mamba = kinds.count("linear_attention")
    t.add("attention", gqa(H, N, K, D), L - mamba)
    t.add("attention", mixer, mamba)
    t.add("norm", r + 2 * S, mamba)
    t.add("norm", 2 * H, L)
    mlp = sparse_kinds(L, lambda i: E > 1 and i % ep == eo)
    ffn_layers(t, H, mlp, F, E, F)
    arch = attention_arch(L, N, D, 2 * K * D, kinds, None, E, k)
    return finish(t, c, V, H), arch, k


def granitemoehybrid(c: Fields, t: Tally, mt: str):
    """Granite 4.0 (H): Mamba-2 or attention per layer_types; a routed layer where num_local_experts > 0 and a
    shared SwiGLU MLP of shared_intermediate_size in every layer."""
    V, H, L, N, K, D = core(c)
    E = c.opt("num_local_experts", 0, positive=False)
    k = c.req("num_experts_per_tok") if E else 0
    kinds = c.per_layer("layer_types", L, lambda i: "linear_attention")
    heads, Di = c.opt("mamba_n_heads", 128), c.opt("mamba_expand", 2) * H
    mixer = mamba2(H, Di, heads, c.opt("mamba_n_groups", 1), c.opt("mamba_d_state", 256), c.opt("mamba_d_conv", 4),
                   c.flag("mamba_conv_bias", True), c.flag("mamba_proj_bias", False))
    mamba = kinds.count("linear_attention")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab), L - mamba)
    t.add("attention", mixer, mamba)
    t.add("norm", Di, mamba)  # the mixer's gated RMSNorm
    t.add("norm", 2 * H, L)
    Fs = c.opt("shared_intermediate_size", 1024, positive=False)
    if E:
        ffn_layers(t, H, ["sparse"] * L, E=E, Fe=c.req("intermediate_size"), shared_F=Fs)
    else:
        t.add("shared_experts", linear(H, 2 * Fs) + linear(Fs, H), L)
    return finish(t, c, V, H), attention_arch(L, N, D, 2 * K * D, kinds, None, E, k), k


_LARA_PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")


def qwen3_next(c: Fields, t: Tally, mt: str):
    """Qwen3-Next / Qwen3.5 MoE / Lara-Mini: softmax attention with per-head q/k norms (Qwen: gated, q_proj twice
    as wide: queries and their output gate) in every full_attention_interval-th layer (4; Lara: its released
    period-5 pattern); gated delta-net elsewhere (q/k/v/z and beta/alpha projections, a depthwise conv over q,
    k, v, dt_bias, A_log, gated RMSNorm, out_proj); routed layers with a shared expert (Qwen: sigmoid-gated;
    Qwen3-Next: routed per decoder_sparse_step / mlp_only_layers)."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    every, qwen = c.opt("full_attention_interval", 4), mt != "lara_mini"
    kinds = c.per_layer("layer_types", L, lambda i: _LARA_PATTERN[i % 5] if not qwen else
                        "linear_attention" if (i + 1) % every else "full_attention")
    nk, nv = c.opt("linear_num_key_heads", 16), c.opt("linear_num_value_heads", 32)
    dk, dv = c.opt("linear_key_head_dim", 128), c.opt("linear_value_head_dim", 128)
    key, value = nk * dk, nv * dv
    delta = linear(H, 2 * key + 2 * value) + linear(H, 2 * nv) + (2 * key + value) * c.opt(
        "linear_conv_kernel_dim", 4) + 2 * nv + linear(value, H)
    lin = kinds.count("linear_attention")
    ab = c.flag("attention_bias", False)
    t.add("attention", gqa(H, N, K, D, ab, ab) + (linear(H, N * D, ab) if qwen else 0), L - lin)
    t.add("norm", 2 * D, L - lin)
    t.add("attention", delta, lin)
    t.add("norm", dv, lin)
    t.add("norm", 2 * H, L)
    dense, step = set(c.opt("mlp_only_layers", [])), c.opt("decoder_sparse_step", 1)
    mlp = sparse_kinds(L, lambda i: mt != "qwen3_next" or (i not in dense and (i + 1) % step == 0))
    ffn_layers(t, H, mlp, c.req("intermediate_size") if "dense" in mlp else 0, E, Fe,
               shared_F=c.req("shared_expert_intermediate_size", positive=False), shared_gate=qwen)
    window = None if qwen else c.opt("sliding_window", 512)
    return finish(t, c, V, H, tied_default=not qwen), attention_arch(L, N, D, 2 * K * D, kinds, window, E, k), k


def minimax(c: Fields, t: Tally, mt: str):
    """MiniMax-Text-01: lightning (linear) attention and softmax attention alternate per layer_types; a
    lightning layer has a fused qkv_proj, out_proj, an output gate and an RMSNorm over N·D; every layer
    routed."""
    V, H, L, N, K, D = core(c)
    E, k, F = c.req("num_local_experts", "num_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    kinds = c.per_layer("layer_types", L, lambda i: "linear_attention" if i % 2 else "full_attention")
    lin = kinds.count("linear_attention")
    t.add("attention", gqa(H, N, K, D), L - lin)
    t.add("attention", linear(H, 3 * N * D) + 2 * linear(N * D, H), lin)
    t.add("norm", N * D, lin)
    t.add("norm", 2 * H, L)
    ffn_layers(t, H, ["sparse"] * L, E=E, Fe=F)
    return finish(t, c, V, H), attention_arch(L, N, D, 2 * K * D, kinds, c.opt("sliding_window", None), E, k), k


def nemotron_h(c: Fields, t: Tally, mt: str):
    """Nemotron-H / Nemotron 3: each layer is one block behind one norm, per layers_block_type (or the released
    hybrid_override_pattern: M Mamba-2, * attention, - MLP, E routed): a Mamba-2 mixer of mamba_num_heads ×
    mamba_head_dim, bias-free GQA attention, a squared-ReLU MLP (up, down), or a routed layer of squared-ReLU
    experts (optionally through a moe_latent_size bottleneck) with a shared expert and a correction bias."""
    V, H, N = c.req("vocab_size"), c.req("hidden_size"), c.req("num_attention_heads")
    K, D = c.opt("num_key_value_heads", N), c.opt("head_dim", H // N)
    pattern = c.opt("hybrid_override_pattern", "ME*-")  # transformers' default: one block of each kind
    if not isinstance(pattern, str) or any(ch not in _NEMOTRON_BLOCKS for ch in pattern):
        raise ConfigError(f"{c.source}: field 'hybrid_override_pattern' must be a string of M, *, - and E, got "
                          f"{shown(pattern)}")
    default = [_NEMOTRON_BLOCKS[ch] for ch in pattern]
    key = "layer_types" if "layer_types" in c.d else "layers_block_type"
    kinds = c.per_layer(key, len(c.d.get(key) or default), lambda i: default[i])
    L, mb = len(kinds), c.flag("mlp_bias", False)
    heads = c.opt("mamba_num_heads", 128)
    Di = heads * c.opt("mamba_head_dim", 64)
    mixer = mamba2(H, Di, heads, c.opt("mamba_n_groups", c.opt("n_groups", 8)), c.opt("ssm_state_size", 128),
                   c.opt("mamba_d_conv", c.opt("conv_kernel", 4)),
                   c.flag("mamba_conv_bias", c.flag("use_conv_bias", True)), c.flag("use_bias", False))
    up_down = lambda i, o: linear(i, o, mb) + linear(o, i, mb)  # noqa: E731
    E = c.req("n_routed_experts", "num_local_experts") if "moe" in kinds else 0
    k = c.req("num_experts_per_tok") if E else 0
    for kind in kinds:
        if kind == "linear_attention":
            t.add("attention", mixer)
            t.add("norm", Di)
        elif kind == "full_attention":
            t.add("attention", gqa(H, N, K, D))
        elif kind == "mlp":
            t.add("dense_ffn", up_down(H, c.req("intermediate_size")))
        else:
            latent, Fe = c.opt("moe_latent_size", None), c.req("moe_intermediate_size")
            t.add("router", H * E)
            t.buffer("e_score_correction_bias", E)
            t.add_routed(E * 2 * (latent or H) * Fe, E)
            t.add("shared_experts", up_down(H, c.req("moe_shared_expert_intermediate_size")))
            t.add("other", up_down(H, latent) if latent else 0)  # the latent projections, used by every token
    t.add("norm", H, L)
    attn = ["full_attention" if x == "full_attention" else "linear_attention" for x in kinds]
    return finish(t, c, V, H), attention_arch(L, N, D, 2 * K * D, attn, None, E, k), k


_NEMOTRON_BLOCKS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def lfm2_moe(c: Fields, t: Tally, mt: str):
    """LFM2-MoE: per layer_types, a gated short convolution (in_proj to 3H, depthwise conv of conv_L_cache,
    out_proj) or GQA attention with per-head q/k norms; num_dense_layers dense layers, then routed layers
    with an expert_bias buffer (use_expert_bias); tied by default."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("num_experts"), c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    kinds = c.per_layer("layer_types", L, None)
    conv, cb = c.opt("conv_L_cache", 3), c.flag("conv_bias", False)
    n_conv = kinds.count("conv")
    t.add("attention", gqa(H, N, K, D), L - n_conv)
    t.add("norm", 2 * D, L - n_conv)
    t.add("attention", H * conv + (H if cb else 0) + linear(H, 3 * H, cb) + linear(H, H, cb), n_conv)
    t.add("norm", 2 * H, L)
    mlp = sparse_kinds(L, lambda i: i >= c.opt("num_dense_layers", 2, positive=False))
    ffn_layers(t, H, mlp, c.req("intermediate_size") if "dense" in mlp else 0, E, Fe)
    if c.flag("use_expert_bias", True):
        t.buffer("expert_bias", E * mlp.count("sparse"))
    if "tie_embedding" in c.d:  # LFM2's name for tie_word_embeddings
        c = Fields({**c.d, "tie_word_embeddings": c.d["tie_embedding"]}, c.source)
    attn = ["linear_attention" if x == "conv" else x for x in kinds]
    return finish(t, c, V, H, tied_default=True), attention_arch(L, N, D, 2 * K * D, attn, None, E, k), k


FORMULAS = {"jamba": jamba, "granitemoehybrid": granitemoehybrid, "qwen3_next": qwen3_next,
            "qwen3_5_moe_text": qwen3_next, "lara_mini": qwen3_next, "minimax": minimax, "nemotron_h": nemotron_h,
            "lfm2_moe": lfm2_moe}
