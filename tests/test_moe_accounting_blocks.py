"""moe.accounting.blocks: the pieces the formulas are built from, by hand."""

import pytest

from moekit.llama.errors import ConfigError
from moekit.moe.accounting.blocks import Fields, Tally, attention_arch, finish, glu, gqa, mamba2


def test_tally_routed_active_per_layer_k_and_zero_experts():
    t = Tally()
    t.add_routed(8 * 30, 8)  # the model's k
    t.add_routed(8 * 30, 8, top_k=1)  # a layer with its own k
    t.add_routed(4 * 30, 4, zero_experts=2)  # k = 2 of 4 real + 2 zero-computation choices: 4/3 real on average
    c = t.result(2, target="t", source="config")
    assert c.total["routed_experts"] == 20 * 30
    assert c.active["routed_experts"] == 2 * 30 + 1 * 30 + 40  # 4 · 30 · 2/6 = 40
    with pytest.raises(ConfigError, match="do not split evenly into 8 experts"):
        t.add_routed(7, 8)
        t.result(2, target="t", source="config")


def test_tally_buffers_are_not_parameters():
    t = Tally()
    t.add("router", 64)
    t.buffer("e_score_correction_bias", 8)
    t.buffer("e_score_correction_bias", 8)
    c = t.result(0, target="t", source="config")
    assert c.total_params == 64 and c.buffers == {"e_score_correction_bias": 16}


def test_fields_per_layer_renames_legacy_kinds_and_checks():
    c = Fields({"layer_types": ["mamba", "attention", "deepseek_sparse_attention"]}, "config.json")
    assert c.per_layer("layer_types", 3, None) == ["linear_attention", "full_attention", "indexed_attention"]
    assert c.per_layer("mlp_layer_types", 2, lambda i: "dense" if i == 0 else "sparse") == ["dense", "sparse"]
    with pytest.raises(ConfigError, match="config.json: field 'layer_types' must be a list of 4 layer kinds"):
        c.per_layer("layer_types", 4, None)
    with pytest.raises(ConfigError, match="config.json: required field 'mlp_layer_types' is missing"):
        c.per_layer("mlp_layer_types", 3, None)


def test_fields_nullable_and_flag():
    c = Fields({"q_lora_rank": None, "attention_bias": True, "kv_lora_rank": 0}, "c")
    assert c.nullable("q_lora_rank", 1536) is None and c.nullable("absent", 1536) == 1536
    assert c.flag("attention_bias", False) is True and c.flag("mlp_bias", False) is False
    with pytest.raises(ConfigError, match="field 'kv_lora_rank' must be a positive integer, got 0"):
        c.nullable("kv_lora_rank", None)


def test_pieces_by_hand():
    assert glu(16, 24, bias=True) == 3 * 16 * 24 + 2 * 24 + 16
    assert gqa(16, 4, 2, 4, qkv_bias=True) == 16 * 16 + 2 * 16 * 8 + 16 * 16 + 16 + 2 * 8
    # Mamba-2, H 16, inner 32, 4 heads, 1 group, state 8, conv 4: in_proj makes x 32, z 32, B 8, C 8, dt 4
    conv_dim = 32 + 2 * 8
    assert mamba2(16, 32, 4, 1, 8, 4) == 16 * (32 + conv_dim + 4) + conv_dim * 4 + conv_dim + 3 * 4 + 32 * 16


def test_finish_tied_head_keeps_its_bias():
    t = Tally()
    assert finish(t, Fields({"tie_word_embeddings": True}, "c"), 10, 4, head_bias=True)
    assert (t.total["embedding"], t.total["lm_head"], t.total["norm"]) == (40, 10, 4)


def test_attention_arch_counts_attention_and_window_layers():
    kinds = ["linear_attention", "sliding_attention", "full_attention", "sliding_attention"]
    a = attention_arch(4, 8, 16, 64, kinds, 128)
    assert (a.attention_layers, a.sliding_layers, a.sliding_window) == (3, 2, 128)
    a = attention_arch(2, 8, 16, 64, ["full_attention"] * 2, 128)  # a window no layer uses
    assert (a.attention_layers, a.sliding_layers, a.sliding_window) == (None, None, None)
