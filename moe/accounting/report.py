"""The report of `moekit params`: the component table with its conventions and the derived figures, as text
(with each figure's formula under `--explain`) or JSON."""

from __future__ import annotations

from moekit.llama.errors import SHOWN, shown

from .cost import DTYPE_BYTES, Figure, Report
from .formulas import COMPONENTS, ParamCount


def fmt_value(f: Figure) -> str:
    if f.unit == "flops":
        return f"{f.value:.3e} FLOPs"
    if f.unit == "bytes":
        return f"{f.value / 1e9:,.2f} GB"
    if f.unit == "days":
        return f"{f.value:,.1f} days" if not float(f.value).is_integer() else f"{int(f.value):,} days"
    return f"${f.value:,.2f}"


def plain(value) -> str:
    """A name from the command line or a file (target, model_type) as the table shows it: as it is when short and
    printable, else escaped and cut by `shown` (a newline or terminal escape never reaches the terminal)."""
    return value if isinstance(value, str) and len(value) <= SHOWN and value.isprintable() else shown(value)


def _b(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def conventions(count: ParamCount) -> list[str]:
    a = count.arch
    if a and a.num_experts and a.zero_experts:
        E, k, Z = a.num_experts, a.num_experts_per_tok, a.zero_experts
        routed = (f"the router picks k = {k} of {E} experts + {Z} zero-computation (identity) experts, so "
                  f"routed experts count k/(E + Z) = {k}/{E + Z} (k·E/(E + Z) = {k * E / (E + Z):g} real experts "
                  "per token on average); everything else in full")
    elif a and a.num_experts:
        routed = f"routed experts count k/E = {a.num_experts_per_tok}/{a.num_experts}; everything else in full"
    else:
        routed = ("routed experts count k/E, everything else in full" if count.total.get("routed_experts")
                  else "every parameter (no routed experts)")
    out = ["embeddings and the LM head are counted, and shown separately (some publishers exclude them)",
           "tied weights are counted once (under embedding)",
           f"active = used per token: {routed}"]
    if count.total.get("shared_experts"):
        out.append("shared experts are active for every token (counted in full)")
    if a and a.zero_experts:
        lo = count.active_params - count.active["routed_experts"]
        hi = lo + count.total["routed_experts"] * a.num_experts_per_tok // a.num_experts
        out.append(f"per token the active count ranges from {lo:,} (all k picks zero-computation) to {hi:,} "
                   "(all k real)")
    if count.buffers:
        kinds = ", ".join(f"{name} {n:,}" for name, n in count.buffers.items())
        out.append(f"buffers are stored state, not parameters, and not in the totals ({kinds}: the routing-score "
                   "correction bias, updated by load balancing, that this model registers as a buffer; where a "
                   "model holds it as a frozen parameter, as ERNIE 4.5, AFMoE and Laguna do, it counts under router)")
    if a and a.attention_layers is not None and a.attention_layers < a.num_hidden_layers:
        out.append(f"'attention' includes the linear-time mixers (Mamba, linear / delta-net attention); only the "
                   f"{a.attention_layers} softmax-attention layers have a KV cache and context-length FLOPs")
    window = ""
    if a and a.sliding_window:
        n = a.sliding_layers if a.sliding_layers is not None else "all"
        window = f" (capped at the {a.sliding_window}-token sliding window in {n} attention layers)"
    out += [f"FLOPs: multiply-add = 2; attention over the full context{window}; training = 3 × forward",
            "training memory: weights + gradients + AdamW m, v + fp32 master copy; no activations; GB = 10^9 bytes"]
    return out


def render_table(report: Report, explain: bool = False) -> str:
    c = report.count
    T, A = c.total_params, c.active_params
    source = "bare count" if c.source == "number" else c.source
    head = f"{plain(c.target)} ({source}{', model_type ' + plain(c.model_type) if c.model_type else ''})"
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
           "tied_embeddings": c.tied, "buffers": c.buffers, "conventions": conventions(c), "notes": c.notes,
           "plan": {k: v for k, v in vars(report.plan).items()},
           "derived": {f.key: f.value for f in report.figures}}
    if c.arch:
        out["arch"] = vars(c.arch)
    if explain:
        out["explain"] = {f.key: f"{f.formula} = {f.detail}" for f in report.figures}
    return out
