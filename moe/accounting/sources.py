"""Parameter accounting: exact total and active-per-token parameter counts, by component, from a preset name,
a config.json, a checkpoint directory (safetensors headers only, never tensor data) or a live nn.Module.

    count_params("mixtral-8x7b")            # preset -> formula (moe.accounting.formulas)
    count_params("path/to/config.json")     # config.json -> formula
    count_params("path/to/checkpoint")      # headers: each tensor classified by name
    count_params(model)                     # live module: walked, MoE-aware by duck typing
    count_params("7B")                      # a bare count, for the derived figures only

Components: embedding, attention, dense_ffn, routed_experts, shared_experts, router, norm, lm_head, other.
Active: routed experts count k/E (per layer: k of its E experts), everything else in full. Tied weights count
once (under embedding). Buffers (rotary inv_freq, DeepSeek-V3's e_score_correction_bias) are not parameters.
Derived figures (FLOPs, memory, time, cost) are in moe.accounting.cost.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from torch import nn

from llama.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, CheckpointReader
from llama.config import LLAMA_PRESETS, LlamaConfig
from llama.errors import CheckpointError, ConfigError
from llama.io import read_config_json
from llama.options import parse_number
from moe.config import MOE_PRESETS, MoEConfig

from .formulas import (
    SUPPORTED_MODEL_TYPES,
    ParamCount,
    Tally,
    count_config,
)

_BUFFERS = {"inv_freq", "original_inv_freq", "e_score_correction_bias"}  # stored state, not parameters
_EMBED = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in"}
_ATTN = {"self_attn", "attn", "attention", "self_attention"}
_FFN = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
_EXPERT_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\..*?\bexperts\.(\d+)\.")


def classify(name: str) -> str | None:
    """The component of a parameter or tensor, from its name (HF, Mixtral, Qwen2-MoE, DeepSeek, DBRX and
    moekit names); None for a buffer."""
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
    if any(p.startswith("shared_expert") for p in parts):
        return "shared_experts"
    if "experts" in mods:
        return "routed_experts"
    if leaf in ("gate", "router") or "router" in mods:
        return "router"
    if mods & _ATTN:
        return "attention"
    if mods & _FFN:
        return "dense_ffn"
    return "other"


def _experts_topk(d: dict) -> tuple[int | None, int | None]:
    """(E, k) from any config dict, whatever the family calls them."""
    ffn = d.get("ffn_config") or {}
    E = next((v for v in (d.get("num_local_experts"), d.get("num_experts"), d.get("n_routed_experts"),
                          ffn.get("moe_num_experts")) if v), None)
    k = next((v for v in (d.get("num_experts_per_tok"), d.get("moe_top_k"), ffn.get("moe_top_k")) if v), None)
    return E, k


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
    tied = formula.tied if formula else bool(d.get("tie_word_embeddings", False))
    kinds = {n: classify(n) for n in reader.names()}
    has_embedding = "embedding" in kinds.values()
    t, experts_seen = Tally(), {}
    for name, comp in kinds.items():
        if comp is None:
            continue
        if comp == "lm_head" and tied:
            if has_embedding:
                continue  # a tied matrix stored twice counts once
            comp = "embedding"
        n = math.prod(reader.shape(name))
        if comp == "routed_experts":
            if not E:
                raise ConfigError(f"{cfg_path}: tensor '{name}' is a routed expert, but config.json names no "
                                  "expert count (num_local_experts / num_experts / n_routed_experts)")
            m = _EXPERT_INDEX.search(name)
            if m:
                experts_seen.setdefault(m.group(1), set()).add(int(m.group(2)))
            elif len(reader.shape(name)) == 3 and reader.shape(name)[0] != E:
                raise CheckpointError(f"{path}: stacked expert tensor '{name}' has {reader.shape(name)[0]} "
                                      f"experts, config.json says {E}")
            t.add_routed(n, E)
        else:
            t.add(comp, n)
    for layer, idx in experts_seen.items():
        if len(idx) != E:
            raise CheckpointError(f"{path}: layer {layer} stores {len(idx)} experts, config.json says {E}")
    if t.routed and not k:
        raise ConfigError(f"{cfg_path}: routed experts found but no top-k (num_experts_per_tok)")
    count = t.result(k or 0, target=path, source="checkpoint", tied=tied, arch=formula.arch if formula else None,
                     model_type=d.get("model_type"))
    _compare(count, formula, "config.json formula")
    if formula is None:
        count.notes.append(f"model_type {d.get('model_type')!r} has no formula: counted from the headers only; "
                           "no attention FLOPs or KV cache")
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
    """Counts from a live module's parameters (tied parameters once), classified by name.

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
            if comp is None:
                continue
            stacked = p.ndim == 3 and comp != "shared_experts" and (comp == "routed_experts" or p.shape[0] == E_cfg)
            if comp == "routed_experts" or stacked:
                E = p.shape[0] if stacked else (E_cfg or getattr(mod, "num_experts", None))
                if not E:
                    raise ConfigError(f"{target}: parameter '{name}' is a routed expert, but neither the config "
                                      "nor the module gives the expert count")
                t.add_routed(p.numel(), E)
            else:
                t.add(comp, p.numel())
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
        n = round(parse_number(s))
    except ValueError:
        n = 0
    if n > 0:
        return ParamCount(target=s, source="number", total={"other": n}, active={"other": n},
                          notes=["a bare count: every parameter taken as an active matmul weight; no attention "
                                 "FLOPs or KV cache"])
    if os.sep in s or s.endswith(".json"):
        raise ConfigError(f"{s}: no such file or directory")
    raise ConfigError(f"'{s}' is not a checkpoint directory, config.json, preset or parameter count (e.g. 7B); "
                      f"presets: {', '.join(preset_names())}")
