"""What a parameter count costs: forward and training FLOPs, weight, KV-cache and training memory, training
time and price, each with its formula (``--explain``); and the table / JSON report of ``moekit params``.

Conventions: a multiply-add is 2 FLOPs; the forward pass costs 2 FLOPs per active matmul weight per token plus
attention's QK^T and AV products over the full context (non-causal, as in PaLM's MFU formula); training is
3 x forward (backward = 2 x forward). GB = 10^9 bytes. Activations are not in the training memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama.errors import ConfigError

from .accounting_formulas import COMPONENTS, ParamCount

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1,
               "int4": 0.5}
SECONDS_PER_DAY = 86400


@dataclass
class Plan:
    """The question asked of a count: precision, shapes, training run and hardware."""

    dtype: str = "bf16"  # weights (and KV cache, gradients) at this precision
    seq_len: int = 2048
    batch: int = 1
    tokens: float | None = None  # training tokens -> training FLOPs
    train_flops: float | None = None  # or the training FLOPs, given
    gpus: int = 1
    zero: int = 0  # ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 (= FSDP) also weights
    shard_degree: int | None = None  # GPUs the states are sharded over (default: all of them)
    peak_flops: float | None = None  # per GPU, FLOP/s
    peak_flops_per_day: float | None = None  # per GPU, FLOPs a day (the seed's 5.2e18 for 60 TFLOP/s)
    mfu: float = 1.0  # model FLOPs utilisation
    price_per_gpu_hour: float | None = None
    round_days: bool = False  # round the time at peak to whole days before dividing by MFU (as the seed does)

    def check(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown dtype '{self.dtype}'; expected one of {', '.join(DTYPE_BYTES)}")
        for name in ("seq_len", "batch", "gpus"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.peak_flops is not None and self.peak_flops_per_day is not None:
            raise ConfigError("give the peak as --peak-flops (per second) or --peak-flops-per-day, not both")
        for name in ("tokens", "train_flops", "peak_flops", "peak_flops_per_day", "price_per_gpu_hour"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}")


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
    P, Nmm = count.total_params, count.matmul_active_params
    ctx = min(plan.seq_len, a.sliding_window) if a and a.sliding_window else plan.seq_len
    attn = 2 * a.num_hidden_layers * ctx * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) if a else 0
    fwd = 2 * Nmm + attn
    if a:
        r.figures.append(Figure("forward_flops_per_token", "forward FLOPs per token", fwd, "flops",
                                "2 × N_matmul + 2 × layers × context × heads × (d_qk + d_v)",
                                f"2 × {Nmm:,} + 2 × {a.num_hidden_layers} × {ctx} × {a.num_attention_heads} × "
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
        kv = plan.batch * ctx * a.num_hidden_layers * a.kv_cache_dim * b
        r.figures.append(Figure("kv_cache_bytes", f"KV cache (batch {plan.batch} × {ctx} tokens)", kv, "bytes",
                                "batch × context × layers × cached_per_token_per_layer × bytes",
                                f"{plan.batch} × {ctx} × {a.num_hidden_layers} × {a.kv_cache_dim} × {b}"))
    r.figures.append(_train_memory(P, b, plan))
    _time_and_cost(r)
    return r


def _train_memory(P: int, b: float, plan: Plan) -> Figure:
    """Weights + gradients (at dtype) + AdamW m and v (fp32) + fp32 master copy (when dtype is not fp32),
    each divided by the shard degree where the ZeRO stage shards it."""
    d = (plan.shard_degree or plan.gpus) if plan.zero else 1
    master = 4 if b < 4 else 0
    parts = [("weights", b, plan.zero >= 3), ("gradients", b, plan.zero >= 2), ("AdamW m+v", 8, plan.zero >= 1),
             ("fp32 master", master, plan.zero >= 1)]
    total = sum(P * per / (d if sharded else 1) for _, per, sharded in parts)
    terms = " + ".join(f"{per}{f'/{d}' if sharded and d > 1 else ''}" for _, per, sharded in parts if per)
    names = " + ".join(f"{name}{' (sharded)' if sharded and d > 1 else ''}" for name, per, sharded in parts if per)
    where = f"ZeRO-{plan.zero} over {d} GPUs" if plan.zero else "no sharding"
    return Figure("train_memory_bytes_per_gpu", f"training memory per GPU ({where})", total,
                  "bytes", f"total_params × ({names})", f"{P:,} × ({terms})")


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


# ---- rendering -----------------------------------------------------------------------------------------

def fmt_value(f: Figure) -> str:
    if f.unit == "flops":
        return f"{f.value:.3e} FLOPs"
    if f.unit == "bytes":
        return f"{f.value / 1e9:,.2f} GB"
    if f.unit == "days":
        return f"{f.value:,.1f} days" if not float(f.value).is_integer() else f"{int(f.value):,} days"
    return f"${f.value:,.2f}"


def _b(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def conventions(count: ParamCount) -> list[str]:
    a = count.arch
    if a and a.num_experts:
        routed = f"routed experts count k/E = {a.num_experts_per_tok}/{a.num_experts}; everything else in full"
    else:
        routed = ("routed experts count k/E, everything else in full" if count.total.get("routed_experts")
                  else "every parameter (no routed experts)")
    return ["embeddings and the LM head are counted, and shown separately (some publishers exclude them)",
            "tied weights are counted once (under embedding)",
            f"active = used per token: {routed}",
            "FLOPs: multiply-add = 2; attention over the full context; training = 3 × forward",
            "training memory: weights + gradients + AdamW m, v + fp32 master copy; no activations; GB = 10^9 bytes"]


def render_table(report: Report, explain: bool = False) -> str:
    c = report.count
    T, A = c.total_params, c.active_params
    source = "bare count" if c.source == "number" else c.source
    head = f"{c.target} ({source}{', model_type ' + c.model_type if c.model_type else ''})"
    lines = [f"{head}: {T:,} parameters ({_b(T)}), {A:,} active per token ({_b(A)})", ""]
    if c.source != "number":
        lines.append(f"{'component':<16}{'total':>18}{'share':>8}{'active':>18}{'share':>8}")
        for comp in COMPONENTS:
            t, a = c.total.get(comp, 0), c.active.get(comp, 0)
            if t:
                lines.append(f"{comp:<16}{t:>18,}{t / T:>8.1%}{a:>18,}{a / A:>8.1%}")
        lines.append(f"{'total':<16}{T:>18,}{1:>8.1%}{A:>18,}{1:>8.1%}")
        lines.append("")
        lines += [f"  - {s}" for s in conventions(c)]
    lines += [f"  note: {s}" for s in c.notes]
    lines.append("")
    p = report.plan
    lines.append(f"derived (dtype {p.dtype} = {DTYPE_BYTES[p.dtype]:g} bytes/param, seq_len {p.seq_len}, "
                 f"batch {p.batch}, {p.gpus} GPU{'s' if p.gpus > 1 else ''}):")
    for f in report.figures:
        lines.append(f"  {f.label:<58} {fmt_value(f)}")
        if explain:
            lines.append(f"      = {f.formula}")
            lines.append(f"      = {f.detail}")
    return "\n".join(lines)


def as_json(report: Report, explain: bool = False) -> dict:
    c = report.count
    out = {"target": c.target, "source": c.source, "model_type": c.model_type,
           "total_params": c.total_params, "active_params": c.active_params,
           "components": {k: {"total": c.total.get(k, 0), "active": c.active.get(k, 0)} for k in COMPONENTS},
           "tied_embeddings": c.tied, "conventions": conventions(c), "notes": c.notes,
           "plan": {k: v for k, v in vars(report.plan).items()},
           "derived": {f.key: f.value for f in report.figures}}
    if c.arch:
        out["arch"] = vars(c.arch)
    if explain:
        out["explain"] = {f.key: f"{f.formula} = {f.detail}" for f in report.figures}
    return out
