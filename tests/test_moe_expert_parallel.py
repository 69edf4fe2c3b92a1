"""moe.expert_parallel: an MoE layer whose experts are split over 2 gloo processes computes what the whole layer
computes on each process's tokens, with the same gradients (inputs, router, each process's experts), also when a
process has no tokens at all or routes none to some experts."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

CHILD = """
import copy, os, sys, torch, torch.distributed as dist
from moekit.moe.config import MoEConfig
from moekit.moe.expert_parallel import ExpertGroup
from moekit.moe.layer import MoEFeedForward
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)
config = MoEConfig(hidden_size=16, intermediate_size=24, moe_intermediate_size=24, num_local_experts=4,
                   num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                   vocab_size=32, capacity_factor=float(sys.argv[1]) or None)
whole = MoEFeedForward(config)
for p in whole.parameters():
    torch.nn.init.normal_(p, std=0.3)
whole.gate.e_score_correction_bias[3] = -100.0  # expert 3 (process 1's) never chosen
split = copy.deepcopy(whole)
split.experts.keep_local(ExpertGroup(dist.group.WORLD, 2, r, 4))
tokens = [torch.randn(1, n, 16, generator=torch.Generator().manual_seed(n)) for n in (7, int(sys.argv[2]))]
x = tokens[r].clone().requires_grad_()
y, _ = split(x)
y.pow(2).sum().backward()
xs = [t.clone().requires_grad_() for t in tokens]
ys = [whole(t)[0] for t in xs]
sum(t.pow(2).sum() for t in ys).backward()
router = split.gate.weight.grad.clone()
dist.all_reduce(router)
rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if b.numel() else 0.0
worst = max(rel(y, ys[r]), rel(x.grad, xs[r].grad),
            rel(split.experts.gate_up_proj.grad, whole.experts.gate_up_proj.grad[2 * r:2 * r + 2]),
            rel(split.experts.down_proj.grad, whole.experts.down_proj.grad[2 * r:2 * r + 2]),
            rel(router, whole.gate.weight.grad))
open(f"{sys.argv[3]}/rank{r}", "w").write(f"rank {r} worst {worst:.3e} local {tuple(split.experts.down_proj.shape)}")
dist.destroy_process_group()
os._exit(0)  # as moekit's command line ends a distributed run: no C++ teardown racing gloo's threads
"""


@pytest.mark.slow
@pytest.mark.parametrize("capacity, tokens", [(0, 5), (1.0, 5), (0, 0), (0, 1)],
                         ids=["dropless", "capacity", "no-tokens", "one-token"])
def test_two_processes_compute_the_whole_layer(tmp_path, capacity, tokens):
    (tmp_path / "child.py").write_text(CHILD)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "child.py"), str(capacity), str(tokens), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    for line in lines:
        worst = float(line.split()[3])
        assert worst <= 1e-5 and line.endswith("local (2, 16, 24)"), line
