"""The whole MoE layer on a CUDA GPU in bf16 (router, Triton experts, shared expert, capacity limit): against its
per-expert oracle in outputs and gradients, under torch.compile(fullgraph=True), and with no host-device sync in
its forward, routing statistics and router losses included; then the MoE causal LM's forward with labels.
Skipped without CUDA. The kernels alone (dtypes, edge routings, determinism) are in tests/test_kernels_triton_gpu.py."""

import os
from contextlib import contextmanager

import pytest
import torch

from moekit.moe import MoEConfig, MoEFeedForward, MoEForCausalLM
from moekit.moe.losses import load_balancing_loss, router_probs, router_z_loss, routing_stats

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]
DEVICE, DTYPE = "cuda", torch.bfloat16
TOL = 2e-2  # max error / max |reference|, bf16 (as tests/test_kernels_triton_gpu.py)
H = 256
CONFIGS = {  # MoEConfig fields beside layer_config's
    "routed": dict(),
    "shared+capacity": dict(num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0),
}


def make_layer(name: str, **kw) -> MoEFeedForward:
    """E=8, k=2, H=256, F=352 (not a multiple of the tiles), bf16 on DEVICE; with a capacity limit expert 0 is
    favoured (selection bias only) so that copies are dropped."""
    config = MoEConfig(vocab_size=64, hidden_size=H, intermediate_size=352, num_hidden_layers=1,
                       num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2, **CONFIGS[name], **kw)
    torch.manual_seed(0)
    layer = MoEFeedForward(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=H ** -0.5)
    if config.capacity_factor is not None:
        layer.gate.e_score_correction_bias[0] = 0.2
    return layer.to(DEVICE, DTYPE)


def inputs(tokens: int = 633):
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(3, tokens // 3, H, generator=g), torch.randn(3, tokens // 3, H, generator=g)
    return x.to(DEVICE, DTYPE), dy.to(DEVICE, DTYPE)


def step(fn, layer, x, dy):
    """y, aux and the gradients of x and of every parameter (by name) of one forward+backward of fn."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, aux = fn(x)
    y.backward(dy)
    return y.detach(), aux, {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def close(ours, want, what=""):
    assert ours.dtype == want.dtype and ours.is_cuda, what
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(ours.float(), want.float(), atol=TOL * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def same_routing(aux, want):
    assert torch.equal(aux.expert_ids, want.expert_ids)
    assert torch.equal(aux.tokens_per_expert, want.tokens_per_expert) and torch.equal(aux.dropped, want.dropped)


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_matches_per_expert_oracle(name):
    layer = make_layer(name)
    x, dy = inputs()
    y, aux, grads = step(layer, layer, x, dy)
    y_ref, aux_ref, grads_ref = step(lambda t: layer(t, oracle=True), layer, x, dy)
    same_routing(aux, aux_ref)
    if layer.config.capacity_factor is not None:
        assert aux.dropped.item() > 0
    close(y, y_ref, "y")
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        close(g, grads_ref[n], n)


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_compiles_fullgraph(name):
    torch._dynamo.reset()
    layer = make_layer(name)
    x, dy = inputs()
    compiled = torch.compile(layer, fullgraph=True)
    y, aux, grads = step(compiled, layer, x, dy)
    y_ref, aux_ref, grads_ref = step(layer, layer, x, dy)
    same_routing(aux, aux_ref)
    close(y, y_ref, "y")
    for n, g in grads.items():
        close(g, grads_ref[n], n)


@contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("name", CONFIGS)
def test_layer_forward_stats_and_losses_have_no_host_sync(name, train):
    layer = make_layer(name, router_jitter_noise=0.01 if train else 0.0).train(train)
    score = layer.config.router_score

    def forward(x):
        y, aux = layer(x)
        stats = routing_stats([aux], score)
        return y, stats, load_balancing_loss([router_probs(aux, score)], [aux.expert_ids]), router_z_loss([aux.logits])

    for tokens in (633, 3) if not train else (633,):  # inference: the grouped and the decode (<= 32 copies) paths
        x, _ = inputs(tokens)
        with torch.set_grad_enabled(train):
            forward(x)  # warm-up: Triton autotuning synchronises
            with no_host_sync():
                y, stats, lb, z = forward(x)
        assert stats.tokens_per_expert.sum().item() == tokens // 3 * 3 * 2
        assert y.requires_grad == train and lb.isfinite().item() and z.isfinite().item()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_causal_lm_forward_with_labels_has_no_host_sync(padded):
    """Embedding, attention (SDPA), MoE layers with a shared expert and a capacity limit, the LM loss with
    ignore_index, the balancing and z losses over the attention mask, the routing statistics."""
    config = MoEConfig.from_name("tiny-moe-shared", capacity_factor=1.25, router_z_loss_coef=1e-3)
    torch.manual_seed(0)
    model = MoEForCausalLM(config).to(DEVICE, DTYPE).train()
    ids = torch.randint(0, config.vocab_size, (2, 37), device=DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 29:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = dict(attention_mask=mask if padded else None, labels=labels)
    model(ids, **kwargs)  # warm-up
    with no_host_sync():
        out = model(ids, **kwargs)
    assert out.loss.isfinite().item() and out.router_stats.dropped.shape == (len(config.moe_layers),)
    out.loss.backward()  # the graph is whole (the backward may synchronise: not checked)
