"""moe.losses: auxiliary-loss-free balancing evens out a skewed load; a zero rate changes nothing."""

import pytest
import torch

from moekit.moe import update_router_bias

from helpers import make_layer


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


