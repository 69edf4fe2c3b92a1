"""`moekit bench train`: full training steps of one MoE model, moekit against transformers' Mixtral, side by side.

Contenders, all holding the same initial weights (copied from moekit's model), fed the same batch ids [B, S]
(labels = ids), in the same precision, each with its own AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.1,
fused as moekit's trainer uses it, or --adamw foreach / loop):
  moekit         MoEForCausalLM (router + kernels.swiglu_experts, the LM loss fused with the LM head as moekit's
                 trainer runs it: return_logits=False); loss = LM loss + aux coef x load balancing
  hf-grouped_mm  transformers' MixtralForCausalLM, experts_implementation "grouped_mm", SDPA attention,
                 output_router_logits=True (the same loss)
  hf-eager       the same with "eager" experts (a loop over the experts)
  hf-batched_mm  the same with "batched_mm" experts (a weight copy gathered per token copy: T*k*3*H*F values, so
                 small sizes only; not timed unless named with --only)
A step: zero_grad(set_to_none) -> forward -> backward (timed together: forward_backward_s) -> clip_grad_norm_(1.0)
-> AdamW step (optimizer_s). Times are medians over `repeats` round-robin steps after `warmup` (CUDA events on
GPU). MFU = training FLOPs per token (moekit's accounting: 3 x forward) x tokens/s / peak.

Profile: `profile_steps` more forward+backward passes of each (round robin, an optimizer step after each) under
torch.profiler, per pass: `matmul_s` the self time of the GEMM ops (aten::mm, addmm(_), bmm, baddbmm, _grouped_mm,
...; device time on GPU), `attention_s` that of the fused SDPA kernels (matrix products too, the same op in both),
`matmul_share` = matmul_s / the profiled pass (attention_share likewise), `non_gemm_share` the rest.
`model_non_gemm_s` = forward_backward_s x non_gemm_share: the time of the timed forward+backward outside matrix
products (elementwise ops, routing, permutations, losses, allocation, Python);
`non_gemm_s` adds the optimizer. The summary line compares moekit with transformers' fastest implementation here:
its speed (`moekit_speedup`, step time ratio) and its model_non_gemm_s as a multiple of that one's
(`non_gemm_ratio`). A size whose estimated memory (`train_memory`) the device does not have is refused before
anything is allocated.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Callable

import torch

from moekit.llama.checkpoint import dtype_from_name
from moekit.llama.errors import MoekitError
from moekit.moe.accounting.cost import device_peak_flops, train_flops_per_token
from moekit.moe.accounting.sources import count_params
from moekit.moe.config import MoEConfig
from moekit.moe.formats import hf_config_dict
from moekit.moe.model import MoEForCausalLM

from .layer import resolve_device
from .options import TrainBenchOptions
from .timing import check_device_memory, environment, time_once

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
            "aten::addmv", "aten::mv", "aten::dot"}


def moe_config(layers, hidden, ffn, experts, top_k, heads, kv_heads, vocab, seq_len, **_) -> MoEConfig:
    return MoEConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                     num_local_experts=experts, num_experts_per_tok=top_k, router_aux_loss_coef=0.02)


def hf_mixtral(ours: MoEForCausalLM, implementation: str) -> torch.nn.Module:
    """transformers' MixtralForCausalLM with `ours`' config and weights (same names), SDPA attention."""
    from transformers import MixtralConfig, MixtralForCausalLM

    d = hf_config_dict(ours.config, "mixtral")
    cfg = MixtralConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation, cfg._experts_implementation = "sdpa", implementation
    with torch.device(ours.lm_head.weight.device):
        hf = MixtralForCausalLM(cfg).to(ours.lm_head.weight.dtype)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or any(not k.endswith("e_score_correction_bias") for k in unexpected):
        raise MoekitError(f"transformers' Mixtral does not take moekit's weights: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return hf.train()


def loss_fn(name: str, model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    if name == "moekit":
        return lambda: model(ids, labels=ids, return_logits=False).loss  # as moekit's trainer calls it
    return lambda: model(input_ids=ids, labels=ids, output_router_logits=True).loss


class Contender:
    """A model, its AdamW and its two timed phases."""

    def __init__(self, name: str, model: torch.nn.Module, ids: torch.Tensor, adamw: str = "fused"):
        self.name, self.model, self.loss = name, model, loss_fn(name, model, ids)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                           fused=adamw == "fused", foreach=adamw == "foreach")

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a while (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _self_time(event, device: torch.device) -> float:
    return (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6


def profile(fn: Callable[[], None], device: torch.device) -> dict:
    """One call of fn under torch.profiler: its wall time and every aten op's (self seconds, calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), torch_profile(activities=activities) as prof:  # kineto prints start/stop lines
        wall = time_once(fn, device)
    return {"wall_s": wall, "ops": {e.key: (_self_time(e, device), e.count) for e in prof.key_averages()
                                    if e.key.startswith("aten::")}}


def summarise(profiles: list[dict]) -> dict:
    """Per step, over the profiled steps: wall, GEMM and attention self time, the eight costliest ops."""
    n, ops = len(profiles), {}
    for p in profiles:
        for key, (sec, count) in p["ops"].items():
            ops[key] = (ops.get(key, (0, 0))[0] + sec / n, count)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:8]
    return {"wall_s": sum(p["wall_s"] for p in profiles) / n,
            "matmul_s": sum(sec for key, (sec, _) in ops.items() if key in GEMM_OPS),
            "attention_s": sum(sec for key, (sec, _) in ops.items() if "attention" in key),
            "top_ops": [[key, round(sec, 6), count] for key, (sec, count) in top]}


def train_memory(config: MoEConfig, contenders: int, batch: int, seq_len: int, element_bytes: int) -> int:
    """Bytes bench_train needs at most, estimated before it allocates anything: each contender's model, gradients
    and AdamW m and v, 4·P (P the model's parameters, by moekit's accounting), and one step's activations with
    their gradients, 2·B·S·(L·(8·H + k·(2·H + 3·F)) + 2·V)."""
    c = config
    per_token = c.num_hidden_layers * (8 * c.hidden_size + c.num_experts_per_tok * (
        2 * c.hidden_size + 3 * c.moe_intermediate_size)) + 2 * c.vocab_size
    return element_bytes * (4 * count_params(c).total_params * contenders + 2 * batch * seq_len * per_token)


def bench_train(layers: int = 4, hidden: int = 512, ffn: int = 1408, experts: int = 8, top_k: int = 2,
                heads: int = 8, kv_heads: int = 2, vocab: int = 8192, batch: int = 8, seq_len: int = 256,
                dtype: str = "fp32", device: str | torch.device = "auto", repeats: int | None = None,
                warmup: int | None = None, contenders: list[str] | None = None, peak_flops: float | None = None,
                profile_steps: int = 3, adamw: str = "fused", seed: int = 0) -> dict:
    """Time every contender's training steps; see the module docstring. Returns {"setup", "results", "fastest",
    "moekit_speedup", "non_gemm_ratio"}."""
    device = resolve_device(device)
    on_cuda = device.type == "cuda"
    repeats, warmup = repeats or (10 if on_cuda else 5), (2 if on_cuda else 1) if warmup is None else warmup
    names = list(contenders or ["moekit", "hf-grouped_mm", *([] if on_cuda else ["hf-eager"])])
    if "moekit" not in names or len(names) < 2:
        raise MoekitError(f"bench train compares moekit with transformers: --only needs moekit and at least one "
                          f"hf-* contender, got {' '.join(names)}")
    config = moe_config(layers, hidden, ffn, experts, top_k, heads, kv_heads, vocab, seq_len)
    check_device_memory(train_memory(config, len(names), batch, seq_len, dtype_from_name(dtype).itemsize), device,
                        f"bench train of {len(names)} models of {layers} layers H={hidden} F={ffn} E={experts} "
                        f"V={vocab}, batch {batch}x{seq_len} {dtype}",
                        "give smaller --layers, --hidden, --ffn, --experts, --vocab, --batch or --seq-len")
    torch.manual_seed(seed)
    with torch.device(device):
        ours = MoEForCausalLM(config).to(dtype_from_name(dtype)).train()
    g = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g, device=device)  # [B, S]
    models = {n: ours if n == "moekit" else hf_mixtral(ours, n.removeprefix("hf-")) for n in names}
    runs = {n: Contender(n, m, ids, adamw) for n, m in models.items()}
    with torch.no_grad():
        initial = {n: c.loss().item() for n, c in runs.items()}  # before any step: the same weights
    times = {n: [] for n in names}  # per timed step: (forward_backward_s, optimizer_s)
    for i in range(warmup + repeats):  # round robin: load from other processes hits every contender alike
        for n, c in runs.items():
            step = time_once(c.forward_backward, device), time_once(c.optimizer_step, device)
            if i >= warmup:
                times[n].append(step)
    profiles = {n: [] for n in names}
    for _ in range(profile_steps):  # the profiled steps: round robin as well
        for n, c in runs.items():
            profiles[n].append(profile(c.forward_backward, device))
            c.optimizer_step()
    fpt = train_flops_per_token(ours, seq_len)
    peak = peak_flops or device_peak_flops(device, dtype)
    results = []
    for n in names:
        fb, opt = zip(*times[n])
        r = {"name": n, "initial_loss": initial[n], "step_s": statistics.median(a + b for a, b in times[n]),
             "forward_backward_s": statistics.median(fb), "optimizer_s": statistics.median(opt),
             "step_runs_s": [a + b for a, b in times[n]]}
        r["tokens_per_s"] = batch * seq_len / r["step_s"]
        r["mfu"] = fpt * r["tokens_per_s"] / peak if peak else None
        if profile_steps:
            p = summarise(profiles[n])
            outside = 1 - (p["matmul_s"] + p["attention_s"]) / p["wall_s"]  # the share outside matrix products
            r["profile"] = {**p, "matmul_share": p["matmul_s"] / p["wall_s"],
                            "attention_share": p["attention_s"] / p["wall_s"], "non_gemm_share": outside}
            r["model_non_gemm_s"] = r["forward_backward_s"] * outside
            r["non_gemm_s"] = r["model_non_gemm_s"] + r["optimizer_s"]
        results.append(r)
    by = {r["name"]: r for r in results}
    fastest = min((r for r in results if r["name"] != "moekit"), key=lambda r: r["step_s"])
    speedup = fastest["step_s"] / by["moekit"]["step_s"]
    ratio = by["moekit"]["model_non_gemm_s"] / fastest["model_non_gemm_s"] if profile_steps else None
    setup = dict(layers=layers, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, heads=heads, kv_heads=kv_heads,
                 vocab=vocab, batch=batch, seq_len=seq_len, dtype=dtype, tokens_per_step=batch * seq_len,
                 train_flops_per_token=fpt, total_params=ours.num_parameters(), peak_flops=peak, adamw=adamw,
                 repeats=repeats,
                 warmup=warmup, contenders=names, **environment(device))
    return {"setup": setup, "results": results, "fastest": fastest["name"], "moekit_speedup": speedup,
            "non_gemm_ratio": ratio}


def format_table(report: dict) -> str:
    s = report["setup"]
    where = s["gpu"] if s.get("device") == "cuda" else f"{s['threads']} threads"
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    head = (f"MoE training step, {s['layers']} layers H={s['hidden']} F={s['ffn']} E={s['experts']} "
            f"k={s['top_k']} heads {s['heads']}/{s['kv_heads']} V={s['vocab']}, batch {s['batch']}x{s['seq_len']} "
            f"{s['dtype']}, {s.get('adamw', 'fused')} AdamW, {where}, median of {s['repeats']}")
    rows = [head, "", "| step | step (ms) | fwd+bwd (ms) | AdamW (ms) | tokens/s | MFU | matmul share | "
            "fwd+bwd non-GEMM (ms) | initial loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        p = r.get("profile", {})
        rows.append(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {1e3 * r['forward_backward_s']:.1f} | "
                    f"{1e3 * r['optimizer_s']:.1f} | {r['tokens_per_s']:,.0f} | {f(r['mfu'], '.1%')} | "
                    f"{f(p.get('matmul_share'), '.1%')} | {f(r.get('model_non_gemm_s', 0) * 1e3 or None, '.1f')} | "
                    f"{r['initial_loss']:.6f} |")
    ratio = report["non_gemm_ratio"]
    ratio = "not profiled" if ratio is None else f"{ratio:.2f}x its time"
    rows += ["", f"moekit vs {report['fastest']} (transformers' fastest here): {report['moekit_speedup']:.2f}x as "
             f"fast; outside matrix products (forward+backward) {ratio}"]
    return "\n".join(rows)


def run(options: TrainBenchOptions) -> dict:
    """`moekit bench train`: print the table, write the JSON."""
    from moekit.llama.io import check_output_file, check_parents, write_json_atomic

    if options.json:
        check_output_file(options.json, options.force)
        check_parents(options.json)
    if options.threads:
        torch.set_num_threads(options.threads)
    report = bench_train(**options.model_kwargs(), device=options.device, repeats=options.repeats,
                         warmup=options.warmup, contenders=options.only, peak_flops=options.peak_flops,
                         profile_steps=options.profile_steps, adamw=options.adamw, seed=options.seed)
    print(format_table(report))
    if options.json:
        write_json_atomic(options.json, report, options.force)
        print(f"wrote {options.json}")
    return report
