"""moe.accounting, hostile files and counts through `moekit params`: names and values from a safetensors header
or a config.json are shown escaped and cut (never a raw newline or terminal escape, never a 5 MB line); a top-k
above the routed experts and a count that is infinite or absurd are refused in one line (tests/hostile.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import moekit
from hostile import refused

EVIL = "evil\x1b[31m\nX"  # a newline and a terminal escape sequence
EXPERT = "model.layers.0.mlp.experts.{}.\x1b[2J\nw1.weight"


def checkpoint(path, config: dict, expert_name: str = EXPERT):
    """A checkpoint directory of two experts' tensors (named by `expert_name`) and an embedding."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": torch.zeros(16, 8)}
    tensors.update({expert_name.format(e): torch.zeros(4, 8) for e in range(2)})
    save_file(tensors, path / "model.safetensors")
    return path


def test_names_from_a_checkpoint_are_shown_escaped_in_the_table(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt", {"model_type": EVIL, "num_local_experts": 2, "num_experts_per_tok": 1})
    rc, out, err = moekit(capsys, "params", ckpt)
    assert rc == 0 and err == "", err
    lines = out.split("\n")
    assert lines[0] == (f"{ckpt} (checkpoint, model_type 'evil\\x1b[31m\\nX'): 192 parameters (192), 160 active per "
                        "token (160)")
    assert ("  note: model_type 'evil\\x1b[31m\\nX' has no formula: total exact from the safetensors headers; "
            "components classified by tensor name, routed experts by name and shape (experts.N.* or stacked "
            "[E, ...]; E = 2 and k = 1 from config.json); no attention FLOPs or KV cache") in lines
    assert all(line.isprintable() for line in lines)


@pytest.mark.parametrize("name", [EXPERT, "model.layers.0.mlp.experts.{}." + "\x1b" * 5_000_000 + ".weight"],
                         ids=["escapes", "5MB"])
def test_a_tensor_name_in_an_error_is_escaped_and_cut(name, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt", {"model_type": "custom"}, name)  # experts, but no expert count
    err = refused(capsys, "params", ckpt, watch=[ckpt])
    assert "tensor 'model.layers.0.mlp.experts.0." in err and "is a routed expert, but config.json names no" in err
    assert ("\\x1b[2J\\nw1.weight'" in err) if name == EXPERT else ("(5,000,036 characters)" in err and len(err) < 800)


@pytest.mark.parametrize("field", ["model_type", "hidden_size"])
def test_a_5mb_config_value_makes_a_short_line(field, tmp_path, capsys):
    config = {"model_type": "mixtral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2}
    config[field] = "\x1b[2J\n" * 1_000_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = refused(capsys, "params", tmp_path / "config.json", watch=[tmp_path / "config.json"])
    assert "'\\x1b[2J\\n\\x1b[2J\\n" in err and "(5,000,000 characters)" in err and len(err) < 1100


MIXTRAL = {"model_type": "mixtral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 100}
QWEN2_MOE = {"model_type": "qwen2_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 9,
             "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8}


@pytest.mark.parametrize("config", [MIXTRAL, QWEN2_MOE], ids=["mixtral", "qwen2_moe"])
def test_top_k_above_the_routed_experts_is_refused(config, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = refused(capsys, "params", tmp_path / "config.json", watch=[tmp_path / "config.json"])
    k = config["num_experts_per_tok"]
    assert f"top-k (num_experts_per_tok) is {k}; the router picks k of 8 routed experts, so k must be an integer " \
           "from 1 to 8" in err


def test_top_k_above_the_experts_of_a_checkpoint_without_a_formula(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt", {"model_type": "custom", "num_local_experts": 2, "num_experts_per_tok": 5},
                      "model.layers.0.mlp.experts.{}.w1.weight")
    err = refused(capsys, "params", ckpt, watch=[ckpt])
    assert "top-k (num_experts_per_tok) is 5; the router picks k of 2 routed experts" in err


@pytest.mark.parametrize("count", ["1e400", "1e30"])
def test_an_infinite_or_absurd_count_is_refused(count, capsys):
    err = refused(capsys, "params", count)
    assert f"'{count}': a parameter count must be a finite number of at most 1e+18" in err
