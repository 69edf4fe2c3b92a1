"""Parameter accounting: exact total and active-per-token parameter counts, by component, from a preset name,
a config.json, a checkpoint directory (safetensors headers only, never tensor data) or a live nn.Module.

    count_params("mixtral-8x7b")            # preset -> formula (moe.accounting.formulas)
    count_params("path/to/config.json")     # config.json -> formula
    count_params("path/to/checkpoint")      # headers: each tensor classified by name
    count_params(model)                     # live module: walked, MoE-aware by duck typing
    count_params("7B")                      # a bare count, for the derived figures only

Components: embedding, attention, dense_ffn, routed_experts, shared_experts, router, norm, lm_head, other.
Active: routed experts count k/E (per layer: k of its E experts), everything else in full. Tied weights count
once (under embedding); an LM-head bias stays separate, under lm_head. The total is transformers'
sum(p.numel() for p in model.parameters()): a routing-score correction bias (e_score_correction_bias,
expert_bias) that the model holds as a parameter, even a frozen one (ERNIE 4.5, AFMoE, Laguna), counts under
router; one held as a buffer (DeepSeek-V3 and most others, moekit's Router) is reported in `buffers`, apart from
the totals. A checkpoint has names only: its correction biases count as parameters where the model_type is one
of formulas.FROZEN_ROUTING_BIAS, else as buffers. Derived buffers (rotary inv_freq) are not counted.
Derived figures (FLOPs, memory, time, cost) are in moe.accounting.cost.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from torch import nn

from moekit.llama.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, CheckpointReader
from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import read_config_json
from moekit.llama.options import parse_number
from moekit.moe.config import MOE_PRESETS, MoEConfig

from .formulas import (
    FROZEN_ROUTING_BIAS,
    SUPPORTED_MODEL_TYPES,
    ParamCount,
    Tally,
    count_config,
)

# load-balancing state: under router where the model holds it as a parameter, else reported as a buffer
ROUTING_BIASES = {"e_score_correction_bias", "expert_bias"}
_BUFFERS = {"inv_freq", "original_inv_freq", *ROUTING_BIASES}  # stored state, not parameters
_EMBED = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "embeddings"}
_ATTN = {"self_attn", "attn", "attention", "self_attention", "mamba", "mixer", "linear_attn"}  # token mixers
_FFN = {"mlp", "mlps", "feed_forward", "ffn", "block_sparse_moe"}
_EXPERT_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\..*?\bexperts\.(\d+)\.")
# what configs call the expert count and top-k (transformers' field names and their aliases)
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k",
                "top_k_experts")
MAX_COUNT = 1e18  # a bare count larger than this is a typo (the largest models have about 10^12 parameters)


def classify(name: str) -> str | None:
    """The component of a parameter or tensor, from its name (HF, Mixtral, Qwen2-MoE, DeepSeek, DBRX and
    moekit names); None for a buffer's name (a routing-score correction bias included: the callers count it under
    router where the model holds it as a parameter)."""
    parts = name.split(".")
    if parts[-1] in _BUFFERS:
        return None
    leaf, mods = (parts[-2] if len(parts) > 1 else ""), set(parts[:-1])
    if mods & _EMBED:
        return "embedding"
    if parts[0] in ("lm_head", "embed_out"):
        return "lm_head"
    if "norm" in leaf or leaf.startswith("ln"):
        return "norm"
    if any(p.startswith(("shared_expert", "shared_mlp")) for p in parts):
        return "shared_experts"
    if leaf in ("gate", "router") or mods & {"router", "gate"}:
        return "router"
    if "experts" in mods:
        return "routed_experts"
    if mods & _ATTN:
        return "attention"
    if mods & _FFN:
        return "dense_ffn"
    return "other"


def _experts_topk(d: dict) -> tuple[int | None, int | None]:
    """(E, k) from any config dict, whatever the family calls them (also under ffn_config or text_config)."""
    subs = [x for x in (d, d.get("ffn_config"), d.get("text_config")) if isinstance(x, dict)]
    E = next((s[f] for s in subs for f in EXPERT_FIELDS if isinstance(s.get(f), int) and s[f] > 0), None)
    k = next((s[f] for s in subs for f in TOP_K_FIELDS if isinstance(s.get(f), int) and s[f] > 0), None)
    return E, k


def routing_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTING_BIASES


def _formula_or_none(d: dict, target: str) -> ParamCount | None:
    """The config formula where the model_type has one (checkpoints and modules still count without it)."""
    if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return None
    return count_config(d, target)


# ---- checkpoint directories: headers only -------------------------------------------------------------

def count_checkpoint(path: str | os.PathLike) -> ParamCount:
    """Counts from a Hugging Face directory's safetensors headers (the tensor data is never read)."""
    path = str(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        files = os.listdir(path)
        if not any(f.endswith((".safetensors", *PICKLE_SUFFIXES)) or f == INDEX_NAME for f in files):
            raise CheckpointError(f"{path}: no *.safetensors weight files (to count from the config alone, "
                                  f"pass {os.path.join(path, 'config.json')})")
    reader = CheckpointReader(path)  # parses config.json and every shard header, checking sizes
    cfg_path = os.path.join(path, "config.json")
    d = reader.config
    if not isinstance(d, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    formula = _formula_or_none(d, cfg_path)
    E, k = (formula.arch.num_experts, formula.arch.num_experts_per_tok) if formula else _experts_topk(d)
    Z = formula.arch.zero_experts if formula else 0
    tied = formula.tied if formula else bool(d.get("tie_word_embeddings", False))
    frozen_bias = (formula.model_type if formula else d.get("model_type")) in FROZEN_ROUTING_BIAS
    kinds = {n: classify(n) for n in reader.names()}
    has_embedding = "embedding" in kinds.values()
    t, experts_seen = Tally(), {}
    for name, comp in kinds.items():
        shape = reader.shape(name)
        if comp is None:
            if not routing_bias(name):
                continue
            if not frozen_bias:
                t.buffer(name.rsplit(".", 1)[-1], math.prod(shape))
                continue
            comp = "router"  # a parameter (frozen) in transformers' model of this model_type
        if comp == "lm_head" and tied and name.rsplit(".", 1)[-1] == "weight":  # only the weight is tied
            if has_embedding:
                continue  # a tied matrix stored twice counts once
            comp = "embedding"
        if comp in ("dense_ffn", "other") and E and len(shape) == 3 and shape[0] == E:
            comp = "routed_experts"  # stacked [E, out, in] under a name that does not say 'experts'
        if comp == "routed_experts" and len(shape) == 1 and not _EXPERT_INDEX.search(name):
            comp = "other"  # one vector for the whole layer (JetMoE's output bias), not one per expert
        if comp == "routed_experts":
            if not E:
                raise ConfigError(f"{cfg_path}: tensor {shown(name)} is a routed expert, but config.json names no "
                                  f"expert count ({' / '.join(EXPERT_FIELDS)})")
            m = _EXPERT_INDEX.search(name)
            if m:
                experts_seen.setdefault(m.group(1), set()).add(int(m.group(2)))
            elif len(shape) == 3 and shape[0] != E:
                raise CheckpointError(f"{path}: stacked expert tensor {shown(name)} has {shape[0]} experts, "
                                      f"config.json says {E}")
            t.add_routed(math.prod(shape), E, zero_experts=Z)
        else:
            t.add(comp, math.prod(shape))
    for layer, idx in experts_seen.items():
        if len(idx) != E:
            raise CheckpointError(f"{path}: layer {shown(layer)} stores {len(idx)} experts, config.json says {E}")
    if t.routed and not k:
        raise ConfigError(f"{cfg_path}: routed experts found but no top-k: field 'num_experts_per_tok' is missing "
                          f"(also looked for {', '.join(TOP_K_FIELDS[1:])})")
    count = t.result(k or 0, target=path, source="checkpoint", tied=tied, arch=formula.arch if formula else None,
                     model_type=d.get("model_type"))
    _compare(count, formula, "config.json formula")
    if formula is None:
        how = (f"routed experts by name and shape (experts.N.* or stacked [E, ...]; E = {E} and k = {k} from "
               "config.json)" if t.routed else "no routed experts found")
        count.notes.append(f"model_type {shown(d.get('model_type'))} has no formula: total exact from the safetensors "
                           f"headers; components classified by tensor name, {how}; no attention FLOPs or KV cache")
    return count


def _compare(count: ParamCount, formula: ParamCount | None, what: str) -> None:
    if formula is None:
        return
    if (formula.total_params, formula.active_params) == (count.total_params, count.active_params):
        count.notes.append(f"{what} agrees exactly")
    else:
        count.notes.append(f"{what} gives {formula.total_params:,} total / {formula.active_params:,} active; "
                           f"this {count.source} has {count.total_params:,} / {count.active_params:,}")


# ---- live modules ---------------------------------------------------------------------------------------

def _config_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def count_module(module: nn.Module, config: Any = None, top_k: int | None = None) -> ParamCount:
    """Counts from a live module's parameters (tied parameters once, frozen ones too), classified by name; a
    routing-score correction bias counts under router where it is a parameter, in `buffers` where a buffer.

    MoE-aware by duck typing: a parameter under an ``experts`` module, or any 3-D parameter whose leading dim
    is the config's expert count E (stacked experts [E, out, in]), is a routed expert; k/E of it is active,
    with k from ``top_k``, else the config (``module.config`` unless ``config`` is given), else a ``top_k`` /
    ``num_experts_per_tok`` attribute of a submodule."""
    cfg = config if config is not None else getattr(module, "config", None)
    target = type(module).__name__
    formula = None
    if cfg is not None:
        formula = (count_config(cfg, target) if isinstance(cfg, MoEConfig)
                   else _formula_or_none(_config_dict(cfg), target))
    E_cfg, k = (formula.arch.num_experts, formula.arch.num_experts_per_tok) if formula else _experts_topk(
        _config_dict(cfg))
    Z = formula.arch.zero_experts if formula else 0
    k = top_k or k or next((getattr(m, a) for m in module.modules() for a in ("top_k", "num_experts_per_tok")
                            if isinstance(getattr(m, a, None), int)), None)
    t, seen, tied = Tally(), set(), False
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            comp = classify(name)
            if id(p) in seen:
                tied = tied or comp in ("lm_head", "embedding")
                continue
            seen.add(id(p))
            if comp is None:  # a parameter with a buffer's name counts all the same:
                comp = "router" if routing_bias(name) else "other"  # a frozen one in ERNIE 4.5, AFMoE, Laguna
            stacked = p.ndim == 3 and comp in ("routed_experts", "dense_ffn", "other") and (
                comp == "routed_experts" or p.shape[0] == E_cfg)
            if comp == "routed_experts" and p.ndim == 1 and not _EXPERT_INDEX.search(name):
                comp = "other"  # one vector for the whole layer (JetMoE's output bias), not one per expert
            if comp == "routed_experts" or stacked:
                E = p.shape[0] if stacked else (E_cfg or getattr(mod, "num_experts", None))
                if not E:
                    raise ConfigError(f"{target}: parameter {shown(name)} is a routed expert, but neither the config "
                                      "nor the module gives the expert count")
                t.add_routed(p.numel(), E, zero_experts=Z)
            else:
                t.add(comp, p.numel())
    for name, b in module.named_buffers():
        if routing_bias(name):
            t.buffer(name.rsplit(".", 1)[-1], b.numel())
    if t.routed and not k:
        raise ConfigError(f"{target}: routed experts found but no top-k; pass top_k=")
    count = t.result(k or 0, target=target, source="module", tied=tied, arch=formula.arch if formula else None,
                     model_type=getattr(cfg, "model_type", None) or _config_dict(cfg).get("model_type"))
    _compare(count, formula, "config formula")
    return count


# ---- targets: preset, config.json, directory, number, module ---------------------------------------------

def preset_names() -> list[str]:
    return sorted({*LLAMA_PRESETS, *MOE_PRESETS})


def count_params(target: Any, top_k: int | None = None) -> ParamCount:
    """Counts for a preset name, config.json path, checkpoint directory, bare count ('7B'), config
    (dict or object) or nn.Module."""
    if isinstance(target, nn.Module):
        return count_module(target, top_k=top_k)
    if not isinstance(target, (str, os.PathLike)):
        return count_config(target, type(target).__name__)
    s = str(target)
    if os.path.isdir(s):
        return count_checkpoint(s)
    if os.path.isfile(s):
        return count_config(read_config_json(s), s)
    key = s.lower()
    if key in LLAMA_PRESETS:
        return count_config(LlamaConfig.from_name(key).to_dict(), s, "preset")
    if key in MOE_PRESETS:
        return count_config(MoEConfig.from_name(key), s, "preset")
    try:
        n = parse_number(s)
    except ValueError:
        n = 0
    if not 0 <= n <= MAX_COUNT:  # 1e400 parses as infinity
        raise ConfigError(f"{shown(s)}: a parameter count must be a finite number of at most {MAX_COUNT:.0e}")
    n = round(n)
    if n > 0:
        return ParamCount(target=s, source="number", total={"other": n}, active={"other": n},
                          notes=["a bare count: every parameter taken as an active matmul weight; no attention "
                                 "FLOPs or KV cache"])
    if os.sep in s or s.endswith(".json"):
        raise ConfigError(f"{shown(s)}: no such file or directory")
    raise ConfigError(f"{shown(s)} is not a checkpoint directory, config.json, preset or parameter count (e.g. 7B); "
                      f"presets: {', '.join(preset_names())}")
