"""Recipe files for `moekit upcycle --config FILE DST`: mergekit-moe's YAML as it is published, or moekit's own.

mergekit-moe (arcee-ai/mergekit, docs/moe.md), and the options each key becomes:

    base_model: path/to/base          # --base: attention, norms, embeddings, LM head, tokenizer
    gate_mode: hidden                 # --router-init: hidden (mergekit's default) | cheap_embed | random
    dtype: bfloat16                   # --dtype: float32 | float16 | bfloat16
    experts_per_token: 2              # --top-k (mergekit's default: 2)
    experts:                          # --donors, in order; --positive-prompts / --negative-prompts "I:TEXT"
      - source_model: path/to/coder
        positive_prompts: ["def fib(n):"]
        negative_prompts: ["Once upon a time"]
    shared_experts:                   # at most one: --shared-donor (its prompts set the shared expert's gate)
      - source_model: path/to/chat
    architecture: mixtral             # --format: mixtral | qwen (optional)

`tokenizer_source: base` (older configs) is accepted: moekit copies the base's tokenizer. Prompts are read only by
hidden and cheap_embed, as in mergekit. Any other key, and the mergekit keys moekit does not implement (an
expert's `noise_scale` and `residual_scale`, gate mode `uniform_random`), is an error naming it. Model paths are
local checkpoint directories, relative to the current directory (as mergekit reads them); hub names must be
downloaded first.

moekit's own file is a JSON or YAML object whose keys are `UpcycleOptions` fields (`donors`, `base`,
`router_init`, `positive_prompts`, ...): the `options` object of an `upcycling.json` is one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from moekit.llama.errors import ConfigError

from .options import UpcycleOptions

MERGEKIT_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
                 "tokenizer_source")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts")
NOT_IMPLEMENTED = ("noise_scale", "residual_scale")  # mergekit expert keys moekit refuses rather than ignores
GATE_MODES = {"hidden": "hidden", "cheap_embed": "cheap-embed", "random": "normal"}
DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "bfloat16": "bf16", "bf16": "bf16"}
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2_moe": "qwen2_moe"}


def load(path: str) -> dict:
    """The JSON or YAML object in `path` (one-line errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise ConfigError(f"{path}: not a text file; expected a YAML or JSON recipe") from None
    return parse(path, text)


def parse(path: str, text: str) -> dict:
    """The JSON (a .json path) or YAML object in `text`, read from `path` (one-line errors)."""
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or 'syntax error'}{where})") \
                from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (mergekit-moe's base_model, experts, ... or moekit's "
                          "option names)")
    return data


def is_mergekit(data: dict) -> bool:
    return "experts" in data or "base_model" in data


def _unknown(path: str, where: str, keys, allowed) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        extra = [k for k in unknown if k in NOT_IMPLEMENTED]
        why = (f"mergekit's {extra[0]} is not implemented by moekit" if extra else
               f"expected {', '.join(allowed)}")
        raise ConfigError(f"{path}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in "
                          f"{where} ({why})")


def _strings(path: str, where: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {where} must be a list of strings, got {value!r}"[:300])
    return value


def _model(path: str, where: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: {where} must be a model path, got {value!r}")
    return value


def from_mergekit(path: str, data: dict) -> dict:
    """UpcycleOptions fields from a mergekit-moe config."""
    _unknown(path, "the recipe", data, MERGEKIT_KEYS)
    if "base_model" not in data or not data.get("experts"):
        raise ConfigError(f"{path}: a mergekit-moe config needs base_model and a non-empty list of experts")
    gate = data.get("gate_mode", "hidden")
    if gate not in GATE_MODES:
        raise ConfigError(f"{path}: gate_mode {gate!r} is not one of {', '.join(GATE_MODES)}")
    experts, shared = data["experts"], data.get("shared_experts") or []
    if not isinstance(experts, list) or not isinstance(shared, list) or len(shared) > 1:
        raise ConfigError(f"{path}: experts must be a list and shared_experts a list of at most one expert")
    out = {"base": _model(path, "base_model", data["base_model"]), "router_init": GATE_MODES[gate], "donors": [],
           "positive_prompts": [], "negative_prompts": []}
    for key, e in [*enumerate(experts), *(("shared", e) for e in shared)]:
        where = f"experts[{key}]" if key != "shared" else "shared_experts[0]"
        if not isinstance(e, dict):
            raise ConfigError(f"{path}: {where} must be a mapping with source_model")
        _unknown(path, where, e, EXPERT_KEYS)
        model = _model(path, f"{where}.source_model", e.get("source_model"))
        if key == "shared":
            out["shared_donor"] = model
        else:
            out["donors"].append(model)
        for kind in ("positive", "negative"):
            texts = _strings(path, f"{where}.{kind}_prompts", e.get(f"{kind}_prompts"))
            if gate != "random":  # mergekit reads prompts only to set gates from them
                out[f"{kind}_prompts"] += [f"{key}:{t}" for t in texts]
    if "experts_per_token" in data:
        out["top_k"] = data["experts_per_token"]
    if data.get("dtype") is not None:
        if data["dtype"] not in DTYPES:
            raise ConfigError(f"{path}: dtype {data['dtype']!r} is not one of {', '.join(DTYPES)}")
        out["dtype"] = DTYPES[data["dtype"]]
    if data.get("architecture") is not None:
        if data["architecture"] not in ARCHITECTURES:
            raise ConfigError(f"{path}: architecture {data['architecture']!r}: moekit writes "
                              f"{' or '.join(ARCHITECTURES)}")
        out["format"] = ARCHITECTURES[data["architecture"]]
    if data.get("tokenizer_source", "base") != "base":
        raise ConfigError(f"{path}: tokenizer_source {data['tokenizer_source']!r}: moekit copies the base's "
                          "tokenizer (tokenizer_source: base)")
    return {k: v for k, v in out.items() if v != []}


def read_recipe(path: str, overrides: dict | None = None) -> UpcycleOptions:
    """UpcycleOptions from a recipe file (module docstring), with `overrides` (flags given beside it) on top."""
    data = load(path)
    if is_mergekit(data):
        values = from_mergekit(path, data)
    else:
        _unknown(path, "the recipe", data, [f.name for f in dataclasses.fields(UpcycleOptions)])
        values = {k: v for k, v in data.items() if k != "config"}  # (an upcycling.json's names its own recipe file)
    try:
        return UpcycleOptions(**{**values, **(overrides or {}), "config": path})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def describe(path: str) -> dict:
    """What upcycling.json records of a recipe file: where it was, its kind, its sha256 and its whole text."""
    with open(path, "rb") as f:
        raw = f.read()
    kind = "mergekit-moe" if is_mergekit(parse(path, raw.decode("utf-8"))) else "moekit"
    return {"path": os.path.abspath(path), "format": kind, "sha256": hashlib.sha256(raw).hexdigest(),
            "text": raw.decode("utf-8")}
