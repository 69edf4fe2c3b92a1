"""UpcycleOptions: what `moekit upcycle` is asked to do, checked, and the MoE layout it implies.

Layout of one upcycled layer (F dense intermediate size, E `num_experts`, k `top_k`, s `shared_experts`):
the dense FFN's F neurons are cut into G equal shards of F/G. Shards 0..s-1 become one shared expert (width s*F/G,
every token); the other R = G - s shards become routed experts, each shard copied E times: E*R routed experts of
width F/G, expert j = e*R + r holding shard s + r (virtual group e = experts e*R .. e*R+R-1), top-(k*R) routing.
G is `granularity` for the `granular` recipe, and s + 1 otherwise (G = 1 without shared experts: plain copies).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llama.errors import ConfigError
from llama.options import MAX_SEED, check_options, option, parse_size

RECIPES = ("copy", "noise", "drop", "granular")
ROUTER_INITS = ("normal", "zeros")
WEIGHT_SCALINGS = ("down", "cube-root", "none")
FORMAT_CHOICES = ("auto", "mixtral", "qwen2_moe")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


@dataclass
class UpcycleOptions:
    """upcycle a dense Llama checkpoint into an MoE checkpoint

    Upcycle a dense Hugging Face Llama checkpoint directory into a Mixtral or Qwen2-MoE checkpoint directory,
    streaming tensor by tensor (memory stays near one tensor), then check the MoE computes the dense function (copy,
    granular, shared experts)."""

    num_experts: int = option(8, "experts E per MoE layer (copies of each routed shard)", metavar="E", min=1)
    top_k: int = option(2, "experts per token k", metavar="K", min=1)
    recipe: str = option("copy", "copy (Komatsuzaki et al. 2022) | noise | drop (Nakamura et al. 2025) | granular "
                         "(He et al. 2024)", choices=RECIPES)
    moe_layers: str | list[int] = option("all", "all | every-other | a list like 0,2,5", metavar="LAYERS", parse=str)
    shared_experts: int = option(0, "dense shards s fused into a shared expert (qwen2_moe format)", metavar="S",
                                 min=0)
    granularity: int | None = option(None, "granular: shards G of the dense FFN; E*G experts, top-k*G",
                                     metavar="G", default_text="2")
    weight_scaling: str = option("down", "granular: down (down_proj x R, exact) | cube-root (He et al.) | none",
                                 choices=WEIGHT_SCALINGS)
    router_init: str = option("normal", "router init: normal N(0, std^2), one row per virtual group | zeros",
                              choices=ROUTER_INITS)
    router_std: float = option(0.02, "router init std", metavar="STD", gt=0)
    noise_scale: float = option(0.01, "noise: noise std relative to each weight's std", metavar="ALPHA", min=0)
    drop_ratio: float = option(0.5, "drop: fraction of neurons re-initialised per expert", metavar="R", min=0, max=1)
    seed: int = option(0, "random seed for router, noise, drop and verify tokens", metavar="N", min=0, max=MAX_SEED)
    dtype: str | None = option(None, "output dtype", choices=DTYPE_CHOICES, default_text="the source's")
    max_shard_size: int | str = option("5GB", "largest safetensors shard", metavar="SIZE", parse=str)
    format: str = option("auto", "auto: mixtral when it can express the layout, else qwen2_moe",
                         choices=FORMAT_CHOICES)
    force: bool = option(False, "replace DST if it exists")
    ignore_free_space: bool = option(False, "write even if the file system seems to lack the space the output needs")
    verify: bool = option(True, "skip the logit check against SRC at the end")
    verify_tokens: int = option(32, "tokens for the final check", metavar="N", min=1, max=65536)
    verify_atol: float = option(1e-4, "max |logit difference| a function-preserving recipe may show",
                                metavar="ATOL", flag="--atol", min=0)

    def __post_init__(self):
        self.moe_layers = parse_moe_layers(self.moe_layers)
        self.validate()

    def validate(self) -> None:
        check_options(self)
        parse_size(self.max_shard_size)
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k {self.top_k} is greater than --num-experts {self.num_experts}")
        s = self.shared_experts
        if self.granularity is not None and self.recipe != "granular":
            raise ConfigError(f"--granularity is an option of --recipe granular, not '{self.recipe}'")
        if self.weight_scaling != "down" and self.recipe != "granular":
            raise ConfigError(f"--weight-scaling is an option of --recipe granular, not '{self.recipe}'")
        if self.recipe == "granular":
            G = self.num_shards
            if G < 2:
                raise ConfigError(f"--granularity must be an integer >= 2 for --recipe granular, got {G!r}")
            if s >= G:
                raise ConfigError(f"--shared-experts {s} leaves no routed shard: --granularity ({G}) must exceed it")

    # ---- the layout these options imply ----------------------------------------------------------
    @property
    def num_shards(self) -> int:
        """G: shards the dense FFN is cut into."""
        if self.recipe == "granular":
            return 2 if self.granularity is None else self.granularity
        return self.shared_experts + 1

    @property
    def routed_shards(self) -> int:
        """R = G - s: shards that become routed experts (each copied num_experts times)."""
        return self.num_shards - self.shared_experts

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.routed_shards

    @property
    def total_top_k(self) -> int:
        return self.top_k * self.routed_shards

    @property
    def function_preserving(self) -> bool:
        """Whether the recipe reproduces the dense function (in exact arithmetic): copy, granular with `down`
        scaling, and with R > 1 only under a virtual-group `normal` router (`zeros` makes all experts tie)."""
        if self.recipe in ("noise", "drop"):
            return self.recipe == "noise" and self.noise_scale == 0 or self.recipe == "drop" and self.drop_ratio == 0
        if self.recipe == "granular" and self.weight_scaling != "down":
            return False
        return self.routed_shards == 1 or self.router_init == "normal"

    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers that become MoE."""
        if self.moe_layers == "all":
            return list(range(num_layers))
        if self.moe_layers == "every-other":
            return list(range(1, num_layers, 2))
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"--moe-layers: layer {bad[0]} does not exist (the model has {num_layers} layers)")
        return sorted(self.moe_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_moe_layers(value: str | list[int]) -> str | list[int]:
    """'all' | 'every-other' | '0,2,5' | [0, 2, 5] -> 'all' | 'every-other' | [0, 2, 5]."""
    if value in ("all", "every-other"):
        return value
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--moe-layers '{value}': expected all, every-other or a list like 0,2,5") from None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"--moe-layers {value!r}: expected all, every-other or a non-empty list of layer indices")
    if len(set(value)) != len(value):
        raise ConfigError(f"--moe-layers {list(value)}: a layer is listed twice")
    return sorted(value)


@dataclass
class VerifyOptions:
    """check an upcycled checkpoint computes its dense source's function

    Run two checkpoint directories (dense Llama, Mixtral or Qwen2-MoE) layer by layer from disk in fp32 on the same
    random tokens and print the max absolute and relative logit difference. Exit code 1 when it is above --atol."""

    tokens: int = option(32, "number of random tokens", metavar="N", min=1, max=65536)
    atol: float = option(1e-4, "largest accepted max |logit difference|", metavar="ATOL", min=0)
    seed: int = option(0, "seed of the random tokens", metavar="N", min=0, max=MAX_SEED)
    dense_dtype: str | None = option(None, "round DENSE's weights to this dtype first (for an MoE written with "
                                     "upcycle --dtype)", choices=("bf16", "fp16"))

    def __post_init__(self):
        check_options(self)
