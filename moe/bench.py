"""`moekit bench layer`: one routed layer, side by side with its peers, forward and forward+backward.

Contenders, all on the same input x [T, H] and (for the routed ones) the same router and expert weights:
  moekit           our MoEFeedForward (router + kernels.swiglu_experts)
  hf-eager         transformers' MixtralSparseMoeBlock, experts_implementation "eager" (per-expert loop)
  hf-grouped_mm    the same block with experts_implementation "grouped_mm"
  dense-equivalent a dense SwiGLU of width k*F: the expert FLOPs with zero routing overhead (the limit)
Times are medians over `repeats` runs after `warmup`; ratios are to the dense-equivalent.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from llama.model import MLP

from .config import MoEConfig
from .layer import MoEFeedForward

CONTENDERS = ("moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent")


def hf_block(config: MoEConfig, ours: MoEFeedForward, implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
                        num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    cfg._experts_implementation = implementation  # what from_pretrained(..., experts_implementation=...) sets
    block = MixtralSparseMoeBlock(cfg)
    block.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("correction_bias")})
    return block


def bench_layer(hidden_size: int = 1024, intermediate_size: int = 2816, num_experts: int = 8, top_k: int = 2,
                tokens: int = 4096, dtype: torch.dtype = torch.float32, repeats: int = 5, warmup: int = 1,
                contenders: tuple[str, ...] = CONTENDERS, seed: int = 0) -> dict:
    """Time every contender; returns {"setup": {...}, "results": [{name, forward_s, forward_backward_s, ...}]}."""
    torch.manual_seed(seed)
    config = MoEConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=1,
                       num_attention_heads=1, num_local_experts=num_experts, num_experts_per_tok=top_k, vocab_size=8)
    ours = MoEFeedForward(config).to(dtype)
    for p in ours.parameters():
        nn.init.normal_(p, std=hidden_size ** -0.5)
    dense = MLP(config, top_k * intermediate_size).to(dtype)
    x = torch.randn(1, tokens, hidden_size, dtype=dtype)
    grad = torch.randn_like(x)
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "moekit": lambda t: ours(t)[0],
        "dense-equivalent": dense,
    }
    if any(c.startswith("hf-") for c in contenders):
        for impl in ("eager", "grouped_mm"):
            modules[f"hf-{impl}"] = hf_block(config, ours, impl).to(dtype)
    params = {name: list(m.parameters()) if isinstance(m, nn.Module) else list(ours.parameters())
              for name, m in modules.items()}

    def forward(f):
        with torch.no_grad():
            f(x)

    def forward_backward(f, ps):  # as a training step: fresh gradients (zero_grad(set_to_none=True))
        for p in ps:
            p.grad = None
        f(x.detach().requires_grad_()).backward(grad)

    with torch.no_grad():  # the routed contenders compute the same function: record how closely
        y_ref = modules["moekit"](x) if "moekit" in modules else None
        agree = {name: (modules[name](x) - y_ref).abs().max().item() if y_ref is not None and
                 name.startswith("hf-") else None for name in contenders}
    # Round robin: every repeat times each contender once, so load from other processes hits all of them alike.
    runs = {name: {"forward": [], "forward_backward": []} for name in contenders}
    for step in range(warmup + repeats):
        for name in contenders:
            for kind in ("forward", "forward_backward"):
                t0 = time.perf_counter()
                if kind == "forward":
                    forward(modules[name])
                else:
                    forward_backward(modules[name], params[name])
                if step >= warmup:
                    runs[name][kind].append(time.perf_counter() - t0)
    results = [{"name": name, "forward_s": statistics.median(r["forward"]),
                "forward_backward_s": statistics.median(r["forward_backward"]),
                "max_abs_diff_vs_moekit": agree[name], "forward_runs_s": r["forward"],
                "forward_backward_runs_s": r["forward_backward"]}
               for name, r in runs.items()]
    base = next((r for r in results if r["name"] == "dense-equivalent"), None)
    for r in results:
        r["forward_x_dense"] = r["forward_s"] / base["forward_s"] if base else None
        r["forward_backward_x_dense"] = r["forward_backward_s"] / base["forward_backward_s"] if base else None
    flops = 2 * 3 * tokens * top_k * intermediate_size * hidden_size  # expert matmuls, forward
    setup = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k,
                 tokens=tokens, dtype=str(dtype).removeprefix("torch."), repeats=repeats, warmup=warmup,
                 forward_gflop=flops / 1e9, threads=torch.get_num_threads(), torch=torch.__version__,
                 machine=f"{platform.machine()}, {platform.processor() or platform.system()}")
    return {"setup": setup, "results": results}


def format_table(report: dict) -> str:
    s = report["setup"]
    head = (f"MoE layer, H={s['hidden_size']} F={s['intermediate_size']} E={s['num_experts']} k={s['top_k']} "
            f"T={s['tokens']} {s['dtype']}, {s['threads']} threads, median of {s['repeats']}")
    rows = [head, "", "| layer | forward (ms) | x dense | forward+backward (ms) | x dense |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        fx = f"{r['forward_x_dense']:.2f}" if r["forward_x_dense"] is not None else "-"
        bx = f"{r['forward_backward_x_dense']:.2f}" if r["forward_backward_x_dense"] is not None else "-"
        rows.append(f"| {r['name']} | {1e3 * r['forward_s']:.1f} | {fx} | {1e3 * r['forward_backward_s']:.1f} | {bx} |")
    return "\n".join(rows)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
