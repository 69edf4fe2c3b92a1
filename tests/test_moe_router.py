"""moe.router: routing weights and selection, jitter noise only in training."""

import torch

from moekit.moe import Router

from helpers import layer_config, make_layer


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


