"""Formulas for the other MoE families with GQA attention that transformers 5 ships: Aria, EXAONE MoE, Solar
Open, Hunyuan (hy_v3), JetMoE, MiMo-V2-Flash, AFMoE (Arcee Trinity), Mellum, Kolibri, Flint, Laguna, Beam and Command
(cohere2_moe). Most add per-head q/k norms, output gates or attention sinks, and name each layer's kind in
mlp_layer_types / layer_types; `_decoder` counts the layout they share.
"""

from __future__ import annotations

from collections.abc import Callable

from .blocks import Fields, Tally, attention_arch, core, ffn_layers, finish, glu, gqa, linear, sparse_kinds


def _decoder(c: Fields, t: Tally, kinds: list[str], E: int, Fe: int, extra_attention: int = 0, norms: int = 2,
             qk_norm: bool = True, qkv_bias: bool = False, o_bias: bool = False, **ffn_kw) -> tuple:
    """The shared layout: GQA attention (+ extra_attention per layer: gates, sinks) with per-head q/k norms,
    `norms` H-sized norms per layer, each layer's FFN per `kinds`. Returns (V, H, L, N, K, D)."""
    V, H, L, N, K, D = core(c)
    t.add("attention", gqa(H, N, K, D, qkv_bias, o_bias) + extra_attention, L)
    t.add("norm", norms * H + (2 * D if qk_norm else 0), L)
    ffn_layers(t, H, kinds, E=E, Fe=Fe, **ffn_kw)
    return V, H, L, N, K, D


def _dense_first(c: Fields, L: int, key: str = "first_k_dense_replace", default: int = 1) -> list[str]:
    first = c.opt(key, default, positive=False)
    return c.per_layer("mlp_layer_types", L, lambda i: "dense" if i < first else "sparse")


def _window_kinds(c: Fields, L: int, full: Callable[[int], bool]) -> list[str]:
    return c.per_layer("layer_types", L, lambda i: "full_attention" if full(i) else "sliding_attention")


def _result(c: Fields, V: int, H: int, L: int, N: int, K: int, D: int, E: int, k: int, kinds: list[str] | None,
            t: Tally, tied_default: bool = False, **kw):
    kinds = kinds or ["full_attention"] * L
    arch = attention_arch(L, N, D, 2 * K * D, kinds, c.opt("sliding_window", None), E, k, **kw)
    return finish(t, c, V, H, tied_default), arch, k


def aria_text(c: Fields, t: Tally, mt: str):
    """Aria's language model: every layer routed, experts and moe_num_shared_experts shared ones all of width
    intermediate_size; optional attention and MLP biases; no q/k norms."""
    L, E, k = c.req("num_hidden_layers"), c.req("moe_num_experts"), c.req("moe_topk")
    F, ab = c.req("intermediate_size"), c.flag("attention_bias", False)
    dims = _decoder(c, t, ["sparse"] * L, E, F, qk_norm=False, qkv_bias=ab, o_bias=ab,
                    shared_F=F * c.opt("moe_num_shared_experts", 2, positive=False), bias=c.flag("mlp_bias", False))
    return _result(c, *dims, E, k, None, t)


def exaone_moe(c: Fields, t: Tally, mt: str):
    """EXAONE MoE (K-EXAONE): first_k_dense_replace dense layers, num_shared_experts fused, a correction bias;
    sliding window except every sliding_window_pattern-th layer."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    mlp = _dense_first(c, L)
    dims = _decoder(c, t, mlp, E, Fe, dense_F=c.req("intermediate_size") if "dense" in mlp else 0,
                    shared_F=Fe * c.opt("num_shared_experts", 1, positive=False), correction_bias=True)
    every = c.opt("sliding_window_pattern", 4) if c.opt("sliding_window", 4096) else 1
    return _result(c, *dims, E, k, _window_kinds(c, L, lambda i: (i + 1) % every == 0), t)


def solar_open(c: Fields, t: Tally, mt: str):
    """Solar Open: every layer routed with n_shared_experts fused and a correction bias; q/k/v biases (none
    on o); no q/k norms."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("n_routed_experts", "num_local_experts"), \
        c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    dims = _decoder(c, t, ["sparse"] * L, E, Fe, qk_norm=False, qkv_bias=c.flag("attention_bias", False),
                    shared_F=Fe * c.opt("n_shared_experts", 1, positive=False), correction_bias=True)
    return _result(c, *dims, E, k, None, t)


def hy_v3(c: Fields, t: Tally, mt: str):
    """Hunyuan (hy_v3): layer 0 dense unless mlp_layer_types says otherwise, num_shared_experts fused, a
    correction bias; optional attention and MLP biases."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_experts", "num_local_experts"), \
        c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    mlp = c.per_layer("mlp_layer_types", L, lambda i: "dense" if i == 0 else "sparse")
    ab = c.flag("attention_bias", False)
    dims = _decoder(c, t, mlp, E, Fe, qkv_bias=ab, o_bias=ab, bias=c.flag("mlp_bias", False),
                    dense_F=c.req("intermediate_size") if "dense" in mlp else 0,
                    shared_F=Fe * c.opt("num_shared_experts", 1, positive=False), correction_bias=True)
    return _result(c, *dims, E, k, None, t)


def mimo_v2_flash(c: Fields, t: Tally, mt: str):
    """MiMo-V2-Flash: values of v_head_dim; sliding-window layers have twice the KV heads and a sink per
    head; no q/k norms; layer 0 dense; a correction bias; no shared experts."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("n_routed_experts", "num_local_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    Dv, ab = c.opt("v_head_dim", D), c.flag("attention_bias", False)
    kinds = _window_kinds(c, L, lambda i: i == 0 or (i + 1) % 6 == 0)
    for kind in kinds:
        Kl = 2 * K if kind == "sliding_attention" else K
        t.add("attention", linear(H, N * D, ab) + linear(H, Kl * D, ab) + linear(H, Kl * Dv, ab) +
              linear(N * Dv, H) + (N if kind == "sliding_attention" else 0))
    t.add("norm", 2 * H, L)
    mlp = c.per_layer("mlp_layer_types", L, lambda i: "dense" if i == 0 else "sparse")
    ffn_layers(t, H, mlp, c.req("intermediate_size") if "dense" in mlp else 0, E, Fe, correction_bias=True)
    window = c.opt("sliding_window", 128)
    return finish(t, c, V, H), attention_arch(L, N, D, K * (D + Dv), kinds, window, E, k, Dv=Dv), k


def afmoe(c: Fields, t: Tally, mt: str):
    """AFMoE (Arcee Trinity): a sigmoid output gate [N·D, H] on attention, four norms per layer,
    num_dense_layers dense layers, num_shared_experts fused; its expert_bias (load balancing) is a frozen
    parameter in transformers, so a parameter here."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    N, H = c.req("num_attention_heads"), c.req("hidden_size")
    D, ab = c.opt("head_dim", H // N), c.flag("attention_bias", False)
    mlp = sparse_kinds(L, lambda i: i >= c.opt("num_dense_layers", 1, positive=False))
    dims = _decoder(c, t, mlp, E, Fe, extra_attention=H * N * D, norms=4, qkv_bias=ab, o_bias=ab,
                    dense_F=c.req("intermediate_size") if "dense" in mlp else 0,
                    shared_F=Fe * c.opt("num_shared_experts", 2, positive=False))
    # modeling_afmoe.AfmoeSparseMoeBlock: expert_bias [E], nn.Parameter(requires_grad=False)
    t.add("router", E, mlp.count("sparse"))
    every = c.opt("global_attn_every_n_layers", 4)
    return _result(c, *dims, E, k, _window_kinds(c, L, lambda i: (i + 1) % every == 0), t)


def mellum(c: Fields, t: Tally, mt: str):
    """Mellum: every layer routed unless mlp_layer_types says otherwise; no shared experts."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_local_experts", "num_experts"), \
        c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    mlp = c.per_layer("mlp_layer_types", L, lambda i: "sparse")
    ab = c.flag("attention_bias", False)
    dims = _decoder(c, t, mlp, E, Fe, qkv_bias=ab, o_bias=ab,
                    dense_F=c.req("intermediate_size") if "dense" in mlp else 0)
    return _result(c, *dims, E, k, c.per_layer("layer_types", L, lambda i: "full_attention"), t)


def kolibri1(c: Fields, t: Tally, mt: str):
    """Kolibri: four norms per layer, every layer routed with a shared expert of shared_expert_intermediate_size
    and a correction bias; sliding window except every fifth layer."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_local_experts", "num_experts"), \
        c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    dims = _decoder(c, t, ["sparse"] * L, E, Fe, norms=4, correction_bias=True,
                    shared_F=c.req("shared_expert_intermediate_size", positive=False))
    return _result(c, *dims, E, k, _window_kinds(c, L, lambda i: (i + 1) % 5 == 0), t)


def flint(c: Fields, t: Tally, mt: str):
    """Flint: a sink per head, routed layers per decoder_sparse_step / mlp_only_layers (default [0, 1]) with
    an ungated shared expert; full attention on the first two layers, every fourth and the last."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    dense, step = set(c.opt("mlp_only_layers", [0, 1])), c.opt("decoder_sparse_step", 1)
    mlp = sparse_kinds(L, lambda i: i not in dense and (i + 1) % step == 0)
    ab = c.flag("attention_bias", False)
    dims = _decoder(c, t, mlp, E, Fe, extra_attention=c.req("num_attention_heads"), qkv_bias=ab, o_bias=ab,
                    dense_F=c.req("intermediate_size") if "dense" in mlp else 0,
                    shared_F=c.req("shared_expert_intermediate_size", positive=False))
    kinds = _window_kinds(c, L, lambda i: i < 2 or i % 4 == 1 or i == L - 1)
    return _result(c, *dims, E, k, kinds, t)


def laguna(c: Fields, t: Tally, mt: str):
    """Laguna: per-layer head counts (num_attention_heads_per_layer), an output gate per head (gating true or
    'per-head') or per channel, layer 0 dense, a shared expert, a correction bias (a frozen parameter in
    transformers, so a parameter here)."""
    V, H, L, N, K, D = core(c)
    E, k, Fe = c.req("num_experts"), c.req("num_experts_per_tok"), c.req("moe_intermediate_size")
    heads = c.opt("num_attention_heads_per_layer", [N] * L)
    per_head, ab = c.opt("gating", True) in (True, "per-head"), c.flag("attention_bias", False)
    for n in heads[:L]:
        t.add("attention", gqa(H, n, K, D, ab, ab) + linear(H, n if per_head else n * D))
    t.add("norm", 2 * H + 2 * D, L)
    mlp = c.per_layer("mlp_layer_types", L, lambda i: "dense" if i == 0 else "sparse")
    ffn_layers(t, H, mlp, c.req("intermediate_size") if "dense" in mlp else 0, E, Fe,
               shared_F=c.req("shared_expert_intermediate_size", positive=False))
    # modeling_laguna.LagunaTopKRouter: e_score_correction_bias [E], nn.Parameter(requires_grad=False)
    t.add("router", E, mlp.count("sparse"))
    kinds = c.per_layer("layer_types", L, lambda i: "full_attention")
    return _result(c, V, H, L, N, K, D, E, k, kinds, t)


def beam(c: Fields, t: Tally, mt: str):
    """Beam: an output gate [N·D, H] with a bias per head, four norms per layer, the first three layers dense,
    a correction bias, no shared experts; full attention every sixth and the last layer."""
    L, E, k, Fe = c.req("num_hidden_layers"), c.req("num_experts"), c.req("num_experts_per_tok"), \
        c.req("moe_intermediate_size")
    N, H = c.req("num_attention_heads"), c.req("hidden_size")
    mlp = c.per_layer("mlp_layer_types", L, lambda i: "dense" if i < min(3, L) else "sparse")
    ab = c.flag("attention_bias", False)
    dims = _decoder(c, t, mlp, E, Fe, extra_attention=H * N * c.opt("head_dim", H // N) + N, norms=4,
                    qkv_bias=ab, o_bias=ab, dense_F=c.req("intermediate_size") if "dense" in mlp else 0,
                    correction_bias=True)
    kinds = _window_kinds(c, L, lambda i: (i + 1) % 6 == 0 or i == L - 1)
    return _result(c, *dims, E, k, kinds, t)


def cohere2_moe(c: Fields, t: Tally, mt: str):
    """Command (cohere2_moe): parallel attention and FFN behind one norm per layer, no q/k norms; dense prefix
    layers of prefix_dense_intermediate_size; num_shared_experts fused at intermediate_size; tied by default."""
    L, E, k, F = c.req("num_hidden_layers"), c.req("num_experts"), c.req("num_experts_per_tok"), \
        c.req("intermediate_size")
    mlp = _dense_first(c, L, default=0)
    ab = c.flag("attention_bias", False)
    dims = _decoder(c, t, mlp, E, F, norms=1, qk_norm=False, qkv_bias=ab, o_bias=ab,
                    dense_F=c.req("prefix_dense_intermediate_size") if "dense" in mlp else 0,
                    shared_F=F * c.opt("num_shared_experts", 0, positive=False))
    every = c.opt("sliding_window_pattern", 4)
    return _result(c, *dims, E, k, _window_kinds(c, L, lambda i: (i + 1) % every == 0), t, tied_default=True)


def jetmoe(c: Fields, t: Tally, mt: str):
    """JetMoE: a mixture of attention heads (per expert a query and an output projection of
    kv_channels·num_key_value_heads, a shared kv_proj, a router, an output bias) and a routed MLP (stacked
    experts, an output bias), top-k of E for both; the attention experts count as routed experts; tied by
    default."""
    V, H, L = c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers")
    E, k, F = c.req("num_local_experts"), c.req("num_experts_per_tok"), c.req("intermediate_size")
    N, K = c.req("num_attention_heads"), c.req("num_key_value_heads")
    Dkv = c.req("kv_channels", "head_dim") * K
    t.add("attention", linear(H, 2 * Dkv), L)  # kv_proj
    t.add("router", 2 * H * E, L)  # attention and MLP routers
    t.add("other", 2 * H, L)  # the attention and MLP output biases
    t.add("norm", 2 * H, L)
    for _ in range(L):
        t.add_routed(E * 2 * H * Dkv, E)
        t.add_routed(E * glu(H, F), E)
    arch = attention_arch(L, N, Dkv // K, 2 * Dkv, ["full_attention"] * L, None, E, k)
    return finish(t, c, V, H, tied_default=True), arch, k


FORMULAS = {"aria_text": aria_text, "jetmoe": jetmoe, "exaone_moe": exaone_moe, "solar_open": solar_open,
            "hy_v3": hy_v3, "mimo_v2_flash": mimo_v2_flash, "afmoe": afmoe, "mellum": mellum, "kolibri1": kolibri1,
            "flint": flint, "laguna": laguna, "beam": beam, "cohere2_moe": cohere2_moe}
