"""moe.model: MoEForCausalLM against transformers' Mixtral and Qwen2-MoE (logits, losses, gradients), checkpoints both
ways, cached generation, router statistics."""

import json
import os

import pytest
import torch
import transformers

from moekit.moe import MoEConfig, MoEForCausalLM
from moekit.moe.formats import hf_config_dict

HF = {"mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
      "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM)}


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, num_local_experts=4,
                num_experts_per_tok=2, router_aux_loss_coef=0.02)
    return MoEConfig(**{**base, **kw})


def qwen_tiny(**kw):
    return tiny(num_hidden_layers=3, moe_intermediate_size=32, num_shared_experts=1, shared_expert_intermediate_size=56,
                shared_expert_gate=True, mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True, num_local_experts=5,
                num_experts_per_tok=3, **kw)


def hf_model(ours: MoEForCausalLM, fmt: str):
    """The transformers model with our config and weights, loaded by plain load_state_dict (same names)."""
    config_cls, model_cls = HF[fmt]
    d = hf_config_dict(ours.config, fmt)
    cfg = config_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all(k.endswith("e_score_correction_bias") for k in unexpected), (missing, unexpected)
    return hf


def randomize_biases(model):
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head-loss"])
@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_matches_transformers_logits_losses_grads(fmt, fused):
    ours = MoEForCausalLM(tiny() if fmt == "mixtral" else qwen_tiny())
    randomize_biases(ours)
    hf = hf_model(ours, fmt)
    ids = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: the balancing loss must skip these rows as transformers does
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(ids, attention_mask=mask, labels=labels, return_logits=not fused)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    if fused:
        assert out.logits is None
    else:
        assert (out.logits[0] - ref.logits[0]).abs().max().item() <= 1e-5
        assert (out.logits[1, :9] - ref.logits[1, :9]).abs().max().item() <= 1e-5
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6  # LM loss + 0.02 * aux loss
    out.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - hf_params[name].grad).abs().max().item() <= 1e-5, name


def test_router_stats_and_z_loss():
    cfg = tiny(router_z_loss_coef=1e-3)
    model = MoEForCausalLM(cfg)
    ids = torch.randint(0, 97, (3, 10))
    out = model(ids, labels=ids)
    stats = out.router_stats
    assert stats.layers == [0, 1] and stats.tokens_per_expert.shape == (2, 4)
    assert stats.tokens_per_expert.sum(-1).tolist() == [3 * 10 * 2] * 2
    mean = stats.tokens_per_expert.float().mean(-1)
    assert torch.allclose(stats.max_load, stats.tokens_per_expert.max(-1).values / mean)
    assert stats.dropped.tolist() == [0, 0] and (stats.entropy > 0).all() and (stats.entropy <= torch.log(
        torch.tensor(4.0))).all()
    # the z-loss by hand from the routers' logits
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o.logits))
             for layer in model.model.layers]
    model(ids)
    for h in hooks:
        h.remove()
    z = torch.stack([torch.logsumexp(lg, -1).square().mean() for lg in logits]).mean()
    assert torch.allclose(out.z_loss, z)
    lm = out.lm_loss + cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * out.z_loss
    assert torch.allclose(out.loss, lm)


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_transformers_checkpoint_loads_in_moekit(fmt, tmp_path):
    config_cls, model_cls = HF[fmt]
    ours_cfg = tiny() if fmt == "mixtral" else qwen_tiny()
    d = hf_config_dict(ours_cfg, fmt)
    hf = model_cls(config_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = MoEForCausalLM.from_pretrained(tmp_path / "hf")
    assert ours.config.model_type == fmt
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():  # same weights; only the order of fp32 sums differs
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_moekit_checkpoint_loads_in_transformers(fmt, tmp_path):
    ours = MoEForCausalLM(tiny() if fmt == "mixtral" else qwen_tiny()).eval()
    randomize_biases(ours)
    ours.save_pretrained(tmp_path / "ours", format=fmt, max_shard_size="100KB")
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["model_type"] == fmt
    hf = HF[fmt][1].from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    back = MoEForCausalLM.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = ours(ids).logits
        assert (hf(input_ids=ids).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(back(ids).logits, ref)


def test_cached_generation_equals_uncached():
    model = MoEForCausalLM(qwen_tiny()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    cached = model.generate(prompt, max_new_tokens=6)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, use_cache=False))
    for t in range(4, 10):
        assert torch.equal(model(cached[:, :t]).logits[:, -1].argmax(-1), cached[:, t])


def test_bf16_forward_backward_keeps_router_in_fp32():
    model = MoEForCausalLM(qwen_tiny(router_z_loss_coef=1e-3)).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())
