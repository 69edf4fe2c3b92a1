"""moe.accounting.formulas_moe: MoE models with GQA attention. Each formula equals transformers' own count of the
model built on the meta device (tiny configs that exercise every option, and the default configs), and the
released configs give the published sizes."""

import pytest

from moekit.moe.accounting import Plan, count_config, count_module, derive
from moekit.moe.accounting.report import conventions

from helpers import Reference, check_released, formula_vs_transformers

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0)

# name: (model_type, k for the independent walk, config as config.json would hold it); ERNIE 4.5, whose router
# bias is a frozen parameter, is in test_moe_accounting_biases.py
CASES = {
    "gpt_oss": ("gpt_oss", 2, dict(TINY, intermediate_size=8, head_dim=8, num_local_experts=4,
                                   num_experts_per_tok=2, sliding_window=8)),
    "llama4_text": ("llama4_text", 1, dict(TINY, intermediate_size=8, intermediate_size_mlp=24, head_dim=4,
                                           num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                           attention_bias=True)),
    "glm4_moe": ("glm4_moe", 2, dict(TINY, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4,
                                     num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
                                     attention_bias=True, use_qk_norm=True, head_dim=8)),
    "sarvam_moe": ("sarvam_moe", 2, dict(TINY, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4,
                                         num_experts_per_tok=2, head_dim=8)),
    "phimoe": ("phimoe", 2, dict(TINY, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                 attention_bias=True, lm_head_bias=True)),
    "granitemoe": ("granitemoe", 2, dict(TINY, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                         attention_bias=True)),
    "granitemoeshared": ("granitemoeshared", 1, dict(TINY, intermediate_size=8, num_local_experts=4,
                                                     num_experts_per_tok=1, shared_intermediate_size=12,
                                                     tie_word_embeddings=True)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", [2, 1, 2, 3], dict(TINY, intermediate_size=8, num_experts=4, head_dim=4,
                                                            moe_topk=[2, 1, 2, 3], attention_bias=True)),
    "dots1": ("dots1", 2, dict(TINY, intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4,
                               num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, sliding_window=8,
                               max_window_layers=2)),
    "flex_olmo": ("flex_olmo", 2, dict(TINY, intermediate_size=8, num_experts=4, num_experts_per_tok=2)),
    "minimax_m2": ("minimax_m2", 2, dict(TINY, intermediate_size=8, head_dim=8, num_local_experts=4,
                                         num_experts_per_tok=2)),
}


@pytest.mark.parametrize("name", CASES)
def test_formula_equals_transformers(name):
    model_type, k, config = CASES[name]
    c, ref = formula_vs_transformers(model_type, k, **config)
    assert c.total_params == ref.raw
    assert c.total["routed_experts"] > c.active["routed_experts"] > 0 and c.total["router"] > 0
    if isinstance(k, list):
        return  # the module walk takes one k for all layers
    m = count_module(ref.model)  # the module walk of moe.accounting.sources agrees too
    assert (m.total_params, m.active_params, m.buffers) == (c.total_params, c.active_params, c.buffers)


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "glm4_moe", "sarvam_moe", "phimoe", "granitemoe",
                                        "flex_olmo", "minimax_m2"])
def test_default_config_equals_transformers(model_type):
    """The full-size default configs (each close to a released model), built on the meta device."""
    ref = Reference(model_type, k=1)
    c = count_config(ref.config.to_dict())
    assert (c.total_params, sum(c.buffers.values())) == (ref.total, ref.buffers)


# ---- released models: config.json values (the fields that shape the model) ----------------------------------

GPT_OSS_120B = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
                    num_local_experts=128, num_experts_per_tok=4, sliding_window=128, attention_bias=True,
                    tie_word_embeddings=False)
LLAMA4_SCOUT = dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, num_hidden_layers=48,
                    num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
                    intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
                    interleave_moe_layer_step=1, tie_word_embeddings=False)
GLM45 = dict(model_type="glm4_moe", vocab_size=151552, hidden_size=5120, num_hidden_layers=92, num_attention_heads=96,
             num_key_value_heads=8, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
             n_routed_experts=160, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3,
             attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=1, tie_word_embeddings=False)
ERNIE45_21B = dict(model_type="ernie4_5_moe", vocab_size=103424, hidden_size=2560, num_hidden_layers=28,
                   num_attention_heads=20, num_key_value_heads=4, intermediate_size=12288, moe_intermediate_size=1536,
                   moe_num_experts=64, moe_k=6, moe_num_shared_experts=2, moe_layer_start_index=1,
                   moe_layer_end_index=27, use_bias=False, tie_word_embeddings=True)
GRANITE30_3B = dict(model_type="granitemoe", vocab_size=49155, hidden_size=1536, num_hidden_layers=32,
                    num_attention_heads=24, num_key_value_heads=8, intermediate_size=512, num_local_experts=40,
                    num_experts_per_tok=8, tie_word_embeddings=True)
EMB, HEAD = ("embedding",), ("embedding", "lm_head")

# name: (config, total, active as counted here, publisher's (total, active, left out of active[, of total]))
RELEASED = {
    "openai/gpt-oss-120b": (GPT_OSS_120B, 116_829_156_672, 5_711_982_912, (116.83, 5.13, EMB)),
    "openai/gpt-oss-20b": (dict(GPT_OSS_120B, num_hidden_layers=24, num_local_experts=32), 20_914_757_184,
                           4_187_440_704, (20.91, 3.61, EMB)),
    # 109B with the vision encoder, which a text_config count leaves out
    "meta-llama/Llama-4-Scout-17B-16E": (LLAMA4_SCOUT, 107_769_861_120, 17_172_894_720, None),
    "meta-llama/Llama-4-Maverick-17B-128E": (dict(LLAMA4_SCOUT, num_local_experts=128, interleave_moe_layer_step=2),
                                             400_711_848_960, 17_184_691_200, (400, 17, ())),
    # published 355B: with the multi-token-prediction layer, which transformers does not build
    "zai-org/GLM-4.5": (GLM45, 352_797_814_784, 33_632_251_904, None),
    "zai-org/GLM-4.5-Air": (dict(GLM45, hidden_size=4096, num_hidden_layers=46, intermediate_size=10944,
                                 moe_intermediate_size=1408, n_routed_experts=128, first_k_dense_replace=1,
                                 use_qk_norm=False), 106_852_245_504, 13_424_123_904, (106, 12, EMB)),
    "microsoft/Phi-3.5-MoE-instruct": (dict(model_type="phimoe", vocab_size=32064, hidden_size=4096,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                            intermediate_size=6400, num_local_experts=16, num_experts_per_tok=2,
                                            attention_bias=True, lm_head_bias=True, tie_word_embeddings=False),
                                       41_873_153_344, 6_640_999_744, (41.9, 6.6, ())),
    "ibm-granite/granite-3.0-3b-a800m": (GRANITE30_3B, 3_298_793_472, 882_874_368, (3.3, 0.8, EMB)),
    "ibm-granite/granite-3.0-1b-a400m": (dict(GRANITE30_3B, hidden_size=1024, num_hidden_layers=24,
                                              num_attention_heads=16, num_local_experts=32),
                                         1_334_628_352, 428_658_688, (1.3, 0.4, ())),
    "baidu/ERNIE-4.5-21B-A3B": (ERNIE45_21B, 21_825_437_888, 3_352_150_208, (21, 3, ())),
    "baidu/ERNIE-4.5-300B-A47B": (dict(ERNIE45_21B, hidden_size=8192, num_hidden_layers=54, num_attention_heads=64,
                                       num_key_value_heads=8, intermediate_size=28672, moe_intermediate_size=3584,
                                       moe_k=8, moe_num_shared_experts=0, moe_layer_start_index=3,
                                       moe_layer_end_index=53, tie_word_embeddings=False),
                                  299_484_163_264, 47_926_586_560, (300, 47, ())),
    "tencent/Hunyuan-A13B-Instruct": (dict(model_type="hunyuan_v1_moe", vocab_size=128167, hidden_size=4096,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                           head_dim=128, intermediate_size=3072, num_experts=64, moe_topk=8,
                                           tie_word_embeddings=True), 80_393_183_232, 12_747_448_320, (80, 13, ())),
    "rednote-hilab/dots.llm1.base": (dict(model_type="dots1", vocab_size=152064, hidden_size=4096,
                                          num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=32,
                                          intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128,
                                          num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                                          tie_word_embeddings=False), 142_774_373_888, 14_016_581_120,
                                     (142, 14, ())),
    # published 230B total: with its multi-token-prediction modules, which transformers does not build
    "MiniMaxAI/MiniMax-M2": (dict(model_type="minimax_m2", vocab_size=200064, hidden_size=3072, num_hidden_layers=62,
                                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, intermediate_size=1536,
                                  num_local_experts=256, num_experts_per_tok=8, tie_word_embeddings=False),
                             228_689_748_992, 11_030_537_216, None),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs(name):
    config, total, active, published = RELEASED[name]
    check_released(count_config(config), total, active, published)


def test_glm45_layout_and_mtp_note():
    c = count_config(GLM45)
    assert c.total["dense_ffn"] == 3 * 3 * 5120 * 12288  # first_k_dense_replace = 3
    assert c.total["routed_experts"] == 89 * 160 * 3 * 5120 * 1536
    assert c.active["routed_experts"] == 89 * 8 * 3 * 5120 * 1536
    assert c.total["shared_experts"] == 89 * 3 * 5120 * 1536 and c.buffers == {"e_score_correction_bias": 89 * 160}
    assert any("multi-token-prediction" in n and "not counted" in n for n in c.notes)


def test_gpt_oss_sliding_window_layers_in_flops_and_kv_cache(capsys):
    c = count_config(GPT_OSS_120B)
    assert (c.arch.sliding_window, c.arch.sliding_layers, c.arch.attention_layers) == (128, 18, None)
    r = derive(c, Plan(seq_len=4096))
    context = 18 * 4096 + 18 * 128  # 18 full-attention layers, 18 over the 128-token window
    assert r.figure("kv_cache_bytes").value == context * 2 * 8 * 64 * 2
    assert r.figure("forward_flops_per_token").value == 2 * c.matmul_active_params + 2 * context * 64 * (64 + 64)
    assert "(18 × 4096 + 18 × 128)" in r.figure("kv_cache_bytes").detail
    assert any("128-token sliding window in 18 attention layers" in s for s in conventions(c))
