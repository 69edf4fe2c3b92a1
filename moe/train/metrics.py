"""What a run reports every --log-every steps: losses, perplexity, learning rate, gradient norm, throughput, MFU,
peak memory and, per MoE layer, how the experts are used.

Everything accumulates in device tensors between log lines (`Interval.add`), so the loop synchronises with the
host only when it logs. Per MoE layer (lists, one entry per MoE layer in layer order):

    aux_loss        the load-balancing loss of the layer alone (unscaled; 1 = balanced, E = all on one expert)
    z_loss          the router z-loss of the layer alone (unscaled)
    expert_fraction the fraction of the interval's token copies each expert received (sums to 1 per layer)
    max_load        max / mean of those counts (1 = perfectly balanced, E = everything on one expert)
    dead_experts    experts that received no token in the whole interval
    entropy         mean entropy of the routing distribution per token, nats (log E = uniform, 0 = collapsed)
    dropped         token copies dropped by the capacity limit
"""

from __future__ import annotations

import math

import torch

from moekit.llama.errors import ConfigError, shown
from moekit.moe.accounting.cost import device_peak_flops, train_flops_per_token  # noqa: F401 (the trainer's MFU inputs)


class Interval:
    """Sums of device tensors since the last log line."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def add_routing(self, stats, weight: float) -> None:
        """One micro-batch's RouterStats, weighted as a share of its step."""
        self.add("layer_aux_loss", stats.aux_loss.float() * weight)
        self.add("layer_z_loss", stats.z_loss.float() * weight)
        self.add("layer_entropy", stats.entropy.float() * weight)
        self.add("counts", stats.tokens_per_expert)
        self.add("dropped", stats.dropped)

    def state(self) -> dict:
        """The sums as JSON (saved with the training state, so a resumed run logs exactly what it would have)."""
        return {"steps": self.steps, "sums": {k: {"dtype": str(v.dtype).removeprefix("torch."), "value": v.tolist()}
                                              for k, v in self.sums.items()}}

    def load(self, state, device, shapes: dict[str, tuple], where: str) -> None:
        """The sums `state()` saved (read from `where`), each a known name of the shape `shapes` gives
        (`interval_shapes`); anything else is a one-line ConfigError, never a tensor of another shape."""
        steps, sums = (state.get("steps"), state.get("sums")) if isinstance(state, dict) else (None, None)
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 and isinstance(sums, dict)):
            raise ConfigError(f"{where}: 'interval' must hold a step count and the metric sums, as moekit saves them")
        loaded = {}
        for name, v in sums.items():
            dtype = v.get("dtype") if isinstance(v, dict) else None
            if name not in shapes or dtype not in _DTYPES:
                raise ConfigError(f"{where}: interval sum {shown(name)} is not one this model's run keeps")
            try:
                loaded[name] = torch.tensor(v.get("value"), dtype=getattr(torch, dtype), device=device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                loaded[name] = None
            if loaded[name] is None or tuple(loaded[name].shape) != shapes[name]:
                raise ConfigError(f"{where}: interval sum {shown(name)} is not numbers of shape {list(shapes[name])}")
        self.steps, self.sums = steps, loaded

    def report(self, reduce_mean, reduce_sum) -> dict:
        """Means over the interval's steps (all processes) as Python numbers: the host sync of a log step."""
        n, out = max(self.steps, 1), {}
        for name, v in self.sums.items():
            if name in ("counts", "dropped"):
                out[name] = reduce_sum(v)
            else:
                out[name] = reduce_mean(v / n)
        values = {k: v.tolist() for k, v in out.items()}
        self.sums, self.steps = {}, 0
        return values


_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")


def interval_shapes(config) -> dict[str, tuple]:
    """{name: shape} of every sum an Interval of a run of a model with `config` may hold."""
    shapes = {name: () for name in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")}
    if hasattr(config, "num_local_experts"):
        L = sum(1 for i in range(config.num_hidden_layers) if config.is_moe_layer(i))  # MoE layers
        shapes.update(layer_aux_loss=(L,), layer_z_loss=(L,), layer_entropy=(L,), dropped=(L,),
                      counts=(L, config.num_local_experts))
    return shapes


def routing_entry(values: dict) -> dict:
    """The per-layer MoE fields of a metrics line from an interval's reduced values."""
    counts = torch.tensor(values["counts"], dtype=torch.float64)  # [L_moe, E]
    total = counts.sum(-1, keepdim=True).clamp(min=1)
    r = lambda xs: [round(x, 5) for x in xs]  # noqa: E731
    return {"layer_aux_loss": r(values["layer_aux_loss"]), "layer_z_loss": r(values["layer_z_loss"]),
            "expert_fraction": [r(row) for row in (counts / total).tolist()],
            "max_load": r((counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)).tolist()),
            "dead_experts": (counts == 0).sum(-1).tolist(), "entropy": r(values["layer_entropy"]),
            "dropped": [int(d) for d in values["dropped"]]}


def train_state_bytes(model, optimizer) -> int:
    """Bytes of the training state this process holds: its weights (or shards of them), a gradient of each trainable
    one, and the optimizer's moments: what `moekit params --gpus G --shard-degree S --expert-parallel N` plans."""
    opt = getattr(optimizer, "optimizer", optimizer)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    total = 0
    for p in model.parameters():
        n = local(p).numel() * local(p).element_size()
        total += n * (2 if p.requires_grad else 1)
        total += sum(local(t).numel() * local(t).element_size() for t in opt.state.get(p, {}).values()
                     if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, processes: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None without a peak)."""
    return None if not peak else flops_per_token * tokens_per_s / (peak * processes)


def flat_scalars(entry: dict) -> dict:
    """A metrics line as tracker scalars: lists become one scalar per layer (and expert)."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, list):
                    out.update({f"{k}/layer{i}/expert{e}": y for e, y in enumerate(x)})
                elif isinstance(x, (int, float)):
                    out[f"{k}/layer{i}"] = x
    return out


TRACKERS = ("tensorboard", "trackio", "wandb")


def trackers(report_to: str) -> list[str]:
    """The accelerate trackers to log to: those named (an error if not installed), or every installed one."""
    import importlib.util

    from moekit.llama.errors import ConfigError

    installed = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    if report_to == "none":
        return []
    if report_to == "all-installed":
        return installed
    if report_to not in installed:
        raise ConfigError(f"--report-to {report_to}: the {report_to} package is not installed (pip install "
                          f"'moekit[trackers]', or pip install {report_to})")
    return [report_to]
