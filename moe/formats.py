"""Hugging Face MoE checkpoint formats: the one place that knows their on-disk names and config fields.

In memory (transformers 5 names):   model.layers.N.mlp.gate.weight [E, H], mlp.experts.gate_up_proj [E, 2F, H]
                                    (gate rows, then up rows), mlp.experts.down_proj [E, H, F], mlp.shared_expert.*
On disk, `mixtral`:                 model.layers.N.block_sparse_moe.gate.weight,
                                    block_sparse_moe.experts.J.{w1 (gate) [F, H], w3 (up) [F, H], w2 (down) [H, F]}
On disk, `qwen2_moe`:               model.layers.N.mlp.gate.weight, mlp.experts.J.{gate,up,down}_proj.weight,
                                    mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight
Reading also accepts the fused in-memory names (gate_up_proj / down_proj) under either prefix.

The small pure functions here (names, config.json) let a converter stream a checkpoint expert by expert
without building a model; `to_disk` turns a whole in-memory state dict into either format, `disk_plan` reads
either back, tensor by tensor.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from functools import partial

import torch

from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.model import Read

from .config import MoEConfig

FORMATS = ("mixtral", "qwen2_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}
_EXPERT = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
           "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}
# MoE fields dropped from an HF config.json, then written back under the format's names where it has them;
# training-only fields transformers ignores (router_z_loss_coef, router_bias_update_rate) are kept.
_OURS_ONLY = ("num_shared_experts", "shared_expert_gate", "router_score", "capacity_factor", "first_k_dense_replace",
              "qkv_bias", "attention_bias", "mlp_bias", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "num_local_experts")
_FOREIGN = ("architectures", "torch_dtype", "dtype", "transformers_version", "layer_types", "max_window_layers",
            "use_sliding_window", "sliding_window", "num_experts", "output_router_logits")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format '{format}'; expected one of {FORMATS} or 'auto'")


def problems(config: MoEConfig, format: str) -> list[str]:
    """What in `config` the format cannot express (empty: it can)."""
    _check_format(format)
    out = []
    if config.router_score != "softmax":
        out.append(f"router_score '{config.router_score}' (it routes with softmax)")
    if config.capacity_factor is not None:
        out.append(f"capacity_factor {config.capacity_factor} (it is dropless)")
    if config.mlp_bias:
        out.append("mlp_bias (its MLPs have no biases)")
    if format == "mixtral":
        dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
        if dense:
            out.append(f"dense layers {dense} (every Mixtral layer is MoE)")
        if config.has_shared_expert:
            out.append("a shared expert")
        if not config.norm_topk_prob:
            out.append("norm_topk_prob false (Mixtral renormalises the top-k weights)")
        if config.attention_bias or config.attention_qkv_bias:
            out.append("attention biases")
    else:
        if config.has_shared_expert and not config.shared_expert_gate:
            out.append("a shared expert without shared_expert_gate (Qwen2-MoE always gates it)")
        if config.attention_bias:
            out.append("an o_proj bias (Qwen2-MoE has q/k/v biases only: use qkv_bias)")
    return out


def choose_format(config: MoEConfig, format: str = "auto") -> str:
    """The format to write `config` in: `auto` picks mixtral when it can express the config, else qwen2_moe.

    Raises ConfigError naming the format that can express the config when the requested one cannot."""
    if format == "auto":
        if not problems(config, "mixtral"):
            return "mixtral"
        if not problems(config, "qwen2_moe"):
            return "qwen2_moe"
        raise ConfigError(_neither(config))
    found = problems(config, format)
    if not found:
        return format
    other = next(f for f in FORMATS if f != format)
    if problems(config, other):
        raise ConfigError(_neither(config))
    raise ConfigError(f"format '{format}' cannot express this config ({'; '.join(found)}); use format '{other}'")


def _neither(config: MoEConfig) -> str:
    why = "; ".join(f"{f}: {', '.join(problems(config, f))}" for f in FORMATS)
    return f"neither HF format can express this config ({why})"


def hf_config_dict(config: MoEConfig, format: str) -> dict:
    """The config.json to write for `config` in `format`: model_type, architectures and that format's field names."""
    choose_format(config, format)
    d = config.to_dict()
    for k in _FOREIGN + _OURS_ONLY + ("model_type",):
        d.pop(k, None)
    d = {"architectures": [ARCHITECTURES[format]], "model_type": format, **d}
    d["num_experts_per_tok"] = config.num_experts_per_tok
    d["router_aux_loss_coef"] = config.router_aux_loss_coef
    if format == "mixtral":
        d["intermediate_size"] = config.moe_intermediate_size  # Mixtral's experts use intermediate_size
        d["num_local_experts"] = config.num_local_experts
        d["sliding_window"] = None
    else:
        d.pop("router_jitter_noise", None)
        d["num_experts"] = config.num_local_experts
        d["moe_intermediate_size"] = config.moe_intermediate_size
        d["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
        d["norm_topk_prob"] = config.norm_topk_prob
        d["decoder_sparse_step"] = config.decoder_sparse_step
        d["mlp_only_layers"] = sorted(set(config.mlp_only_layers) | set(range(config.first_k_dense_replace)))
        d["qkv_bias"] = config.attention_qkv_bias
        d["use_sliding_window"] = False
        if config.num_shared_experts > 1:  # how many experts the fused shared MLP counts for (accounting)
            d["num_shared_experts"] = config.num_shared_experts
    if config.head_dim == config.hidden_size // config.num_attention_heads:
        d.pop("head_dim", None)
    return d


# ---- tensor names on disk --------------------------------------------------------------------------

def router_name(format: str, layer: int) -> str:
    _check_format(format)
    return f"model.layers.{layer}.{_PREFIX[format]}.gate.weight"


def router_bias_name(format: str, layer: int) -> str:
    """The auxiliary-loss-free bias (DeepSeek-V3's name); neither HF format reads it (see `to_disk`)."""
    _check_format(format)
    return f"model.layers.{layer}.{_PREFIX[format]}.gate.e_score_correction_bias"


def expert_names(format: str, layer: int, expert: int) -> dict[str, str]:
    """{"gate": ..., "up": ..., "down": ...}: disk names of expert `expert`'s [F, H], [F, H], [H, F] weights."""
    _check_format(format)
    base = f"model.layers.{layer}.{_PREFIX[format]}.experts.{expert}"
    return {role: f"{base}.{name}.weight" for role, name in _EXPERT[format].items()}


def shared_expert_names(format: str, layer: int) -> dict[str, str]:
    """{"gate", "up", "down", "shared_gate"}: disk names of the shared expert (qwen2_moe only)."""
    _check_format(format)
    if format != "qwen2_moe":
        raise ConfigError(f"format '{format}' has no shared expert; use format 'qwen2_moe'")
    base = f"model.layers.{layer}.mlp"
    return {"gate": f"{base}.shared_expert.gate_proj.weight", "up": f"{base}.shared_expert.up_proj.weight",
            "down": f"{base}.shared_expert.down_proj.weight", "shared_gate": f"{base}.shared_expert_gate.weight"}


def dense_mlp_names(layer: int) -> dict[str, str]:
    """{"gate", "up", "down"}: a dense layer's MLP, llama names (both formats)."""
    return {role: f"model.layers.{layer}.mlp.{role}_proj.weight" for role in ("gate", "up", "down")}


# ---- whole state dicts ------------------------------------------------------------------------------

_MOE_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")


def to_disk(config: MoEConfig, format: str, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """In-memory (name, tensor) pairs -> disk pairs of `format`, experts split into per-expert [F, H] / [H, F] views.

    A nonzero auxiliary-loss-free router bias is written under DeepSeek-V3's name with a warning: neither format
    reads it, so transformers would route without it."""
    format = choose_format(config, format)
    for name, t in state.items():
        m = _MOE_KEY.fullmatch(name)
        if not m or not config.is_moe_layer(int(m[1])):
            yield name, t
            continue
        i, rest = int(m[1]), m[2]
        if rest == "gate.weight":
            yield router_name(format, i), t
            if format == "qwen2_moe" and not config.has_shared_expert:  # what transformers writes for width 0
                names, H = shared_expert_names(format, i), config.hidden_size
                yield names["gate"], t.new_zeros(0, H)
                yield names["up"], t.new_zeros(0, H)
                yield names["down"], t.new_zeros(H, 0)
                yield names["shared_gate"], t.new_zeros(1, H)
        elif rest == "gate.e_score_correction_bias":
            if bool(t.any()):
                warnings.warn(f"layer {i}: the auxiliary-loss-free router bias is nonzero; format '{format}' cannot "
                              f"hold it (transformers ignores it), moekit writes it as '{router_bias_name(format, i)}'",
                              stacklevel=2)
                yield router_bias_name(format, i), t
        elif rest == "experts.gate_up_proj":
            down, Fe = state[f"model.layers.{i}.mlp.experts.down_proj"], config.moe_intermediate_size
            for e in range(config.num_local_experts):
                names = expert_names(format, i, e)
                yield names["gate"], t[e, :Fe]
                yield names["up"], t[e, Fe:]
                yield names["down"], down[e]
        elif rest != "experts.down_proj":  # shared expert: in-memory names are qwen2_moe's disk names
            yield name, t


def disk_plan(reader, config: MoEConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, Read]:
    """{name: its reader} of the in-memory state dict `expected` ({name: shape}) from a checkpoint of either format
    (per-expert or transformers-5 fused expert tensors): every shape checked, and tensors it does not use refused,
    before anything is read. A routed expert tensor's reader takes the rows (experts) to read: a rank of an
    expert-parallel run reads only its own experts."""
    used: set[str] = set()

    def get(disk: str, shape: tuple[int, ...]) -> Read:
        if disk not in reader:
            raise CheckpointError(f"{reader.path}: tensor '{disk}' is missing")
        if reader.shape(disk) != tuple(shape):
            raise CheckpointError(f"{reader.path}: tensor '{disk}' has shape {list(reader.shape(disk))}, expected "
                                  f"{list(shape)} from config.json")
        used.add(disk)
        return partial(reader.get, disk)

    def stacked(reads: list[Read]) -> Read:
        """The experts' tensors [F, H] or [H, F] of `reads` (one per expert), stacked [E, ...] (rows: those experts)."""
        return lambda rows=None: torch.stack([read(None) for read in reads[rows or slice(None)]])

    plan: dict[str, Read] = {}
    E, Fe, H = config.num_local_experts, config.moe_intermediate_size, config.hidden_size
    for name, shape in expected.items():
        m = _MOE_KEY.fullmatch(name)
        if not m or not config.is_moe_layer(int(m[1])):
            plan[name] = get(name, shape)
            continue
        i, rest = int(m[1]), m[2]
        prefix = next((f"model.layers.{i}.{p}" for p in ("block_sparse_moe", "mlp")
                       if f"model.layers.{i}.{p}.gate.weight" in reader), f"model.layers.{i}.mlp")
        if rest == "gate.e_score_correction_bias":
            disk = f"{prefix}.gate.e_score_correction_bias"
            zeros = lambda rows=None, s=shape: torch.zeros(s)[rows or slice(None)]  # noqa: E731 (not stored: off)
            plan[name] = get(disk, shape) if disk in reader else zeros
        elif rest == "experts.gate_up_proj":
            if f"{prefix}.experts.gate_up_proj" in reader:  # transformers-5 fused names
                plan[name] = get(f"{prefix}.experts.gate_up_proj", shape)
                continue
            fmt = "mixtral" if f"{prefix}.experts.0.w1.weight" in reader else "qwen2_moe"
            names = [{r: n.replace(f"model.layers.{i}.{_PREFIX[fmt]}", prefix) for r, n in
                      expert_names(fmt, i, e).items()} for e in range(E)]
            gate, up = (stacked([get(n[r], (Fe, H)) for n in names]) for r in ("gate", "up"))
            plan[name] = lambda rows=None, gate=gate, up=up: torch.cat([gate(rows), up(rows)], dim=1)  # [E, 2F, H]
            plan[name.replace("gate_up_proj", "down_proj")] = stacked([get(n["down"], (H, Fe)) for n in names])
        elif rest == "experts.down_proj":
            if f"{prefix}.experts.down_proj" in reader:
                plan[name] = get(f"{prefix}.experts.down_proj", shape)
        else:  # router and shared expert
            plan[name] = get(f"{prefix}.{rest}", shape)
    _refuse_unused(reader, config, used)
    missing = [n for n in expected if n not in plan]
    if missing:
        raise CheckpointError(f"{reader.path}: no tensor for '{missing[0]}' (neither per-expert nor fused names)")
    return {n: plan[n] for n in expected}


def _refuse_unused(reader, config: MoEConfig, used: set[str]) -> None:
    """A one-line CheckpointError for the first tensor of `reader` that no in-memory tensor is read from."""
    for name in reader.names():
        if name in used or name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if not config.has_shared_expert and re.fullmatch(r"model\.layers\.\d+\.mlp\.shared_expert.*", name) and (
                "shared_expert_gate" in name or 0 in reader.shape(name)):
            continue  # qwen2_moe's empty shared expert (width 0) contributes nothing
        raise CheckpointError(f"{reader.path}: unexpected tensor '{name}' for an MoE model of this config.json")
