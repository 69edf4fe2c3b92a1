"""llama.model: logits, loss and every gradient against transformers' LlamaForCausalLM (MHA/GQA/MQA, llama3 rope,
tied embeddings, biases, padding masks)."""

import pytest
import torch

from moekit.llama import Llama

from helpers import hf_llama
from helpers import tiny_llama as tiny

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)




@pytest.mark.parametrize("kv_heads", [6, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope", "llama3-rope"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_matches_transformers_logits_loss_grads(kv_heads, rope, tied):
    cfg = tiny(num_key_value_heads=kv_heads, rope_scaling=rope, rope_theta=500000.0 if rope else 10000.0,
               tie_word_embeddings=tied)
    ours = Llama(cfg)
    hf = hf_llama(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    out = ours(ids, labels=ids)
    ref = hf(input_ids=ids, labels=ids)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6
    out.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - hf_params[name].grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_fused_with_the_lm_head_matches_transformers(tied):
    ours = Llama(tiny(num_key_value_heads=2, tie_word_embeddings=tied))
    hf = hf_llama(ours)
    ids = torch.randint(0, 97, (2, 37))
    labels = ids.clone()
    labels[1, 20:] = -100
    out = ours(ids, labels=labels, return_logits=False)
    ref = hf(input_ids=ids, labels=labels)
    assert out.logits is None and abs(out.loss.item() - ref.loss.item()) <= 1e-6
    out.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - hf_params[name].grad).abs().max().item() <= 1e-5, name


def test_attention_bias_and_mlp_bias_match_transformers():
    ours = Llama(tiny(num_key_value_heads=3, attention_bias=True, mlp_bias=True, head_dim=12))
    for name, p in ours.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 97, (1, 11))
    assert (ours(ids).logits - hf_llama(ours)(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_padded_attention_mask_matches_transformers():
    ours = Llama(tiny(num_key_value_heads=2))
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    a, b = ours(ids, attention_mask=mask).logits, hf_llama(ours)(input_ids=ids, attention_mask=mask).logits
    assert (a[0] - b[0]).abs().max() <= 1e-5 and (a[1, :6] - b[1, :6]).abs().max() <= 1e-5


def test_rmsnorm_statistics_in_fp32():
    from moekit.llama import RMSNorm

    x = (torch.randn(4, 64) * 300).to(torch.bfloat16)
    y = RMSNorm(64).to(torch.bfloat16)(x)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)






