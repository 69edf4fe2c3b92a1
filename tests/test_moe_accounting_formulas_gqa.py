"""moe.accounting.formulas_gqa: the other GQA-attention MoE families of transformers 5. Each formula equals
transformers' own count of the model built on the meta device, on tiny configs that exercise every option and on
the default configs."""

import pytest

from moekit.moe.accounting import count_config, count_module
from moekit.moe.accounting.formulas_gqa import FORMULAS

from helpers import Reference, check_released, formula_vs_transformers

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, head_dim=8, moe_intermediate_size=8, num_experts_per_tok=2)

# AFMoE and Laguna, whose router biases are frozen parameters, are in test_moe_accounting_biases.py
CASES = {
    "aria_text": ("aria_text", 2, dict(TINY, intermediate_size=8, moe_num_experts=4, moe_topk=2,
                                       moe_num_shared_experts=1, attention_bias=True, mlp_bias=True)),
    "exaone_moe": ("exaone_moe", 2, dict(TINY, intermediate_size=24, num_experts=4, num_shared_experts=2,
                                         first_k_dense_replace=2, sliding_window=8, sliding_window_pattern=2)),
    "solar_open": ("solar_open", 2, dict(TINY, n_routed_experts=4, n_shared_experts=1, attention_bias=True)),
    "hy_v3": ("hy_v3", 2, dict(TINY, intermediate_size=24, num_experts=4, num_shared_experts=1,
                               attention_bias=True, mlp_bias=True)),
    "jetmoe": ("jetmoe", 2, dict({k: v for k, v in TINY.items() if k != "head_dim"}, kv_channels=4,
                                 intermediate_size=8, num_local_experts=4)),
    "mimo_v2_flash": ("mimo_v2_flash", 2, dict(TINY, intermediate_size=24, n_routed_experts=4, v_head_dim=6,
                                               sliding_window=8, layer_types=["full_attention", "sliding_attention",
                                                                              "sliding_attention", "full_attention"])),
    "mellum": ("mellum", 2, dict(TINY, intermediate_size=24, num_local_experts=4,
                                 mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    "kolibri1": ("kolibri1", 2, dict(TINY, num_local_experts=4, shared_expert_intermediate_size=12,
                                     sliding_window=8)),
    "flint": ("flint", 2, dict(TINY, intermediate_size=24, num_experts=4, shared_expert_intermediate_size=12,
                               mlp_only_layers=[0], decoder_sparse_step=1, sliding_window=8)),
    "beam": ("beam", 2, dict(TINY, intermediate_size=24, num_experts=4, n_group=1, topk_group=1, sliding_window=8,
                             mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    "cohere2_moe": ("cohere2_moe", 2, dict(TINY, intermediate_size=8, num_experts=4, num_shared_experts=1,
                                           first_k_dense_replace=1, prefix_dense_intermediate_size=24,
                                           sliding_window=8)),
}


@pytest.mark.parametrize("name", CASES)
def test_formula_equals_transformers(name):
    model_type, k, config = CASES[name]
    c, ref = formula_vs_transformers(model_type, k, **config)
    assert c.total_params == ref.raw
    assert c.total["routed_experts"] > c.active["routed_experts"] > 0
    m = count_module(ref.model)
    assert (m.total_params, m.active_params, m.buffers) == (c.total_params, c.active_params, c.buffers)


@pytest.mark.parametrize("model_type", [mt for mt in FORMULAS if mt not in ("afmoe", "laguna")])
def test_default_config_equals_transformers(model_type):
    ref = Reference(model_type, k=1)
    c = count_config(ref.config.to_dict())
    assert (c.total_params, sum(c.buffers.values())) == (ref.total, ref.buffers)


# ---- released models: config.json values (the fields that shape the model) ----------------------------------

EMB = ("embedding",)
# name: (config, total, active as counted here, publisher's (total, active, left out of active))
RELEASED = {
    "XiaomiMiMo/MiMo-V2-Flash": (dict(model_type="mimo_v2_flash", vocab_size=152576, hidden_size=4096,
                                      num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=4,
                                      head_dim=192, v_head_dim=128, intermediate_size=16384,
                                      moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                                      tie_word_embeddings=False), 308_778_768_832, 15_445_924_288, (309, 15, ())),
    "upstage/Solar-Open-100B": (dict(model_type="solar_open", vocab_size=196608, hidden_size=4096,
                                     num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8,
                                     head_dim=128, moe_intermediate_size=1280, n_routed_experts=128,
                                     num_experts_per_tok=8, n_shared_experts=1, tie_word_embeddings=False),
                                102_651_793_408, 12_054_827_008, (102, 12, EMB)),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs(name):
    config, total, active, published = RELEASED[name]
    check_released(count_config(config), total, active, published)
