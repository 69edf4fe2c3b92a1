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

RECIPES = ("copy", "noise", "drop", "granular")
ROUTER_INITS = ("normal", "zeros")
WEIGHT_SCALINGS = ("down", "cube-root", "none")
FORMAT_CHOICES = ("auto", "mixtral", "qwen2_moe")


@dataclass
class UpcycleOptions:
    num_experts: int = 8  # E: copies of each routed shard (the coarse expert count)
    top_k: int = 2  # k: coarse experts per token; the written top-k is k * R
    recipe: str = "copy"  # copy | noise | drop | granular
    moe_layers: str | list[int] = "all"  # all | every-other | [0, 2, 5]
    shared_experts: int = 0  # s: dense shards fused into one shared expert (qwen2_moe format)
    granularity: int | None = None  # G (granular only; default 2)
    weight_scaling: str = "down"  # granular: down (x R on down_proj, exact) | cube-root (He et al.) | none
    router_init: str = "normal"  # normal: N(0, router_std^2), one row per virtual group | zeros
    router_std: float = 0.02
    noise_scale: float = 0.01  # noise: std of the added noise, relative to std of the weight
    drop_ratio: float = 0.5  # drop: fraction r of each expert's neurons re-initialised
    seed: int = 0
    dtype: str | None = None  # output dtype (fp32 | bf16 | fp16); None: the source's
    max_shard_size: int | str = "5GB"
    format: str = "auto"  # auto | mixtral | qwen2_moe
    force: bool = False
    verify: bool = True
    verify_tokens: int = 32
    verify_atol: float = 1e-4

    def __post_init__(self):
        self.moe_layers = parse_moe_layers(self.moe_layers)
        self.validate()

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

        for name in ("num_experts", "top_k", "verify_tokens"):
            positive(name)
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k {self.top_k} is greater than --num-experts {self.num_experts}")
        for name, allowed in (("recipe", RECIPES), ("router_init", ROUTER_INITS),
                              ("weight_scaling", WEIGHT_SCALINGS), ("format", FORMAT_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} '{getattr(self, name)}' is not one of {allowed}")
        s = self.shared_experts
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"--shared-experts must be an integer >= 0, got {s!r}")
        if self.granularity is not None and self.recipe != "granular":
            raise ConfigError(f"--granularity is an option of --recipe granular, not '{self.recipe}'")
        if self.weight_scaling != "down" and self.recipe != "granular":
            raise ConfigError(f"--weight-scaling is an option of --recipe granular, not '{self.recipe}'")
        if self.recipe == "granular":
            G = self.num_shards
            if isinstance(G, bool) or not isinstance(G, int) or G < 2:
                raise ConfigError(f"--granularity must be an integer >= 2 for --recipe granular, got {G!r}")
            if s >= G:
                raise ConfigError(f"--shared-experts {s} leaves no routed shard: --granularity ({G}) must exceed it")
        if not self.router_std > 0:
            raise ConfigError(f"--router-std must be > 0, got {self.router_std}")
        if not self.noise_scale >= 0:
            raise ConfigError(f"--noise-scale must be >= 0, got {self.noise_scale}")
        if not 0 <= self.drop_ratio <= 1:
            raise ConfigError(f"--drop-ratio must be in [0, 1], got {self.drop_ratio}")
        if not self.verify_atol >= 0:
            raise ConfigError(f"--atol must be >= 0, got {self.verify_atol}")

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
