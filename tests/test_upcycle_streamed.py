"""upcycle.streamed: the independently written, layer-by-layer forward pass from disk equals the models' own
(dense Llama, Mixtral, Qwen2-MoE with a shared expert and dense layers), and its tap sees each FFN's input."""

import pytest
import torch

from moekit.upcycle.streamed import StreamedCheckpoint

from helpers import saved_model


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe"])
def test_streamed_logits_equal_the_model(tmp_path, name):
    model, path = saved_model(tmp_path, name)
    ids = torch.randint(0, model.config.vocab_size, (1, 19))
    checkpoint = StreamedCheckpoint(path)
    try:
        assert checkpoint.format == name
        streamed = checkpoint.logits(ids)
    finally:
        checkpoint.close()
    with torch.no_grad():
        want = model(ids).logits
    assert streamed.shape == want.shape and (streamed - want).abs().max().item() <= 1e-5


def test_the_tap_sees_each_ffn_input_and_layers_stops_early(tmp_path):
    model, path = saved_model(tmp_path, "mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    seen, want = {}, {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: want.__setitem__(i, a[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    checkpoint = StreamedCheckpoint(path)
    try:
        out = checkpoint.run(ids, lambda i, x: seen.__setitem__(i, x.clone()), layers=1)
    finally:
        checkpoint.close()
    assert sorted(seen) == [0] and out.shape == (2, 7, model.config.hidden_size)
    assert (seen[0] - want[0]).abs().max().item() <= 1e-5
