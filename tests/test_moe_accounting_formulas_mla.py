"""moe.accounting.formulas_mla: the DeepSeek family (MLA attention). Each formula equals transformers' own count of
the model built on the meta device (tiny configs that exercise every option, and the default configs); LongCat's
zero-computation experts; the released configs give the published sizes."""

import pytest

from moekit.moe.accounting import Plan, count_config, count_module, derive
from moekit.moe.accounting.report import conventions

from helpers import Reference, check_released, formula_vs_transformers

MLA = dict(vocab_size=64, hidden_size=16, num_attention_heads=4, pad_token_id=0, qk_nope_head_dim=4,
           qk_rope_head_dim=4, v_head_dim=6, kv_lora_rank=8)
TINY = dict(MLA, num_hidden_layers=4, intermediate_size=24, moe_intermediate_size=8, num_experts_per_tok=2)
ROUTED = dict(n_routed_experts=4, n_group=1, topk_group=1)
INDEXER = dict(q_lora_rank=12, index_n_heads=2, index_head_dim=4)

CASES = {
    "deepseek_v2": ("deepseek_v2", 2, dict(TINY, **ROUTED, n_shared_experts=2, first_k_dense_replace=1,
                                           q_lora_rank=None, mlp_bias=True)),
    "deepseek_v3": ("deepseek_v3", 2, dict(TINY, **ROUTED, n_shared_experts=1, first_k_dense_replace=1,
                                           q_lora_rank=12, attention_bias=True)),
    "deepseek_v32": ("deepseek_v32", 2, dict(TINY, **ROUTED, **INDEXER, first_k_dense_replace=2)),
    "glm_moe_dsa": ("glm_moe_dsa", 2, dict(TINY, **ROUTED, **INDEXER, first_k_dense_replace=1,
                                           index_topk_pattern="FSSF")),
    "glm4_moe_lite": ("glm4_moe_lite", 2, dict(TINY, **ROUTED, q_lora_rank=12, n_shared_experts=2)),
    "sarvam_mla": ("sarvam_mla", 2, dict(TINY, **ROUTED, first_k_dense_replace=2)),
    "axk1": ("axk1", 2, dict(TINY, **ROUTED, q_lora_rank=12, first_k_dense_replace=2)),
    "kimi_linear": ("kimi_linear", 2, dict(TINY, num_experts=4, num_experts_per_token=2, first_k_dense_replace=1,
                                           linear_attn_config=dict(full_attn_layers=[2, 4], kda_layers=[1, 3],
                                                                   head_dim=4, num_heads=2,
                                                                   short_conv_kernel_size=3))),
    "bailing_hybrid": ("bailing_hybrid", 2, dict(TINY, num_experts=4, num_experts_per_token=2, head_dim=4,
                                                 first_k_dense_replace=1, layer_group_size=2,
                                                 short_conv_kernel_size=3)),
    # 4 real experts and 2 zero-computation experts: top-3 of 6 choices, so k·E/(E + Z) = 2 real on average
    "longcat_flash": ("longcat_flash", 3, dict(MLA, num_layers=2, ffn_hidden_size=24,
                                               expert_ffn_hidden_size=8, n_routed_experts=4, zero_expert_num=2,
                                               moe_topk=3, q_lora_rank=12)),
}
WALK = {"longcat_flash": dict(real_experts=4, choices=6)}


@pytest.mark.parametrize("name", CASES)
def test_formula_equals_transformers(name):
    model_type, k, config = CASES[name]
    c, ref = formula_vs_transformers(model_type, k, WALK.get(name), **config)
    assert c.total["routed_experts"] > c.active["routed_experts"] > 0 and c.total["shared_experts"] >= 0
    if name == "longcat_flash":
        return  # below, with transformers' unused zero-expert rows
    assert c.total_params == ref.raw
    m = count_module(ref.model)
    assert (m.total_params, m.active_params, m.buffers) == (c.total_params, c.active_params, c.buffers)


def test_longcat_zero_computation_experts():
    _, k, config = CASES["longcat_flash"]
    c, ref = formula_vs_transformers("longcat_flash", k, WALK["longcat_flash"], **config)
    L, Z, H, Fe = 2, 2, 16, 8
    # transformers 5 allocates gate_up_proj for all 6 choices, 2 of them never used; released checkpoints
    # store the 4 real experts only, and so does the formula
    assert ref.raw - c.total_params == L * Z * 2 * Fe * H
    expert = 3 * H * Fe
    assert c.total["routed_experts"] == L * 4 * expert
    assert c.active["routed_experts"] == L * 2 * expert  # 3 picks of 6 choices, 4 of them real: 2 on average
    assert c.total["router"] == L * 6 * H and c.buffers == {"e_score_correction_bias": L * 6}
    lines = conventions(c)
    assert any("k/(E + Z) = 3/6" in s and "2 real experts per token on average" in s for s in lines)
    lo, hi = c.active_params - L * 2 * expert, c.active_params + L * expert
    assert any(f"ranges from {lo:,}" in s and f"to {hi:,}" in s for s in lines)
    assert c.arch.attention_layers == 2 * L  # two MLA sublayers per layer: both have a KV cache
    kv = derive(c, Plan(seq_len=100)).figure("kv_cache_bytes").value
    assert kv == 2 * L * 100 * (8 + 4) * 2


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite",
                                        "sarvam_mla", "axk1", "kimi_linear", "bailing_hybrid"])
def test_default_config_equals_transformers(model_type):
    ref = Reference(model_type, k=1)
    c = count_config(ref.config.to_dict())
    assert (c.total_params, sum(c.buffers.values())) == (ref.total, ref.buffers)


# ---- released models: config.json values (the fields that shape the model) ----------------------------------

_MLA = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512)
GLM5 = dict(_MLA, model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, num_hidden_layers=78,
            num_attention_heads=64, intermediate_size=12288, moe_intermediate_size=2048, n_routed_experts=256,
            num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=2048,
            qk_nope_head_dim=192, v_head_dim=256, index_n_heads=32, index_head_dim=128, tie_word_embeddings=False)
LONGCAT_FLASH = dict(_MLA, model_type="longcat_flash", vocab_size=131072, hidden_size=6144, num_layers=28,
                     num_attention_heads=64, ffn_hidden_size=12288, expert_ffn_hidden_size=2048, n_routed_experts=512,
                     zero_expert_num=256, moe_topk=12, q_lora_rank=1536, tie_word_embeddings=False)
KIMI_LINEAR = dict(_MLA, model_type="kimi_linear", vocab_size=163840, hidden_size=2304, num_hidden_layers=27,
                   num_attention_heads=32, intermediate_size=9216, moe_intermediate_size=1024, num_experts=256,
                   num_experts_per_token=8, num_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                   linear_attn_config=dict(head_dim=128, num_heads=32, short_conv_kernel_size=4,
                                           kda_layers=[i for i in range(1, 28) if i % 4],
                                           full_attn_layers=[4, 8, 12, 16, 20, 24]),
                   tie_word_embeddings=False)
EMB, HEAD = ("embedding",), ("embedding", "lm_head")

# name: (config, total, active as counted here, publisher's (total, active, left out of active[, of total]))
RELEASED = {
    "deepseek-ai/DeepSeek-V3.2-Exp": (dict(_MLA, model_type="deepseek_v32", vocab_size=129280, hidden_size=7168,
                                           num_hidden_layers=61, num_attention_heads=128, intermediate_size=18432,
                                           moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                                           n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=1536,
                                           index_n_heads=64, index_head_dim=128, num_nextn_predict_layers=1),
                                      671_877_929_216, 38_403_807_488, (671, 37, EMB)),
    "zai-org/GLM-5": (GLM5, 743_911_199_232, 41_784_709_632, (744, 40, EMB)),
    "zai-org/GLM-4.7-Flash": (dict(_MLA, model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048,
                                   num_hidden_layers=47, num_attention_heads=20, intermediate_size=10240,
                                   moe_intermediate_size=1536, n_routed_experts=64, num_experts_per_tok=4,
                                   n_shared_experts=1, q_lora_rank=768, qk_nope_head_dim=192, v_head_dim=256,
                                   tie_word_embeddings=False), 29_943_390_976, 3_896_763_136, (30, 3, EMB)),
    "moonshotai/Kimi-Linear-48B-A3B-Instruct": (KIMI_LINEAR, 49_133_074_464, 3_494_852_640, (48, 3, HEAD, HEAD)),
    # published: 560B total; 18.6B to 31.3B active per token, about 27B on average
    "meituan-longcat/LongCat-Flash-Chat": (LONGCAT_FLASH, 560_664_958_976, 27_954_796_544, (560, 27, EMB)),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs(name):
    config, total, active, published = RELEASED[name]
    check_released(count_config(config), total, active, published)


def test_longcat_flash_published_range():
    """LongCat-Flash's 18.6B-31.3B: from no real expert to all 12 picks real, embeddings left out."""
    c = count_config(LONGCAT_FLASH)
    base = c.active_params - c.active["routed_experts"] - c.active["embedding"]
    per_token_max = c.total["routed_experts"] * 12 // 512
    assert (round(base / 1e9, 1), round((base + per_token_max) / 1e9, 1)) == (18.7, 31.4)
    assert c.active["routed_experts"] * 768 == c.total["routed_experts"] * 12  # k/(E + Z)
