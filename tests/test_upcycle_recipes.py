"""upcycle.recipes: the recipes' math on tensors (shards, router groups, granular scales, noise, drop)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.upcycle import recipes


def ffn(x, gate, up, down):
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def test_router_virtual_groups_share_rows_and_std():
    w = recipes.router_weight(8, 3, 512, "normal", 0.02, recipes.generator(0, 1, 1), torch.float32)
    assert w.shape == (24, 512)
    groups = w.view(8, 3, 512)
    assert torch.equal(groups[:, 0], groups[:, 1]) and torch.equal(groups[:, 0], groups[:, 2])
    assert not torch.equal(groups[0, 0], groups[1, 0])
    assert groups[:, 0].std().item() == pytest.approx(0.02, rel=0.05)
    assert recipes.router_weight(4, 1, 8, "zeros", 0.02, recipes.generator(0), torch.bfloat16).abs().sum() == 0
    again = recipes.router_weight(8, 3, 512, "normal", 0.02, recipes.generator(0, 1, 1), torch.float32)
    assert torch.equal(w, again)  # same (seed, layer, tag): same router


def test_shards_partition_the_ffn():
    H, Fd, G = 16, 48, 4
    gate, up, down, x = torch.randn(Fd, H), torch.randn(Fd, H), torch.randn(H, Fd), torch.randn(5, H)
    parts = [ffn(x, recipes.shard(gate, "gate", g, G), recipes.shard(up, "up", g, G), recipes.shard(down, "down", g, G))
             for g in range(G)]
    assert recipes.shard(down, "down", 1, G).shape == (H, Fd // G)
    torch.testing.assert_close(sum(parts), ffn(x, gate, up, down), rtol=1e-5, atol=1e-5)


def test_granular_scales_undo_the_one_over_r():
    assert recipes.granular_scales(4, "down") == {"gate": 1.0, "up": 1.0, "down": 4.0}
    s = recipes.granular_scales(8, "cube-root")
    assert s["gate"] * s["up"] * s["down"] == pytest.approx(8.0)
    assert recipes.granular_scales(4, "none") == dict.fromkeys(recipes.ROLES, 1.0)
    # with R shards each weighted 1/R, `down` scaling gives back the dense FFN exactly; cube-root does not (SiLU)
    H, Fd, R = 8, 32, 4
    gate, up, down, x = torch.randn(Fd, H), torch.randn(Fd, H), torch.randn(H, Fd), torch.randn(6, H)
    dense = ffn(x, gate, up, down)
    for rule, exact in (("down", True), ("cube-root", False), ("none", False)):
        sc = recipes.granular_scales(R, rule)
        y = sum(ffn(x, *(recipes.scaled(recipes.shard(w, r, g, R), sc[r], torch.float32)
                         for w, r in ((gate, "gate"), (up, "up"), (down, "down")))) / R for g in range(R))
        assert torch.allclose(y, dense, atol=1e-5) == exact, rule


def test_noise_has_the_requested_relative_scale():
    w = torch.randn(256, 128) * 0.3 + 0.1
    out = recipes.noise_expert(w, 0.05, recipes.generator(0, 0, 0, 3), torch.float32)
    eps = out - w
    assert eps.std().item() / w.std().item() == pytest.approx(0.05, rel=0.03)
    assert abs(eps.mean().item()) < 3 * 0.05 * 0.3 / 181  # mean ~ 0 (3 standard errors)
    other = recipes.noise_expert(w, 0.05, recipes.generator(0, 0, 1, 3), torch.float32)
    assert not torch.equal(out, other)
    assert torch.equal(out, recipes.noise_expert(w, 0.05, recipes.generator(0, 0, 0, 3), torch.float32))
    assert recipes.noise_expert(w, 0.05, recipes.generator(0), torch.bfloat16).dtype == torch.bfloat16


def test_drop_reinitialises_the_same_neurons_in_gate_up_down_from_the_source_statistics():
    H, Fd, r = 64, 200, 0.3
    gate, up, down = torch.randn(Fd, H) * 0.5 + 0.2, torch.randn(Fd, H) * 0.1, torch.randn(H, Fd) * 0.05 - 0.01
    idx = recipes.drop_indices(Fd, r, recipes.generator(0, 0, 0, 2))
    assert idx.numel() == 60 and torch.equal(idx, idx.unique())
    for w, role in ((gate, "gate"), (up, "up"), (down, "down")):
        mean, std = recipes.tensor_stats(w)
        ref_std, ref_mean = torch.std_mean(w, correction=0)
        assert (mean, std) == pytest.approx((ref_mean.item(), ref_std.item()), rel=1e-5)
        out = recipes.drop_expert(w, role, idx, mean, std, recipes.generator(0, 0, 0, 4), torch.float32)
        dim = recipes.neuron_dim(role)
        changed = (out != w).any(dim=1 - dim).nonzero().flatten()
        assert torch.equal(changed, idx), role  # exactly the chosen neurons, consistent across the three
        fresh = out.index_select(dim, idx)
        assert fresh.mean().item() == pytest.approx(mean, abs=4 * std / fresh.numel() ** 0.5)
        assert fresh.std().item() == pytest.approx(std, rel=0.05)
    other = recipes.drop_indices(Fd, r, recipes.generator(0, 0, 1, 2))  # another expert: another set
    assert not torch.equal(idx, other)
    assert recipes.drop_indices(Fd, 0.0, recipes.generator(0)).numel() == 0


