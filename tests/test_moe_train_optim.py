"""moe.train.optim: the warmup + cosine schedule (as the LambdaLR the optimizer steps), weight decay on matrices
only, the routers' own learning rate, and `--train experts` freezing everything else."""

import pytest
import torch

from moekit.moe import MoEConfig, MoEForCausalLM
from moekit.moe.train import Schedule, make_optimizer
from moekit.moe.train.optim import is_expert, is_router


def test_schedule_warmup_then_cosine_to_the_floor():
    s = Schedule(lr=1e-3, warmup=10, steps=100, min_lr_ratio=0.1)
    lrs = [s.lr_at(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert "warmup over 10 steps, cosine to 0.0001 at step 100" in s.describe()


def test_the_optimizer_follows_the_schedule_with_routers_at_their_multiple():
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig.from_name("tiny-moe"))
    s = Schedule(lr=2e-3, warmup=3, steps=20)
    opt, sched = make_optimizer(model, s, weight_decay=0.1, betas=(0.9, 0.95), router_lr_mult=5.0)
    names = {id(p): n for n, p in model.named_parameters()}
    for step in range(20):
        for g in opt.param_groups:
            router = all(is_router(names[id(p)]) for p in g["params"])
            assert g["lr"] == pytest.approx(s.lr_at(step) * (5.0 if router else 1.0))
            assert g["weight_decay"] == (0.1 if g["params"][0].dim() >= 2 else 0.0)
        opt.step()
        sched.step()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()
    restored = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: s.lr_at(i) / s.lr)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 20


def test_train_experts_freezes_the_rest():
    model = MoEForCausalLM(MoEConfig.from_name("tiny-moe-shared"))
    opt, _ = make_optimizer(model, Schedule(1e-3, 0, 10), 0.1, (0.9, 0.95), trainable="experts")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if is_expert(n)}
    assert any("shared_expert" in n for n in trained) and any(n.endswith("mlp.gate.weight") for n in trained)
    assert not any("self_attn" in n or "embed" in n or "norm" in n or "mlp.gate_proj" in n for n in trained)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trained)
