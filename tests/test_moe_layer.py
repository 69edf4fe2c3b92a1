import math

import pytest
import torch

from moe import MoEConfig, MoEFeedForward, Router, capacity_keep, update_router_bias


def layer_config(**kw):
    base = dict(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_local_experts=6, num_experts_per_tok=2)
    return MoEConfig(**{**base, **kw})


def make_layer(**kw):
    layer = MoEFeedForward(layer_config(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def run(layer, x, oracle):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, aux = layer(x, oracle=oracle)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux


def assert_fast_matches_oracle(layer, x):
    y, gx, grads, aux = run(layer, x, oracle=False)
    y_ref, gx_ref, grads_ref, _ = run(layer, x, oracle=True)
    assert (y - y_ref).abs().max().item() <= 1e-5
    assert (gx - gx_ref).abs().max().item() <= 1e-5
    for name, g in grads.items():
        assert (g - grads_ref[name]).abs().max().item() <= 1e-5, name
    return aux


def test_all_tokens_to_one_expert():
    layer = make_layer(num_experts_per_tok=1)
    layer.gate.e_score_correction_bias[3] = 100.0  # selection only: every token picks expert 3
    aux = assert_fast_matches_oracle(layer, torch.randn(2, 9, 32))
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 18, 0, 0]


def test_experts_with_zero_tokens_and_shared_expert():
    layer = make_layer(num_shared_experts=1, shared_expert_gate=True)
    layer.gate.e_score_correction_bias[1] = layer.gate.e_score_correction_bias[4] = 100.0
    aux = assert_fast_matches_oracle(layer, torch.randn(3, 5, 32))
    assert aux.tokens_per_expert.tolist() == [0, 15, 0, 0, 15, 0]
    assert layer.experts.gate_up_proj.grad[0].abs().max() == 0  # no tokens, no gradient


def test_single_token():
    assert_fast_matches_oracle(make_layer(), torch.randn(1, 1, 32))


def test_top_k_equals_number_of_experts():
    aux = assert_fast_matches_oracle(make_layer(num_experts_per_tok=6, norm_topk_prob=False), torch.randn(2, 7, 32))
    assert aux.tokens_per_expert.tolist() == [14] * 6


def test_sigmoid_router_matches_oracle():
    assert_fast_matches_oracle(make_layer(router_score="sigmoid"), torch.randn(2, 11, 32))


def capacity_keep_loop(expert_ids, capacity):
    """Oracle: first choices of every token in token order, then second choices, each expert up to capacity."""
    T, k = expert_ids.shape
    keep = torch.zeros(T, k, dtype=torch.bool)
    taken = {}
    for j in range(k):
        for t in range(T):
            e = int(expert_ids[t, j])
            if taken.get(e, 0) < capacity:
                keep[t, j] = True
                taken[e] = taken.get(e, 0) + 1
    return keep


def test_capacity_dropping():
    layer = make_layer(capacity_factor=0.5)
    layer.gate.e_score_correction_bias[0] = 2.0  # overload expert 0 so that drops certainly happen
    x = torch.randn(2, 12, 32)
    aux = assert_fast_matches_oracle(layer, x)
    C = math.ceil(0.5 * 24 * 2 / 6)
    assert layer.config.capacity(24) == C == 4
    ids = aux.expert_ids
    keep = capacity_keep_loop(ids, C)
    assert torch.equal(capacity_keep(ids, 6, C), keep)
    assert aux.dropped.item() == int((~keep).sum()) == sum(max(0, int(n) - C) for n in aux.tokens_per_expert) > 0
    # dropped copies contribute nothing: the output equals the dropless layer with their weights zeroed
    routing = layer.gate(x.view(-1, 32))
    y_ref = layer.experts.forward_loop(x.view(-1, 32), routing.weights * keep, routing.expert_ids)
    assert (layer(x)[0].view(-1, 32) - y_ref).abs().max().item() <= 1e-6


def test_router_weights_and_selection():
    cfg = layer_config(num_local_experts=5, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(40, 32)
    r = router(x)
    probs = torch.softmax(x @ router.weight.T, -1)
    top = probs.topk(2, -1)
    assert torch.equal(r.expert_ids, top.indices)
    assert torch.allclose(r.weights, top.values / top.values.sum(-1, keepdim=True))
    assert r.tokens_per_expert.tolist() == torch.bincount(top.indices.flatten(), minlength=5).tolist()
    # the balancing bias changes which experts are chosen, never the combine weights of a chosen expert
    router.e_score_correction_bias[:] = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    rb = router(x)
    assert (rb.expert_ids[:, 0] == 4).all()
    assert torch.allclose(rb.weights[:, 0] + rb.weights[:, 1], torch.ones(40))
    raw = probs.gather(1, rb.expert_ids)
    assert torch.allclose(rb.weights, raw / raw.sum(-1, keepdim=True))


def test_jitter_only_in_training():
    layer = make_layer(router_jitter_noise=0.5)
    x = torch.randn(1, 30, 32)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer.gate(x.view(-1, 32)).logits, layer.gate(x.view(-1, 32)).logits)


def train_skewed(rate, steps=300):
    """A layer trained on a regression task whose inputs all lean towards expert 0, updating the selection
    bias once per step from that step's counts; returns max/mean load per step and the final bias."""
    torch.manual_seed(0)
    H = 16
    layer = make_layer(hidden_size=H, intermediate_size=32, num_local_experts=4, num_experts_per_tok=1,
                       router_bias_update_rate=rate)
    direction = torch.randn(H)
    direction /= direction.norm()
    with torch.no_grad():
        layer.gate.weight[0] = 2.0 * direction
    teacher = torch.randn(H, H) / H ** 0.5
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    loads = []
    for _ in range(steps):
        x = torch.randn(256, H) + 1.5 * direction
        y, aux = layer(x)
        loss = (y - x @ teacher).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_router_bias(layer, aux.tokens_per_expert[None])  # one MoE layer: counts [1, E]
        loads.append((aux.tokens_per_expert.max() / aux.tokens_per_expert.float().mean()).item())
    return loads, layer.gate.e_score_correction_bias


def test_aux_loss_free_balancing_evens_out_load():
    loads, bias = train_skewed(rate=0.005)
    start, end = sum(loads[:10]) / 10, sum(loads[-50:]) / 50
    assert start > 2.5  # heavily skewed to start with (E / 1 = 4 would be every token on one expert)
    assert end < 1.3  # near 1 = balanced (sampling noise alone gives ~1.15 at 64 tokens per expert)
    assert bias[0] < 0 < bias[1:].min()  # the overloaded expert was pushed down, the others up
    control, _ = train_skewed(rate=0.0)
    assert sum(control[-50:]) / 50 > 2.0  # without the bias update the same training stays skewed


@pytest.mark.parametrize("rate", [0.0])
def test_bias_update_off_is_a_no_op(rate):
    layer = make_layer()
    update_router_bias(layer, torch.tensor([[10, 0, 0, 0, 0, 2]]), rate)
    assert layer.gate.e_score_correction_bias.abs().max() == 0


def test_swiglu_experts_function_matches_composed_ops_and_loop_in_fp64():
    """kernels.reference.swiglu_experts (one autograd Function, gradients written over saved activations) against
    the same ops differentiated by autograd and against the per-expert loop; also with retain_graph."""
    from kernels.reference import swiglu_experts, swiglu_experts_composed
    from moe import swiglu_experts_loop

    T, H, Fe, E, k = 23, 8, 6, 4, 2
    args = [torch.randn(T, H), torch.rand(T, k), torch.randn(E, 2 * Fe, H), torch.randn(E, H, Fe)]
    x, w, gu, dn = [a.double().requires_grad_() for a in args]
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[:5] = torch.tensor([0, 1])  # and expert 3 gets nothing
    ids[ids == 3] = 2
    g = torch.randn(T, H, dtype=torch.float64)
    results = []
    for f in (swiglu_experts, swiglu_experts_composed, swiglu_experts_loop):
        y = f(x, w, ids, gu, dn)
        results.append([y, *torch.autograd.grad(y, (x, w, gu, dn), g)])
    for fast, composed, loop in zip(*results):
        assert (fast - loop).abs().max() <= 1e-12 and (composed - loop).abs().max() <= 1e-12
    y = swiglu_experts(x, w, ids, gu, dn)
    first = torch.autograd.grad(y, (x, w, gu, dn), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, gu, dn), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.autograd.gradcheck(lambda *t: swiglu_experts(t[0], t[1], ids, t[2], t[3]), (x, w, gu, dn))
