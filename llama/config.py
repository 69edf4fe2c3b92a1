"""LlamaConfig: the Hugging Face ``config.json`` fields, under their HF names, with presets of the released models."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from .errors import ConfigError, shown
from .io import config_path, read_config_json
from .options import check_config_fields, option

RopeType = Literal["default", "linear", "llama3"]  # rope_scaling["rope_type"]
ROPE_TYPES = get_args(RopeType)
LlamaModelType = Literal["llama"]


@dataclass
class LlamaConfig:
    """The fields of a Llama config.json, each declared with its type and range (checked on construction)."""

    vocab_size: int = option(32000, "V: tokens in the vocabulary", min=1)
    hidden_size: int = option(4096, "H: width of the residual stream", min=1)
    intermediate_size: int = option(11008, "F: width of the SwiGLU MLP", min=1)
    num_hidden_layers: int = option(32, "L: decoder layers", min=1)
    num_attention_heads: int = option(32, "query heads", min=1)
    num_key_value_heads: int | None = option(None, "key / value heads; None: = num_attention_heads (MHA)", min=1)
    head_dim: int | None = option(None, "None: = hidden_size // num_attention_heads", min=1)
    hidden_act: Literal["silu"] = option("silu", "the MLP's activation")
    max_position_embeddings: int = option(2048, "the longest sequence", min=1)
    initializer_range: float = option(0.02, "std of the initial weights", gt=0)
    rms_norm_eps: float = option(1e-6, "RMSNorm epsilon", gt=0)
    rope_theta: float = option(10000.0, "RoPE base", gt=0)
    rope_scaling: dict | None = option(None, '{"rope_type": "llama3", "factor": 8.0, ...}')
    tie_word_embeddings: bool = option(False, "the LM head is the embedding matrix")
    attention_bias: bool = option(False, "biases on q, k, v and o")
    mlp_bias: bool = option(False, "biases on the MLP's projections")
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: LlamaModelType = option("llama", "the architecture")
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept verbatim
    # Key order and rope style of the config.json this was read from, for an exact round-trip.
    _source_keys: list | None = field(default=None, repr=False, compare=False)
    _source_values: dict | None = field(default=None, repr=False, compare=False)
    _rope_style: str = field(default="rope_scaling", repr=False, compare=False)

    MODEL_TYPES: ClassVar[tuple[str, ...]] = get_args(LlamaModelType)
    PRESETS: ClassVar[dict[str, dict]] = {}  # set below the class: LLAMA_PRESETS
    REQUIRED: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        check_config_fields(self)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) else [v]
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                raise ConfigError(f"config field '{name}' must be a token id, a list of them or null, got "
                                  f"{shown(v)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {shown(kind)} is not supported; expected one of "
                                  f"{', '.join(ROPE_TYPES)}")
            factor = self.rope_scaling.get("factor")
            if kind != "default" and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                      or not 0 < factor < float("inf")):
                raise ConfigError(f"rope_scaling of type {shown(kind)} needs a positive number 'factor', got "
                                  f"{shown(factor)}")

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra" and not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> LlamaConfig:
        d = dict(d)
        mt = d.get("model_type", cls.model_type if isinstance(cls.model_type, str) else "llama")
        if mt not in cls.MODEL_TYPES:
            raise ConfigError(f"{source}: model_type '{mt}' is not supported by {cls.__name__}; "
                              f"expected one of {list(cls.MODEL_TYPES)}")
        # transformers 5 writes {"rope_parameters": {"rope_type": ..., "rope_theta": ...}}; older writers
        # use top-level rope_theta + rope_scaling. Read both; remember which style to write back.
        style = "rope_scaling"
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            style = "rope_parameters"
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rp.pop("partial_rotary_factor", None)
            if rp.get("rope_type", "default") != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rp
        known = set(cls.field_names())
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        for k in cls.REQUIRED:
            if k not in kwargs:
                raise ConfigError(f"{source}: required field '{k}' is missing")
        try:
            cfg = cls(**kwargs, extra=extra, _source_keys=list(d), _rope_style=style)
            cfg._source_values = copy.deepcopy({k: getattr(cfg, k) for k in cls.field_names()})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        keys = self._source_keys
        values = {k: getattr(self, k) for k in self.field_names()}
        values.update(self.extra)
        if self._rope_style == "rope_parameters":
            rp = dict(self.rope_scaling or {"rope_type": "default"})
            rp["rope_theta"] = self.rope_theta
            values["rope_parameters"] = rp
            values.pop("rope_theta")
            values.pop("rope_scaling")
        if keys is None:  # a config we built: write every field
            return values
        out = {k: values[k] for k in keys if k in values}
        for k, v in values.items():  # fields set since loading
            if k not in out and v != self._source_values.get(k):
                out[k] = v
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> LlamaConfig:
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            return cls.from_dict(json.loads(s))
        path = config_path(s)
        return cls.from_dict(read_config_json(path), source=path)

    def replace(self, **changes) -> LlamaConfig:
        """A copy with fields changed."""
        return dataclasses.replace(self, extra=dict(self.extra), **changes)

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> LlamaConfig:
        """A preset (`cls.PRESETS`) with fields overridden."""
        key = name.lower()
        if key not in cls.PRESETS:
            raise ConfigError(f"unknown preset '{name}'; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[key], **overrides})

    def attention_biases(self) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias): Hugging Face Llama's `attention_bias` sets both."""
        return self.attention_bias, self.attention_bias


# Sizes from Meta's released config.json files, which some published tables misstate (see README, "Presets"):
# LLaMA-65B has 80 layers (not 64); Llama-2-70B has FFN 28672 (not 22016) and 8 KV heads; "Llama 3-7B" is
# Llama-3-8B.
_L1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
_L2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
           bos_token_id=128000, eos_token_id=128001)
_L31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
_TINY = dict(vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

LLAMA_PRESETS: dict[str, dict] = {
    "llama1-7b": dict(_L1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama1-13b": dict(_L1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama1-33b": dict(_L1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama1-65b": dict(_L1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    "llama2-7b": dict(_L2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(_L2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama2-70b": dict(_L2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    "llama3-8b": dict(_L3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8),
    "llama3-70b": dict(_L3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    "llama3.1-405b": dict(_L3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                          num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_scaling=_L31_ROPE),
    # Tiny models for tests and the demo.
    "tiny": dict(_TINY, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "tiny-mha": dict(_TINY, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4),
    "mini": dict(_TINY, vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
# Published sizes the presets must reproduce (billions): LLaMA-1 as the paper prints them, the rest nominal.
PUBLISHED_SIZES_B = {
    "llama1-7b": 6.7, "llama1-13b": 13.0, "llama1-33b": 32.5, "llama1-65b": 65.2,
    "llama2-7b": 7.0, "llama2-13b": 13.0, "llama2-70b": 70.0,
    "llama3-8b": 8.0, "llama3-70b": 70.0, "llama3.1-405b": 405.0,
}
LlamaConfig.PRESETS = LLAMA_PRESETS
