"""upcycle.recipe_file: mergekit-moe's YAML as published maps onto moekit's options key by key, moekit's own
JSON/YAML recipes are option names, flags given beside a recipe override it, and unknown keys are named."""

import json

import pytest

from moekit.llama.errors import ConfigError
from moekit.upcycle import UpcycleOptions
from moekit.upcycle.recipe_file import describe, read_recipe

# the shape of mergekit-moe configs published beside merged models (comments and all)
PUBLISHED = """\
base_model: mlabonne/Marcoro14-7B-slerp
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
experts:
  - source_model: ../laser_model_dolphin
    positive_prompts:
      - "chat"
      - "assistant"
  - source_model: ../laser_model_codeninja
    positive_prompts:
      - "code"
      - "python"
    negative_prompts:
      - "story"
  - source_model: ../laser_model_wizardm
    positive_prompts: ["reason", "math"]
"""


def test_a_published_mergekit_config(tmp_path):
    (tmp_path / "moe.yml").write_text(PUBLISHED)
    o = read_recipe(str(tmp_path / "moe.yml"))
    assert o.donors == ["../laser_model_dolphin", "../laser_model_codeninja", "../laser_model_wizardm"]
    assert (o.base, o.router_init, o.dtype, o.top_k, o.num_experts) == ("mlabonne/Marcoro14-7B-slerp", "hidden",
                                                                         "bf16", 2, 3)
    assert o.positive_prompts == ["0:chat", "0:assistant", "1:code", "1:python", "2:reason", "2:math"]
    assert o.negative_prompts == ["1:story"] and o.config == str(tmp_path / "moe.yml")
    assert o.prompts("positive") == {0: ["chat", "assistant"], 1: ["code", "python"], 2: ["reason", "math"]}
    rec = describe(str(tmp_path / "moe.yml"))
    assert rec["format"] == "mergekit-moe" and rec["text"] == PUBLISHED and len(rec["sha256"]) == 64


def test_gate_modes_shared_experts_architecture_and_overrides(tmp_path):
    (tmp_path / "a.yml").write_text("base_model: B\ngate_mode: random\nexperts_per_token: 1\ntokenizer_source: base\n"
                                    "architecture: qwen\nexperts:\n  - source_model: A\n    positive_prompts: ['']\n"
                                    "  - source_model: C\nshared_experts:\n  - source_model: S\n")
    o = read_recipe(str(tmp_path / "a.yml"))
    assert (o.router_init, o.top_k, o.format, o.shared_donor, o.positive_prompts) == ("random", 1, "qwen2_moe", "S",
                                                                                       None)  # random reads no prompts
    o = read_recipe(str(tmp_path / "a.yml"), {"num_experts": 4, "seed": 3, "top_k": 2})
    assert (o.num_experts, o.copies, o.seed, o.top_k) == (4, 2, 3, 2)
    (tmp_path / "b.yml").write_text("base_model: B\ngate_mode: cheap_embed\nexperts:\n  - source_model: A\n"
                                    "    positive_prompts: [x]\n  - source_model: C\n    positive_prompts: [y]\n"
                                    "shared_experts:\n  - source_model: S\n    positive_prompts: [z]\n")
    assert read_recipe(str(tmp_path / "b.yml")).positive_prompts == ["0:x", "1:y", "shared:z"]


def test_moekit_recipes_are_option_names_in_json_or_yaml(tmp_path):
    want = UpcycleOptions(donors=["a", "b"], base="base", router_init="cheap-embed", positive_prompts=["0:x", "1:y"],
                          recipe="noise", num_experts=4, seed=5)
    (tmp_path / "r.json").write_text(json.dumps(want.to_dict()))
    (tmp_path / "r.yaml").write_text("donors: [a, b]\nbase: base\nrouter_init: cheap-embed\nrecipe: noise\n"
                                     "num_experts: 4\nseed: 5\npositive_prompts: ['0:x', '1:y']\n")
    for name in ("r.json", "r.yaml"):
        got = read_recipe(str(tmp_path / name))
        assert {**got.to_dict(), "config": None} == want.to_dict()
    assert describe(str(tmp_path / "r.yaml"))["format"] == "moekit"


@pytest.mark.parametrize("text, message", [
    ("base_model: B\nexperts: []\n", "needs base_model and a non-empty list of experts"),
    ("base_model: B\nexperts:\n  - source_model: A\nshared_experts: [{source_model: S}, {source_model: T}]\n",
     "shared_experts a list of at most one expert"),
    ("base_model: B\ndtype: int8\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "dtype 'int8' is not one of float32"),
    ("base_model: B\narchitecture: deepseek\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "architecture 'deepseek': moekit does not write DeepSeek MoE checkpoints (remote code); architecture: qwen "
     "writes Qwen2-MoE"),
    ("base_model: B\narchitecture: qwen3\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "architecture 'qwen3': Qwen3 MoE output needs Qwen3 donors"),
    ("base_model: B\narchitecture: llama\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "architecture 'llama': expected one of mergekit-moe's mixtral, qwen, deepseek, qwen3"),
    ("base_model: B\nexperts:\n  - source_model: A\n    residual_scale: big\n  - source_model: C\n",
     "experts[0].residual_scale must be a number, got 'big'"),
    ("base_model: B\nexperts:\n  - source_model: A\n    noise_scale: -1\n  - source_model: C\n",
     "--expert-noise '0:-1': expected I:X, I the expert's index or 'shared' and X a standard deviation >= 0"),
    ("base_model: B\ntokenizer_source: union\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "tokenizer_source 'union' is not supported yet; moekit implements base"),
    ("base_model: B\nexperts_per_token: two\nexperts:\n  - source_model: A\n  - source_model: C\n",
     "--top-k must be an integer, got 'two'"),
    ("base_model: B\nexperts:\n  - source_model: 7\n", "experts[0].source_model must be a model path, got 7"),
    ("base_model: B\ngate_mode: hidden\nexperts:\n  - source_model: A\n    positive_prompts: [a]\n"
     "  - source_model: C\n", "--router-init hidden: expert 1 (donor C) has no positive prompts"),
])
def test_bad_mergekit_configs(tmp_path, text, message):
    (tmp_path / "m.yml").write_text(text)
    with pytest.raises(ConfigError, match="^" + str(tmp_path / "m.yml")) as e:
        read_recipe(str(tmp_path / "m.yml"))
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="recipe file not found"):
        read_recipe(str(tmp_path / "missing.yml"))
