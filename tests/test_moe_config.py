"""moe.config: MoEConfig fields, presets, Hugging Face Mixtral / Qwen2-MoE config.json names, bad configs."""

import pytest
import torch

from moekit.llama.errors import ConfigError
from moekit.moe import MoEConfig, MoEForCausalLM

# mistralai/Mixtral-8x7B-v0.1/config.json as released
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
                "use_cache": True, "vocab_size": 32000}


def small(**kw):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("fields, words", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok (9) must be at most num_local_experts (8)"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=-1.5), "capacity_factor"),
    (dict(mlp_only_layers=[4]), "mlp_only_layers entry 4"),
    (dict(mlp_only_layers=[-1]), "mlp_only_layers entry -1"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(num_local_experts=0), "num_local_experts"),
    (dict(router_score="tanh"), "router_score 'tanh'"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(router_jitter_noise=-0.1), "router_jitter_noise"),
    (dict(router_aux_loss_coef=-1), "router_aux_loss_coef"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
])
def test_bad_configs_fail_at_construction_with_one_line(fields, words):
    with pytest.raises(ConfigError) as e:
        small(**fields)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_layer_index_out_of_range():
    with pytest.raises(ConfigError, match=r"layer index 4 is out of range \[0, 4\)"):
        small().is_moe_layer(4)


def test_which_layers_are_moe():
    assert small().moe_layers == [0, 1, 2, 3]
    assert small(decoder_sparse_step=2).moe_layers == [1, 3]
    assert small(mlp_only_layers=[0, 2]).moe_layers == [1, 3]
    assert small(first_k_dense_replace=1).moe_layers == [1, 2, 3]
    model = MoEForCausalLM(small(first_k_dense_replace=1, num_local_experts=4))
    assert type(model.model.layers[0].mlp).__name__ == "MLP"
    assert type(model.model.layers[1].mlp).__name__ == "MoEFeedForward"


def test_defaults_and_derived_fields():
    c = small(num_shared_experts=2, moe_intermediate_size=8)
    assert c.shared_expert_intermediate_size == 16 and c.has_shared_expert
    assert small().moe_intermediate_size == 24  # = intermediate_size
    assert small(qkv_bias=True).attention_qkv_bias and not small().attention_qkv_bias
    assert small(capacity_factor=1.25, num_local_experts=4).capacity(10) == 7  # ceil(1.25 * 10 * 2 / 4)


def test_reads_released_mixtral_config_and_preset_matches():
    c = MoEConfig.from_dict(MIXTRAL_8X7B)
    preset = MoEConfig.from_name("mixtral-8x7b")
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "num_local_experts", "num_experts_per_tok", "rope_theta", "moe_intermediate_size",
              "rms_norm_eps", "max_position_embeddings", "router_aux_loss_coef"):
        assert getattr(c, f) == getattr(preset, f), f
    assert c.moe_layers == list(range(32)) and not c.has_shared_expert and c.norm_topk_prob
    with torch.device("meta"):
        model = MoEForCausalLM(preset)
    assert round(model.num_parameters() / 1e9, 1) == 46.7  # Mixtral 8x7B: 46.7B parameters


def test_reads_qwen2_moe_config_names():
    d = {"model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 40,
         "num_hidden_layers": 4, "num_attention_heads": 2, "num_experts": 6, "num_experts_per_tok": 2,
         "moe_intermediate_size": 8, "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2,
         "mlp_only_layers": [3], "use_sliding_window": False}
    c = MoEConfig.from_dict(d)
    assert c.num_local_experts == 6 and c.moe_layers == [1] and c.has_shared_expert and c.shared_expert_gate
    assert c.attention_qkv_bias and not c.norm_topk_prob  # Qwen2-MoE's defaults
    with pytest.raises(ConfigError, match="sliding-window"):
        MoEConfig.from_dict({**d, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        MoEConfig.from_dict({**d, "model_type": "llama"})


def test_own_config_round_trip_and_from_dense():
    from moekit.llama import LlamaConfig

    c = small(num_shared_experts=1, shared_expert_gate=True, router_score="sigmoid", capacity_factor=1.5,
              router_bias_update_rate=1e-3, mlp_only_layers=[2])
    back = MoEConfig.from_dict(c.to_dict())
    assert back == c and back.model_type == "moe"
    dense = LlamaConfig.from_name("tiny")
    moe = MoEConfig.from_dense(dense, num_local_experts=4)
    assert moe.hidden_size == dense.hidden_size and moe.moe_intermediate_size == dense.intermediate_size


def test_presets():
    for name in ("tiny-moe", "tiny-moe-shared", "tiny-moe-8x2", "qwen1.5-moe-a2.7b"):
        MoEConfig.from_name(name)
    with pytest.raises(ConfigError, match="unknown preset"):
        MoEConfig.from_name("mixtral-9x9b")
