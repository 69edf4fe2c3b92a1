"""llama.config: config.json round trips (both rope styles), presets and their published sizes, bad fields."""

import json

import pytest
import torch

from moekit.llama import ConfigError, Llama, LlamaConfig
from moekit.llama.config import LLAMA_PRESETS, PUBLISHED_SIZES_B


def test_hf_config_round_trips_exactly(tmp_path):
    import transformers

    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}, rope_theta=500000.0)
    hf.save_pretrained(tmp_path)  # transformers 5 writes rope_parameters with rope_theta inside
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw
    cfg = LlamaConfig.from_json(tmp_path / "config.json")
    assert cfg.rope_theta == 500000.0 and cfg.rope_type == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert json.loads(cfg.to_json()) == raw
    assert list(json.loads(cfg.to_json())) == list(raw)  # key order kept too
    assert cfg.extra["transformers_version"] == raw["transformers_version"]  # unknown keys kept


def test_legacy_rope_scaling_style_round_trips():
    meta = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
            "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "model_type": "llama", "some_future_key": [1, 2]}
    cfg = LlamaConfig.from_dict(meta)
    assert cfg.to_dict() == meta and cfg.head_dim == 16 and cfg.num_key_value_heads == 4
    changed = cfg.replace(num_hidden_layers=3).to_dict()
    assert changed["num_hidden_layers"] == 3 and changed["some_future_key"] == [1, 2]


@pytest.mark.parametrize("bad, message", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "must be a multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_invalid_fields_are_refused(bad, message):
    d = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 10, **bad}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(d)


def test_missing_field_and_other_architecture():
    with pytest.raises(ConfigError, match="required field 'hidden_size' is missing"):
        LlamaConfig.from_dict({"intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
                               "vocab_size": 1})
    with pytest.raises(ConfigError, match="model_type 'mixtral' is not supported by LlamaConfig"):
        LlamaConfig.from_dict({"model_type": "mixtral", "hidden_size": 8})
    with pytest.raises(ConfigError, match="unknown preset 'llama9-1b'"):
        LlamaConfig.from_name("llama9-1b")


def meta_params(name: str) -> int:
    with torch.device("meta"):
        return Llama(LlamaConfig.from_name(name)).num_parameters()


@pytest.mark.parametrize("name", ["llama1-7b", "llama1-13b", "llama1-33b", "llama1-65b"])
def test_llama1_sizes_to_the_printed_tenth(name):
    # The paper truncates to 0.1B: 65,285,660,672 parameters print as 65.2B.
    assert meta_params(name) // 10**8 == round(PUBLISHED_SIZES_B[name] * 10)


@pytest.mark.parametrize("name", ["llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-405b"])
def test_other_presets_within_two_percent_of_nominal(name):
    assert abs(meta_params(name) / 1e9 / PUBLISHED_SIZES_B[name] - 1) < 0.02


def test_llama2_7b_is_the_released_count():
    # "7B" is nominal: the released model has 6,738,415,616 parameters, 3.7% under 7e9 (see README).
    assert meta_params("llama2-7b") == 6_738_415_616


def test_every_preset_builds():
    for name in LLAMA_PRESETS:
        cfg = LlamaConfig.from_name(name)
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
