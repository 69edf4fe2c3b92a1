"""upcycle.verify: the comparison of two checkpoints reports what differs, and refuses what cannot be compared."""

import json

import pytest
import torch

from moekit.llama import Llama
from moekit.llama.errors import ConfigError
from moekit.upcycle.verify import verify_checkpoints

from helpers import saved_model, tiny_llama


def test_verify_reports_the_difference(tmp_path):
    model, path = saved_model(tmp_path, "llama")
    assert verify_checkpoints(path, path, tokens=16).max_abs == 0.0
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "changed")
    r = verify_checkpoints(path, tmp_path / "changed", tokens=16, atol=1e-6, seed=3)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = (model(ids).logits - Llama.from_pretrained(path)(ids).logits).abs().max().item()
    assert not r.ok and r.tokens == 16 and r.max_abs == pytest.approx(want, rel=1e-3) and "FAIL" in r.line()


def test_models_of_other_shapes_are_refused(tmp_path):
    _, a = saved_model(tmp_path, "llama")
    Llama(tiny_llama(hidden_size=24, num_attention_heads=2)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ConfigError, match="hidden_size 48 != 24"):
        verify_checkpoints(a, tmp_path / "narrow")


def test_a_config_that_does_not_match_the_weights(tmp_path, capsys):
    from helpers import one_line_error

    Llama(tiny_llama(hidden_size=40, num_attention_heads=4, head_dim=8)).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["head_dim"]  # now derived as 40 // 4 = 10, not the 8 the weights were made with
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, "verify", tmp_path / "a", tmp_path / "a", "--no-progress")
    assert "self_attn.k_proj.weight' has shape [32, 40]; expected shape [40, 40] from config.json" in err
