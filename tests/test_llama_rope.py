"""llama.rope: cos/sin of the default, linear and llama3 rotary embeddings equal transformers' LlamaRotaryEmbedding."""

import pytest
import torch
import transformers

from moekit.llama import LlamaConfig
from moekit.llama.rope import RotaryEmbedding, apply_rotary, apply_rotary_reference, rotate_half

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_cos_sin_equal_transformers(kind):
    cfg = LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                      rope_scaling=SCALINGS[kind])
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    positions = torch.tensor([[0, 1, 7, 63, 64, 65, 300, 511]])
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    assert cos.shape == (1, 8, 64)
    assert (cos - hf_cos).abs().max().item() <= 1e-6 and (sin - hf_sin).abs().max().item() <= 1e-6
    if kind != "default":  # the scaling changed something
        plain, _ = RotaryEmbedding(cfg.replace(rope_scaling=None))(positions, torch.float32)
        assert (plain - cos).abs().max().item() > 1e-3


def test_rotation_keeps_norms_and_relative_positions():
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def rotated(x, pos):
        cos, sin = rope(torch.tensor([[pos]]), torch.float32)
        return apply_rotary(x, cos, sin)

    assert torch.allclose(rotated(q, 5).norm(), q.norm(), atol=1e-5)
    # q.k depends only on the distance between the positions
    assert torch.allclose((rotated(q, 3) * rotated(k, 10)).sum(), (rotated(q, 103) * rotated(k, 110)).sum(), atol=1e-4)
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 1, 1, 2), (2, 4, 7, 128)])
def test_fast_rotation_matches_the_reference_values_and_gradients(shape):
    B, N, S, D = shape
    x = torch.randn(B, S, N, D).transpose(1, 2).requires_grad_()  # a strided view, as q/k in the model
    angles = torch.randn(B, S, D // 2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    sin = sin + torch.randn_like(sin) * 0.1  # unequal halves: the identity holds for any sin
    dy = torch.randn(B, N, S, D)
    fast = apply_rotary(x, cos, sin)
    (g_fast,) = torch.autograd.grad(fast, x, dy)
    ref = apply_rotary_reference(x, cos, sin)
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-6, atol=1e-6)
