"""moe.accounting.formulas_hybrid: MoE models mixing softmax attention with Mamba, gated delta-net or lightning
attention. Each formula equals transformers' own count of the model built on the meta device (tiny configs that
exercise every option, and the default configs); only the attention layers have a KV cache."""

import pytest

from moekit.moe.accounting import Plan, count_config, count_module, derive
from moekit.moe.accounting.report import conventions

from helpers import Reference, check_released, formula_vs_transformers

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=3,
              position_embedding_type="rope")
DELTA = dict(head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=4,
             linear_value_head_dim=6, linear_conv_kernel_dim=3, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=8, shared_expert_intermediate_size=12)

CASES = {
    "jamba": ("jamba", 2, dict(TINY, intermediate_size=8, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                               attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, mamba_d_state=4,
                               mamba_dt_rank=3, mamba_proj_bias=True, use_mamba_kernels=False)),
    # released Granite 4.0 configs use the legacy layer kinds 'mamba' / 'attention'
    "granitemoehybrid": ("granitemoehybrid", 2, dict(TINY, **MAMBA2, layer_types=["mamba", "attention"] * 2,
                                                     intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                                     shared_intermediate_size=12, attention_bias=True)),
    "granitemoehybrid-dense": ("granitemoehybrid", 0, dict(TINY, **MAMBA2, layer_types=["mamba"] * 3 + ["attention"],
                                                           num_local_experts=0, shared_intermediate_size=12,
                                                           tie_word_embeddings=True)),
    "qwen3_next": ("qwen3_next", 2, dict(TINY, **DELTA, intermediate_size=24, mlp_only_layers=[0],
                                         full_attention_interval=2)),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", 2, dict(TINY, **DELTA)),
    "minimax": ("minimax", 2, dict(TINY, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                   layer_types=["linear_attention"] * 3 + ["full_attention"])),
    "lara_mini": ("lara_mini", 2, dict(TINY, **DELTA, num_hidden_layers=5, sliding_window=8)),
    # the released configs' hybrid_override_pattern: M Mamba-2, E routed, * attention, - MLP
    "nemotron_h": ("nemotron_h", 2, dict(TINY, num_hidden_layers=None, hybrid_override_pattern="ME*-ME",
                                         head_dim=4, mamba_num_heads=4, mamba_head_dim=4, n_groups=2,
                                         ssm_state_size=4, intermediate_size=24, n_routed_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=8,
                                         moe_shared_expert_intermediate_size=12, moe_latent_size=8, mlp_bias=True)),
    "lfm2_moe": ("lfm2_moe", 2, dict(TINY, layer_types=["conv", "conv", "full_attention", "conv"], conv_bias=True,
                                     intermediate_size=24, moe_intermediate_size=8, num_experts=4,
                                     num_experts_per_tok=2, num_dense_layers=1, tie_embedding=False)),
}


@pytest.mark.parametrize("name", CASES)
def test_formula_equals_transformers(name):
    model_type, k, config = CASES[name]
    config = {key: v for key, v in config.items() if v is not None}  # None: leave the field out
    c, ref = formula_vs_transformers(model_type, k, **config)
    assert c.total_params == ref.raw
    assert c.arch.attention_layers < c.arch.num_hidden_layers
    m = count_module(ref.model)
    assert (m.total_params, m.active_params) == (c.total_params, c.active_params)


def test_kv_cache_and_attention_flops_count_attention_layers_only():
    c = count_config(dict(CASES["minimax"][2], model_type="minimax"))
    assert c.arch.attention_layers == 1
    r = derive(c, Plan(seq_len=100, batch=2))
    assert r.figure("kv_cache_bytes").value == 2 * 1 * 100 * (2 * 2 * 4) * 2
    attn = 2 * 1 * 100 * 4 * (4 + 4)
    assert r.figure("forward_flops_per_token").value == 2 * c.matmul_active_params + attn
    assert any("only the 1 softmax-attention layers have a KV cache" in s for s in conventions(c))


@pytest.mark.parametrize("model_type", ["jamba", "granitemoehybrid", "qwen3_next", "qwen3_5_moe_text", "minimax",
                                        "lara_mini", "nemotron_h"])
def test_default_config_equals_transformers(model_type):
    ref = Reference(model_type, k=1)
    c = count_config(ref.config.to_dict())
    assert c.total_params == ref.total


# ---- released models: config.json values (the fields that shape the model) ----------------------------------

JAMBA = dict(model_type="jamba", vocab_size=65536, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, intermediate_size=14336, num_experts=16, num_experts_per_tok=2,
             attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16,
             mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256, tie_word_embeddings=False)
QWEN3_NEXT = dict(model_type="qwen3_next", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=5120,
                  moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512,
                  num_experts_per_tok=10, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                  linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
                  tie_word_embeddings=False)
MINIMAX_TEXT_01 = dict(model_type="minimax", vocab_size=200064, hidden_size=6144, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=9216,
                       num_local_experts=32, num_experts_per_tok=2, tie_word_embeddings=False,
                       layer_types=["full_attention" if i % 8 == 7 else "linear_attention" for i in range(80)])
GRANITE4_H_TINY = dict(model_type="granitemoehybrid", vocab_size=100352, hidden_size=1536, num_hidden_layers=40,
                       num_attention_heads=12, num_key_value_heads=4, intermediate_size=512,
                       shared_intermediate_size=1024, num_local_experts=64, num_experts_per_tok=6, mamba_n_heads=48,
                       mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_d_conv=4,
                       tie_word_embeddings=True,
                       layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)])
LFM2_8B = dict(model_type="lfm2_moe", vocab_size=65536, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=7168, moe_intermediate_size=1792, num_experts=32,
               num_experts_per_tok=4, num_dense_layers=2, conv_L_cache=3, tie_embedding=True,
               layer_types=["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)])
EMB, HEAD = ("embedding",), ("embedding", "lm_head")

# name: (config, total, active as counted here, publisher's (total, active, left out of active[, of total]))
RELEASED = {
    "ai21labs/Jamba-v0.1": (JAMBA, 51_570_323_328, 12_110_311_296, (52, 12, ())),
    "ai21labs/AI21-Jamba-1.5-Large": (dict(JAMBA, hidden_size=8192, num_hidden_layers=72, num_attention_heads=64,
                                           intermediate_size=24576, mamba_dt_rank=512),
                                      398_555_145_696, 94_149_338_592, (398, 94, ())),
    "ibm-granite/granite-4.0-h-tiny": (GRANITE4_H_TINY, 6_939_037_248, 1_465_470_528, (7, 1, EMB)),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": (QWEN3_NEXT, 79_674_391_296, 3_874_929_408, (80, 3, EMB)),
    "Qwen/Qwen3.5-35B-A3B (text_config)": (dict(QWEN3_NEXT, model_type="qwen3_5_moe_text", vocab_size=248320,
                                                num_hidden_layers=40, num_experts=256, num_experts_per_tok=8),
                                           34_660_610_688, 3_454_988_928, (35, 3, EMB)),
    # its 45.9B active leaves out the embedding and the LM head; its 456B total does not
    "MiniMaxAI/MiniMax-Text-01-hf": (MINIMAX_TEXT_01, 456_089_655_296, 48_403_306_496, (456, 45.9, HEAD)),
    "LiquidAI/LFM2-8B-A1B": (LFM2_8B, 8_339_929_856, 1_557_740_288, (8.3, 1.5, ())),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs(name):
    config, total, active, published = RELEASED[name]
    check_released(count_config(config), total, active, published)


def test_qwen35_multimodal_config_counts_its_text_config():
    wrapper = dict(model_type="qwen3_5_moe", text_config=RELEASED["Qwen/Qwen3.5-35B-A3B (text_config)"][0],
                   vision_config={"depth": 27})
    c = count_config(wrapper, "config.json")
    assert c.total_params == 34_660_610_688 and c.target == "config.json"
    assert any("text_config" in n and "vision encoder" in n for n in c.notes)
