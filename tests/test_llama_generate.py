"""llama.generate: cached generation equals uncached greedy decoding; stop tokens, top-k and sampling."""

import torch

from moekit.llama import Llama

from helpers import tiny_llama as tiny

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def test_cached_generation_equals_uncached_greedy():
    model = Llama(tiny(num_key_value_heads=2)).eval()
    prompt = torch.randint(0, 97, (3, 5))
    cached = model.generate(prompt, max_new_tokens=12)
    uncached = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 17)
    assert torch.equal(cached, uncached)
    # and greedy really is the argmax of a full forward at each step
    for t in range(5, 17):
        assert torch.equal(model(cached[:, :t]).logits[:, -1].argmax(-1), cached[:, t])


def test_stop_tokens_and_sampling():
    model = Llama(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    greedy = model.generate(prompt, max_new_tokens=10)
    stop = int(greedy[0, 6])  # the third generated token of row 0
    out = model.generate(prompt, max_new_tokens=10, stop_tokens=[stop])
    assert out[0, 6] == stop and out.shape[1] <= 14
    assert torch.equal(out[0, :7], greedy[0, :7])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(prompt, 8, temperature=0.8, top_k=20, top_p=0.9, generator=g1)
    s2 = model.generate(prompt, 8, temperature=0.8, top_k=20, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (2, 12)


def test_top_k_one_is_greedy():
    from moekit.llama.generate import sample

    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-9), logits.argmax(-1))


