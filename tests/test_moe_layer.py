"""moe.layer: the grouped MoE feed-forward against its per-expert oracle on adversarial routings (all tokens to one
expert, empty experts, one token, top-k = E, capacity dropping, shared expert)."""

import math

import torch

from moekit.moe import capacity_keep

from helpers import make_layer


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












