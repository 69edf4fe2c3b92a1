"""What a parameter count costs: forward and training FLOPs, weight, KV-cache and training memory, training
time and price, each with its formula (``--explain``). The table and JSON of ``moekit params`` are in `report`.

Conventions: a multiply-add is 2 FLOPs; the forward pass costs 2 FLOPs per active matmul weight per token plus
attention's QK^T and AV products over the full context (non-causal, as in PaLM's MFU formula); training is
3 x forward (backward = 2 x forward). GB = 10^9 bytes. Activations are not in the training memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from moekit.llama.errors import ConfigError
from moekit.llama.options import check_options, option, parse_number

from .formulas import ParamCount

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1,
               "int4": 0.5}
SECONDS_PER_DAY = 86400
# Dense peak FLOP/s of one device by name (NVIDIA data sheets, SXM parts, without sparsity): (16-bit tensor, fp32).
PEAK_FLOPS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "H800": (989e12, 67e12), "A100": (312e12, 19.5e12),
    "A800": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12),
    "RTX 4090": (165e12, 82.6e12), "V100": (125e12, 15.7e12),
}


def known_peak_flops(device_name: str, half_precision: bool) -> float | None:
    """The peak FLOP/s of a GPU named `device_name` (e.g. torch.cuda.get_device_name()) in 16-bit or fp32 math;
    None for a device not in PEAK_FLOPS. A key matches where no digit follows it: "A10" names an A10G but not an
    A100, "L4" not an L40."""
    for key, (half, full) in PEAK_FLOPS.items():
        if re.search(re.escape(key) + r"(?![0-9])", device_name):
            return half if half_precision else full
    return None



def device_peak_flops(device, precision: str) -> float | None:
    """The peak FLOP/s of a known GPU (a torch.device) at `precision` (bf16 / fp16 count as 16-bit); None on CPU
    or an unknown device."""
    if device.type != "cuda":
        return None
    import torch

    return known_peak_flops(torch.cuda.get_device_name(device), precision in ("bf16", "fp16"))


def train_flops_per_token(model, seq_len: int) -> float:
    """Forward + backward FLOPs per token of a model (3 x forward: 2 per active matmul weight, plus attention
    over the sequence), from `moekit params`' own accounting."""
    from .sources import count_params

    return 3 * derive(count_params(model), Plan(seq_len=seq_len)).figure("forward_flops_per_token").value


@dataclass
class Plan:
    """count total vs active parameters; FLOPs, memory, time and cost

    Count a model's parameters exactly, total and active per token, by component, from a preset, a config.json, a
    checkpoint directory (safetensors headers only) or a bare count such as 7B; then the FLOPs per token, weight,
    KV-cache and training memory, training time and cost they imply at the precision, shapes, training run and
    hardware given here. (In Python, these options are the plan `derive(count, plan)` works out.)"""

    dtype: Literal[tuple(DTYPE_BYTES)] = option("bf16", "weight / KV / gradient precision")
    seq_len: int = option(2048, "context for attention FLOPs and the KV cache", metavar="S", min=1)
    batch: int = option(1, "sequences in the KV cache", metavar="B", min=1)
    tokens: float | None = option(None, "training tokens (e.g. 300B): training FLOPs = 3 x forward x tokens",
                                  metavar="N", parse=parse_number, gt=0)
    train_flops: float | None = option(None, "training FLOPs, given (e.g. 3.14e23)", metavar="FLOPS",
                                       parse=parse_number, gt=0)
    gpus: int = option(1, "GPUs, for memory per GPU and training time", metavar="N", min=1)
    zero: Literal[0, 1, 2, 3] = option(0, "ZeRO stage: 1 shards optimizer states, 2 + gradients, 3 (FSDP) + weights")
    shard_degree: int | None = option(None, "GPUs the states are sharded over; alone, as `moekit train "
                                      "--shard-degree`: ZeRO-3 (FSDP)", metavar="N", min=1, default_text="--gpus")
    expert_parallel: int = option(1, "GPUs each MoE layer's experts are split over, as `moekit train "
                                  "--expert-parallel` (E/N each)", metavar="N", min=1)
    activation_checkpointing: bool = option(False, "decoder layers recomputed in backward: the forward all-to-all "
                                            "runs twice")
    peak_flops: float | None = option(None, "peak FLOP/s per GPU (e.g. 989e12)", metavar="FLOPS",
                                      parse=parse_number, gt=0)
    peak_flops_per_day: float | None = option(None, "peak FLOPs per GPU-day (e.g. 5.2e18)", metavar="FLOPS",
                                              parse=parse_number, gt=0)
    mfu: float = option(1.0, "model FLOPs utilisation, in (0, 1]", gt=0, max=1)
    price_per_gpu_hour: float | None = option(None, "USD per GPU-hour, for the cost", metavar="USD", gt=0)
    round_days: bool = option(False, "round the time at peak to whole days before dividing by MFU")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        check_options(self)
        if self.peak_flops is not None and self.peak_flops_per_day is not None:
            raise ConfigError("give the peak as --peak-flops (per second) or --peak-flops-per-day, not both")
        if self.tokens is not None and self.train_flops is not None:
            raise ConfigError("give the training work as --tokens or --train-flops, not both")
        if self.shard_degree is not None and not self.zero:
            self.zero = 3  # moekit train --shard-degree: FSDP2
        for flag, n in (("--shard-degree", self.shard_degree or 1), ("--expert-parallel", self.expert_parallel)):
            if self.gpus % n:
                raise ConfigError(f"{flag} {n} does not divide --gpus {self.gpus}")


@dataclass
class Figure:
    key: str  # JSON key
    label: str
    value: float
    unit: str  # flops | bytes | days | usd
    formula: str = ""
    detail: str = ""  # the formula with this model's numbers


@dataclass
class Report:
    count: ParamCount
    plan: Plan
    figures: list[Figure] = field(default_factory=list)

    def figure(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)


def _n(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e7 else f"{x:.4g}"


def derive(count: ParamCount, plan: Plan) -> Report:
    """Every figure the plan allows: FLOPs and memory always; training FLOPs with tokens (or given); time
    with a peak; cost with a price."""
    plan.check()
    r, b, a = Report(count, plan), DTYPE_BYTES[plan.dtype], count.arch
    if plan.expert_parallel > 1 and not (a and a.num_experts and a.num_experts % plan.expert_parallel == 0):
        what = f"its {a.num_experts} experts" if a and a.num_experts else "no routed experts (a dense model)"
        raise ConfigError(f"--expert-parallel {plan.expert_parallel}: {count.target} has {what}; expected a "
                          "divisor of the experts per layer")
    P, Nmm = count.total_params, count.matmul_active_params
    ctx, layers, terms = _context(a, plan.seq_len) if a else (plan.seq_len, 0, "")
    attn = 2 * layers * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) if a else 0
    fwd = 2 * Nmm + attn
    if a:
        r.figures.append(Figure("forward_flops_per_token", "forward FLOPs per token", fwd, "flops",
                                "2 × N_matmul + 2 × layers × context × heads × (d_qk + d_v)",
                                f"2 × {Nmm:,} + 2 × {terms} × {a.num_attention_heads} × "
                                f"({a.qk_head_dim} + {a.v_head_dim})"))
    else:
        r.figures.append(Figure("forward_flops_per_token", "forward FLOPs per token", fwd, "flops",
                                "2 × N_matmul (no attention term: the architecture is unknown)", f"2 × {Nmm:,}"))
    if plan.train_flops is not None:
        r.figures.append(Figure("train_flops", "training FLOPs", plan.train_flops, "flops", "given (--train-flops)",
                                f"{plan.train_flops:.4g}"))
    elif plan.tokens is not None:
        T = plan.tokens
        r.figures.append(Figure("train_flops", f"training FLOPs ({T:.3g} tokens)", 3 * fwd * T, "flops",
                                "3 × forward × tokens = 6 × N_matmul × tokens + 3 × attention × tokens",
                                f"6 × {Nmm:,} × {_n(T)} + 3 × {attn:,} × {_n(T)}"))
    r.figures.append(Figure("weight_memory_bytes", f"weight memory ({plan.dtype})", P * b, "bytes",
                            "total_params × bytes_per_param", f"{P:,} × {b}"))
    if a:
        kv = plan.batch * layers * a.kv_cache_dim * b
        r.figures.append(Figure("kv_cache_bytes", f"KV cache (batch {plan.batch} × {ctx} tokens)", kv, "bytes",
                                "batch × layers × context × cached_per_token_per_layer × bytes",
                                f"{plan.batch} × {terms} × {a.kv_cache_dim} × {b}"))
    r.figures.append(_train_memory(count, b, plan))
    if plan.zero or plan.expert_parallel > 1:
        r.figures.extend(_train_memory_parts(count, b, plan))
    if plan.expert_parallel > 1 and a.hidden_size:
        r.figures.append(_all_to_all(count, b, plan))
    _time_and_cost(r)
    return r


def _context(a, seq_len: int) -> tuple[int, int, str]:
    """(longest context, Σ over attention layers of the context each attends over, that sum written out).
    Only softmax-attention layers count (a hybrid's Mamba or linear-attention layers keep a fixed-size
    state); a sliding window caps the context of the layers that use it."""
    L = a.num_hidden_layers if a.attention_layers is None else a.attention_layers
    if not a.sliding_window:
        return seq_len, L * seq_len, f"{L} × {seq_len}"
    win = min(seq_len, a.sliding_window)
    Ls = L if a.sliding_layers is None else a.sliding_layers
    if Ls == L:
        return win, L * win, f"{L} × {win}"
    return seq_len, (L - Ls) * seq_len + Ls * win, f"({L - Ls} × {seq_len} + {Ls} × {win})"


def _train_memory(count: ParamCount, b: float, plan: Plan) -> Figure:
    """Weights + gradients (at dtype) + AdamW m and v (fp32) + fp32 master copy (when dtype is not fp32) on one
    GPU: each divided by the shard degree where the ZeRO stage shards it; with expert parallelism, the routed
    experts split over N GPUs first, then sharded over the G/N GPUs holding the same experts (as `moekit train`)."""
    P, N, G = count.total_params, plan.expert_parallel, plan.gpus
    d = (plan.shard_degree or G) if plan.zero else 1
    experts = count.total.get("routed_experts", 0) if N > 1 else 0
    de = G // N if d > 1 else 1  # the experts' shard degree
    master = 4 if b < 4 else 0
    parts = [("weights", b, plan.zero >= 3), ("gradients", b, plan.zero >= 2), ("AdamW m+v", 8, plan.zero >= 1),
             ("fp32 master", master, plan.zero >= 1)]
    total = sum(_state_bytes(count, per, plan, sharded) for _, per, sharded in parts)
    terms = " + ".join(f"{per}{f'/{d}' if sharded and d > 1 else ''}" for _, per, sharded in parts if per)
    names = " + ".join(f"{name}{' (sharded)' if sharded and d > 1 else ''}" for name, per, sharded in parts if per)
    where = f"ZeRO-{plan.zero} over {d} GPUs" if plan.zero else "no sharding"
    if not experts:
        return Figure("train_memory_bytes_per_gpu", f"training memory per GPU ({where})", total,
                      "bytes", f"total_params × ({names})", f"{P:,} × ({terms})")
    expert_terms = " + ".join(f"{per}{f'/{de}' if sharded and de > 1 else ''}" for _, per, sharded in parts if per)
    return Figure("train_memory_bytes_per_gpu", f"training memory per GPU ({where}, EP {N})", total,
                  "bytes", f"(params - routed) × ({names}) + routed / N × (the same, sharded over G/N)",
                  f"{P - experts:,} × ({terms}) + {experts:,} / {N} × ({expert_terms})")


def _train_memory_parts(count: ParamCount, b: float, plan: Plan) -> list[Figure]:
    """The training memory per GPU split into weights, gradients and optimizer state (AdamW m, v and the fp32
    master copy), each as `_train_memory` divides it."""
    out = []
    for key, label, per, stage in (("weights", "weights", b, 3), ("gradients", "gradients", b, 2),
                                   ("optimizer", "optimizer state", 8 + (4 if b < 4 else 0), 1)):
        value = _state_bytes(count, per, plan, plan.zero >= stage)
        out.append(Figure(f"train_{key}_bytes_per_gpu", f"  of which {label}", value, "bytes",
                          f"{per} bytes per parameter, as the training memory divides it", f"{value:,.0f}"))
    return out


def _state_bytes(count: ParamCount, per: float, plan: Plan, sharded: bool) -> float:
    """Bytes per GPU of a state of `per` bytes per parameter: the dense part ÷ the shard degree when `sharded`,
    the routed experts ÷ N (then ÷ G/N when sharded)."""
    P, N, G = count.total_params, plan.expert_parallel, plan.gpus
    d = (plan.shard_degree or G) if plan.zero else 1
    experts = count.total.get("routed_experts", 0) if N > 1 else 0
    de = G // N if d > 1 else 1
    return per * ((P - experts) / (d if sharded else 1) + experts / N / (de if sharded else 1))


def _all_to_all(count: ParamCount, b: float, plan: Plan) -> Figure:
    """Bytes one GPU sends per MoE layer and step under expert parallelism: each token's k copies go to the GPU of
    their expert ((N-1)/N of them off this GPU when routing is uniform) and come back, in forward and backward."""
    a, N = count.arch, plan.expert_parallel
    H, k, T = a.hidden_size, a.num_experts_per_tok, plan.batch * plan.seq_len
    exchanges = 6 if plan.activation_checkpointing else 4  # dispatch + combine, forward (twice) and backward
    value = T * k * (N - 1) / N * H * b * exchanges
    return Figure("all_to_all_bytes_per_layer_step", f"all-to-all per GPU, MoE layer and step ({T:,} tokens)",
                  value, "bytes", "batch × seq_len × k × (N-1)/N × hidden × bytes × exchanges (4; 6 with "
                  "activation checkpointing)", f"{T:,} × {k} × {N - 1}/{N} × {H} × {b} × {exchanges}")


def _time_and_cost(r: Report) -> None:
    plan, F = r.plan, r.figure("train_flops")
    if F is None or (plan.peak_flops is None and plan.peak_flops_per_day is None):
        return
    per_day = plan.peak_flops_per_day or plan.peak_flops * SECONDS_PER_DAY
    per_day_src = (f"{plan.peak_flops_per_day:.4g}" if plan.peak_flops_per_day
                   else f"{plan.peak_flops:.4g} × {SECONDS_PER_DAY}")
    peak_days = F.value / (plan.gpus * per_day)
    detail = f"{F.value:.4g} / ({plan.gpus} × {per_day_src})"
    if plan.round_days:
        detail += f" = {peak_days:.2f}, rounded"
        peak_days = float(round(peak_days))
    r.figures.append(Figure("train_days_at_peak", f"training time at peak on {plan.gpus} GPUs", peak_days, "days",
                            "train_flops / (gpus × peak FLOPs per GPU-day)" + (", whole days" if plan.round_days
                                                                               else ""), detail))
    days = peak_days / plan.mfu
    if plan.mfu != 1:
        r.figures.append(Figure("train_days", f"training time at {plan.mfu:.0%} MFU", days, "days",
                                "days_at_peak / mfu", f"{_n(peak_days)} / {plan.mfu}"))
    if plan.price_per_gpu_hour is not None:
        cost = plan.price_per_gpu_hour * plan.gpus * 24 * days
        r.figures.append(Figure("cost_usd", f"cost at ${plan.price_per_gpu_hour:g}/GPU-hour", round(cost, 2), "usd",
                                "price_per_gpu_hour × gpus × 24 × days_at_peak / mfu",
                                f"{plan.price_per_gpu_hour:g} × {plan.gpus} × 24 × {_n(peak_days)} / {plan.mfu}"))
