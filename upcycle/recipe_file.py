"""Recipe files for `moekit upcycle --config FILE DST`: mergekit-moe's YAML as it is published, or moekit's own.

A mergekit-moe recipe (arcee-ai/mergekit 0.1.5: mergekit/moe/config.py `MoEMergeConfig`, `Expert`) builds what
mergekit-moe builds from it; the options each key becomes:

    base_model: path/to/base          # --base: attention, norms, embeddings, LM head, tokenizer
    gate_mode: hidden                 # --router-init: hidden (the default; hidden_last too) | hidden_avg |
                                      #   cheap_embed | random | uniform_random, each as mergekit computes it
    dtype: bfloat16                   # --dtype: float32 | float16 | bfloat16
    experts_per_token: 2              # --top-k (mergekit's default: 2)
    experts:                          # --donors, in order; --positive-prompts / --negative-prompts "I:TEXT"
      - source_model: path/to/coder
        positive_prompts: ["def fib(n):"]
        negative_prompts: ["Once upon a time"]
        residual_scale: 0.5           # --residual-scale I:X: down_proj x X
        noise_scale: 0.01             # --expert-noise I:STD: + N(0, STD^2) (drawn with --seed)
    shared_experts:                   # at most one: --shared-donor (its prompts set the shared expert's gate)
      - source_model: path/to/chat
    architecture: mixtral             # --format: mixtral | qwen (qwen2_moe); deepseek, qwen3: a one-line error

mergekit-moe's `--random-seed N` is moekit's `--seed N` (random and uniform_random draw the same rows), and its
`--i-understand-this-is-not-useful-without-training` has the same name. moekit also reads `tokenizer_source: base`
(mergekit-moe always uses the base's tokenizer; moekit refuses donors whose tokenizer differs unless told so). Any
other key is an error naming it. Model paths are local checkpoint directories, relative to the current directory
(as mergekit reads them); hub names must be downloaded first.

moekit's own file is a JSON or YAML object whose keys are `UpcycleOptions` fields (`donors`, `base`,
`router_init`, `positive_prompts`, ...): the `options` object of an `upcycling.json` is one.

A recipe file is read whole only up to MAX_RECIPE_BYTES, parsed (YAML by libyaml where present, which bounds its
nesting), then walked once within a budget of values, characters and depth with YAML aliases expanded, before
anything else walks or formats it: an alias bomb or a 10^5-deep file is a one-line error, never minutes of work.
Every value is then checked as the command line checks it (`options.options_from_dict`).
"""

from __future__ import annotations

import hashlib
import json
import os

from moekit.llama.errors import ConfigError, one_line, shown
from moekit.llama.io import read_bytes

from .options import DRAWN_INITS, TOKENIZER_SOURCES, UpcycleOptions, options_from_dict, unknown_keys

MERGEKIT_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
                 "tokenizer_source")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
GATE_MODES = {"hidden": "hidden", "hidden_last": "hidden", "hidden_avg": "hidden-avg", "cheap_embed": "cheap-embed",
              "random": "random", "uniform_random": "uniform-random"}
DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "bfloat16": "bf16", "bf16": "bf16"}
ARCHITECTURES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe"}  # mergekit-moe's output names -> moekit's formats
NOT_WRITTEN = {  # mergekit-moe output architectures moekit does not write, and what to use instead
    "deepseek moe": "moekit does not write DeepSeek MoE checkpoints (remote code); architecture: qwen writes "
                    "Qwen2-MoE, whose shared expert without prompts computes the same (its gate fixed open)",
    "qwen3 moe": "Qwen3 MoE output needs Qwen3 donors; moekit merges Llama donors (architecture: mixtral or qwen)"}
MAX_RECIPE_BYTES = 1 << 20  # a recipe file (published ones are a few kB)
MAX_VALUES = 1_000_000  # values in a recipe, YAML aliases expanded (a 1 MiB file without aliases holds fewer)
MAX_CHARACTERS = 8 << 20  # characters of all its strings, aliases expanded
MAX_DEPTH = 32  # levels of nesting (a mergekit-moe recipe has 4)


def load(path: str) -> dict:
    """The JSON or YAML object in the recipe file `path` (one-line errors)."""
    return parse(path, text_of(path, read_bytes(path, "recipe file", MAX_RECIPE_BYTES)))


def text_of(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML or JSON recipe") from None


def parse(path: str, text: str) -> dict:
    """The JSON (a .json path) or YAML object in `text`, read from `path`, checked small enough to walk (`check_size`)
    (one-line errors)."""
    import yaml

    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.load(text, Loader=getattr(yaml, "CSafeLoader",
                                                                                        yaml.SafeLoader))
    except RecursionError:
        raise ConfigError(f"{path}: {kind} nested too deeply (a recipe nests at most {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = one_line(str(getattr(e, "problem", None) or "syntax error"), 120)
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    except ValueError as e:  # JSON syntax; an integer of thousands of digits
        raise ConfigError(f"{path}: not valid {kind} ({one_line(str(e), 120)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (mergekit-moe's base_model, experts, ... or moekit's "
                          "option names)")
    check_size(path, data)
    return data


def check_size(path: str, data: dict) -> None:
    """Refuse a recipe too large or deep to walk, counting its values and characters with YAML aliases expanded
    (a "billion laughs" file of a few lines expands to billions), within a budget, before anything walks it or
    formats it into a message."""
    values, characters, stack = 1, 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise ConfigError(f"{path}: values nested more than {MAX_DEPTH} levels deep; a recipe nests fewer")
        values += len(value)
        if values > MAX_VALUES:
            raise ConfigError(f"{path}: more than {MAX_VALUES:,} values with YAML aliases expanded; a recipe holds "
                              "fewer")
        for child in ([*value.keys(), *value.values()] if isinstance(value, dict) else value):
            if isinstance(child, (str, bytes)):
                characters += len(child)
            elif isinstance(child, (dict, list, tuple, set, frozenset)):
                stack.append((child, depth + 1))
        if characters > MAX_CHARACTERS:
            raise ConfigError(f"{path}: more than {MAX_CHARACTERS:,} characters with YAML aliases expanded; a "
                              "recipe holds fewer")


def is_mergekit(data: dict) -> bool:
    return "experts" in data or "base_model" in data


def _strings(path: str, where: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {where} must be a list of strings, got {shown(value)}")
    return value


def _model(path: str, where: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: {where} must be a model path, got {shown(value)}")
    return value


def _choice(path: str, data: dict, key: str, table: dict, what: str):
    """The option value `table` gives for data[key] (a string), or None when the key is absent or null."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value not in table:
        raise ConfigError(f"{path}: {key} {shown(value)} {what} {', '.join(table)}")
    return table[value]


def from_mergekit(path: str, data: dict) -> dict:
    """UpcycleOptions fields from a mergekit-moe config."""
    unknown_keys(path, "the recipe", data, MERGEKIT_KEYS)
    if "base_model" not in data or not data.get("experts"):
        raise ConfigError(f"{path}: a mergekit-moe config needs base_model and a non-empty list of experts")
    gate = _choice(path, data, "gate_mode", GATE_MODES, "is not one of mergekit-moe's gate modes:") or "hidden"
    experts, shared = data["experts"], data.get("shared_experts") or []
    if not isinstance(experts, list) or not isinstance(shared, list) or len(shared) > 1:
        raise ConfigError(f"{path}: experts must be a list and shared_experts a list of at most one expert")
    out = {"base": _model(path, "base_model", data["base_model"]), "router_init": gate, "donors": [],
           "positive_prompts": [], "negative_prompts": [], "residual_scale": [], "expert_noise": []}
    for key, e in [*enumerate(experts), *(("shared", e) for e in shared)]:
        where = f"experts[{key}]" if key != "shared" else "shared_experts[0]"
        if not isinstance(e, dict):
            raise ConfigError(f"{path}: {where} must be a mapping with source_model")
        unknown_keys(path, where, e, EXPERT_KEYS)
        model = _model(path, f"{where}.source_model", e.get("source_model"))
        if key == "shared":
            out["shared_donor"] = model
        else:
            out["donors"].append(model)
        for kind in ("positive", "negative"):
            texts = _strings(path, f"{where}.{kind}_prompts", e.get(f"{kind}_prompts"))
            if gate not in DRAWN_INITS:  # mergekit reads prompts only to set gates from them
                out[f"{kind}_prompts"] += [f"{key}:{t}" for t in texts]
        for name, option in (("residual_scale", "residual_scale"), ("noise_scale", "expert_noise")):
            if e.get(name) is not None:
                if isinstance(e[name], bool) or not isinstance(e[name], (int, float)):
                    raise ConfigError(f"{path}: {where}.{name} must be a number, got {shown(e[name])}")
                out[option].append(f"{key}:{e[name]!r}")
    if "experts_per_token" in data:
        out["top_k"] = data["experts_per_token"]
    out["dtype"] = _choice(path, data, "dtype", DTYPES, "is not one of")
    out["format"] = output_format(path, data.get("architecture"))
    out["tokenizer_source"] = _choice(path, data, "tokenizer_source", dict(zip(TOKENIZER_SOURCES, TOKENIZER_SOURCES)),
                                      "is not supported yet; moekit implements")
    return {k: v for k, v in out.items() if v != [] and v is not None}


def output_format(path: str, arch) -> str | None:
    """moekit's format for mergekit-moe's `architecture`, which names the start of one of its output architectures'
    names (mergekit/scripts/moe.py `select_output_arch`): mixtral, qwen; None when absent (moekit chooses)."""
    if arch is None or (isinstance(arch, str) and not arch.strip()):
        return None
    if not isinstance(arch, str):
        raise ConfigError(f"{path}: architecture must be a string, got {shown(arch)}")
    a = arch.strip().lower()
    if a == "qwen2_moe":
        return a
    found = next((fmt for name, fmt in ARCHITECTURES.items() if name.startswith(a)), None)
    if found:
        return found
    lost = next((why for name, why in NOT_WRITTEN.items() if name.startswith(a)), None)
    raise ConfigError(f"{path}: architecture {shown(arch)}: " + (lost or "expected one of mergekit-moe's mixtral, "
                                                                          "qwen, deepseek, qwen3"))


def read_recipe(path: str, overrides: dict | None = None) -> UpcycleOptions:
    """UpcycleOptions from a recipe file (module docstring), with `overrides` (flags given beside it) on top."""
    data = load(path)
    if is_mergekit(data):
        values = from_mergekit(path, data)
    else:
        values = {k: v for k, v in data.items() if k != "config"}  # (an upcycling.json's names its own recipe file)
    return options_from_dict(values, path, "the recipe", {**(overrides or {}), "config": path})


def describe(path: str) -> dict:
    """What upcycling.json records of a recipe file: where it was, its kind, its sha256 and its whole text."""
    raw = read_bytes(path, "recipe file", MAX_RECIPE_BYTES)
    text = text_of(path, raw)
    kind = "mergekit-moe" if is_mergekit(parse(path, text)) else "moekit"
    return {"path": os.path.abspath(path), "format": kind, "sha256": hashlib.sha256(raw).hexdigest(), "text": text}
