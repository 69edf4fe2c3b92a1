"""moe.eval.routing through `moekit eval --routing`: an MoE whose router is set to send label A's tokens to expert
0 and label B's to expert 1 gives those fractions and 1 bit of mutual information (two equally frequent labels);
a router blind to the labels gives 0 bits; the heatmap lands under --out."""

import json

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.eval.routing import RoutingCounts
from moekit.moe.model import MoEForCausalLM
from moekit.moe.train.tokenizer import ByteTokenizer

from helpers import moekit

pytestmark = pytest.mark.usefixtures("one_thread")


def sorting_moe(path) -> str:
    """Bytes model, 2 layers of 2 experts, top-1: the attention adds nothing (o_proj = 0), so each router reads its
    token's own (normalised) embedding, whose dimension 0 is +5 for 'a' and -5 for 'b'; router rows +-e_0."""
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_local_experts=2,
                    num_experts_per_tok=1, max_position_embeddings=128)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[ord("a"), 0], embed[ord("b"), 0] = 5.0, -5.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()  # the residual stream stays the embedding: layer 1 routes alike
            router = layer.mlp.gate.weight
            router.zero_()
            router[0, 0], router[1, 0] = 1.0, -1.0
    model.save_pretrained(str(path))
    ByteTokenizer().save(str(path))
    return str(path)


def test_constructed_routing_gives_its_fractions_and_one_bit(tmp_path, capsys):
    model = sorting_moe(tmp_path / "moe")
    for name, letter in (("a", "a"), ("b", "b")):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(letter * (20 + 7 * i))
    code, out, err = moekit(capsys, "eval", model, "--data", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}",
                            "--routing", "--out", str(tmp_path / "report"), "--json", "--no-progress",
                            "--max-length", "16")
    assert code == 0, err
    routing = json.loads(out)["routing"][0]
    assert routing["layers"] == [0, 1]
    assert routing["fractions"] == {"A": [[1.0, 0.0], [1.0, 0.0]], "B": [[0.0, 1.0], [0.0, 1.0]]}
    assert routing["mutual_information_bits"] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert routing["max_bits"] == pytest.approx(1.0)
    assert (tmp_path / "report" / "routing-moe.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["routing"][0]["fractions"] == routing["fractions"] and len(saved["rows"]) == 2


def test_mutual_information_of_counts():
    counts = RoutingCounts(2, 4)
    counts.add("x", 0, torch.tensor([[0, 1], [2, 3]]))  # layer 0: both labels spread alike
    counts.add("y", 0, torch.tensor([[0, 1], [2, 3]]))
    counts.add("x", 1, torch.tensor([[0, 1], [0, 1]]))  # layer 1: x -> {0, 1}, y -> {2, 3}
    counts.add("y", 1, torch.tensor([[2, 3], [3, 2]]))
    mi, h = counts.mutual_information()
    assert mi == pytest.approx([0.0, 1.0], abs=1e-12) and h == pytest.approx(1.0)
    assert counts.fractions()["x"] == [[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]
