"""UpcycleOptions: what `moekit upcycle` is asked to do, checked, and the MoE layout it implies.

Layout of one upcycled layer (F dense intermediate size, E `num_experts`, k `top_k`, s `shared_experts`):
the dense FFN's F neurons are cut into G equal shards of F/G. Shards 0..s-1 become one shared expert (width s*F/G,
every token); the other R = G - s shards become routed experts, each shard copied E times: E*R routed experts of
width F/G, expert j = e*R + r holding shard s + r (virtual group e = experts e*R .. e*R+R-1), top-(k*R) routing.
G is `granularity` for the `granular` recipe, and s + 1 otherwise (G = 1 without shared experts: plain copies).

Experts from donors (`donors`, mergekit-moe's workflow): D dense checkpoints of one architecture; expert j of every
MoE layer is donor j // c's FFN (c = E / D copies of each, adjacent), attention, norms, embeddings and LM head come
from `base` (default: the first donor), and `shared_donor`'s whole FFN may become a shared expert. Prompts are
"I:TEXT" strings, I the donor's position in `donors` (the expert index when c = 1) or `shared`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Literal, get_args

from moekit.llama.errors import ConfigError, shown
from moekit.llama.options import MAX_SEED, check_options, option, parse_size

Recipe = Literal["copy", "noise", "drop", "granular"]
RouterInit = Literal["normal", "zeros", "random", "uniform-random", "hidden", "hidden-avg", "cheap-embed",
                     "hidden-mean", "embed-mean"]
WeightScaling = Literal["down", "cube-root", "none"]
RECIPES = get_args(Recipe)
MERGEKIT_PROMPT_INITS = ("hidden", "hidden-avg", "cheap-embed")  # mergekit-moe's gate modes that read prompts
PROMPT_INITS = (*MERGEKIT_PROMPT_INITS, "hidden-mean", "embed-mean")  # the router inits that read prompts
DRAWN_INITS = ("random", "uniform-random")  # mergekit-moe's: every layer's rows drawn at once, seeded by --seed
ALL_SAME = "--i-understand-this-is-not-useful-without-training"  # mergekit-moe's flag, the same name
MAX_PROMPTS = 1024  # per --positive-prompts / --negative-prompts: one forward of the base reads them all at once
MAX_PROMPT_CHARS = 32768  # per prompt, before tokenising (then: at most the model's max_position_embeddings tokens)
MAX_NOISE_SCALE = 10.0  # --noise-scale: noise 10x the weights' std already drowns them
TOKENIZER_SOURCES = ("base",)  # mergekit's tokenizer_source values moekit implements


@dataclass
class UpcycleOptions:
    """upcycle a dense Llama checkpoint into an MoE checkpoint, or merge several into one

    Upcycle a dense Hugging Face Llama checkpoint directory into a Mixtral or Qwen2-MoE checkpoint directory,
    streaming tensor by tensor (memory stays near one tensor), then check the MoE computes the dense function (copy,
    granular, shared experts). With --donors (or a mergekit-moe recipe, --config FILE DST), each expert is one donor's
    FFN, routers may be set from prompts, and each expert is checked against its donor."""

    donors: list[str] | None = option(None, "dense checkpoints (fine-tunes of one base) whose FFNs become the "
                                      "experts, in order: with E experts and D donors, expert j of every MoE layer "
                                      "is donor j // (E/D)'s FFN (give DST before this flag)", metavar="DIR")
    base: str | None = option(None, "with --donors: the checkpoint giving attention, norms, embeddings, LM head and "
                              "tokenizer", metavar="DIR", default_text="the first donor")
    shared_donor: str | None = option(None, "with --donors: a checkpoint whose whole FFN becomes a shared expert "
                                      "(qwen2_moe)", metavar="DIR")
    config: str | None = option(None, "a recipe file: mergekit-moe YAML, or moekit's own JSON/YAML (option names "
                                "as keys); flags given beside it override it", metavar="FILE")
    num_experts: int | None = option(None, "experts E per MoE layer (copies of each routed shard, or of each donor)",
                                     metavar="E", min=1, default_text="8, or one per donor")
    top_k: int = option(2, "experts per token k", metavar="K", min=1)
    recipe: Recipe = option("copy", "copy (Komatsuzaki et al. 2022) | noise | drop (Nakamura et al. 2025) | "
                            "granular (He et al. 2024)")
    moe_layers: str | list[int] = option("all", "all | every-other | a list like 0,2,5", metavar="LAYERS", parse=str)
    shared_experts: int = option(0, "dense shards s fused into a shared expert (qwen2_moe format)", metavar="S",
                                 min=0)
    granularity: int | None = option(None, "granular: shards G of the dense FFN, of which R = G - S are routed: "
                                     "E*R experts, top-k*R",
                                     metavar="G", default_text="2")
    weight_scaling: WeightScaling = option("down", "granular: down (down_proj x R, the routed shards per token "
                                           "group: exact) | cube-root (He et al.) | none")
    router_init: RouterInit = option("normal", "router init. moekit's: normal N(0, std^2), one row per virtual "
                                     "group | zeros | hidden-mean, embed-mean (with --donors: the prompts' mean FFN "
                                     "input / token embedding over their own tokens). mergekit-moe's gate modes, as "
                                     "it computes them: random N(0, 1) | uniform-random | hidden (the base's "
                                     "residual stream entering each layer at each prompt's last token, bf16) | "
                                     "hidden-avg (its mean over the padded prompt) | cheap-embed (the prompts' "
                                     "summed token embeddings, BOS included)")
    router_std: float = option(0.02, "normal: router init std", metavar="STD", gt=0)
    positive_prompts: list[str] | None = option(None, "prompt inits: prompts expert I should get, as I:TEXT "
                                                "(I the donor's position in --donors, or 'shared')", metavar="I:TEXT")
    negative_prompts: list[str] | None = option(None, "prompt inits: prompts expert I should not get, as I:TEXT",
                                                metavar="I:TEXT")
    router_scale: float = option(1.0, "prompt inits: the norm of each router row (1: unit rows, as mergekit-moe "
                                 "writes them)", metavar="S", gt=0)
    residual_scale: list[str] | None = option(None, "with --donors: donor I's down_proj (its contribution to the "
                                              "residual stream) times X, as I:X (mergekit-moe's residual_scale)",
                                              metavar="I:X")
    expert_noise: list[str] | None = option(None, "with --donors: N(0, STD^2) added to donor I's expert weights, as "
                                            "I:STD (mergekit-moe's noise_scale, drawn with --seed)", metavar="I:STD")
    i_understand_this_is_not_useful_without_training: bool = option(
        False, "merge --donors that are all one model (the MoE computes what it does, at more cost; useful only to "
        "train on): mergekit-moe's flag")
    tokenizer_source: str | None = option(None, "with --donors: base: the base's tokenizer and embeddings serve "
                                          "every expert even where a donor's tokenizer.json differs (the same "
                                          "vocab_size still required)", metavar="SOURCE",
                                          default_text="donors must share the base's tokenizer")
    noise_scale: float = option(0.01, "noise: noise std relative to each weight's std", metavar="ALPHA", min=0,
                                max=MAX_NOISE_SCALE)
    drop_ratio: float = option(0.5, "drop: fraction of neurons re-initialised per expert", metavar="R", min=0, max=1)
    seed: int = option(0, "random seed for router, noise, drop and verify tokens", metavar="N", min=0, max=MAX_SEED)
    dtype: Literal["fp32", "bf16", "fp16"] | None = option(None, "output dtype", default_text="the source's")
    max_shard_size: int | str = option("5GB", "largest safetensors shard", metavar="SIZE", parse=str)
    format: Literal["auto", "mixtral", "qwen2_moe"] = option("auto", "auto: mixtral when it can express the layout, "
                                                             "else qwen2_moe")
    force: bool = option(False, "replace DST if it exists")
    ignore_free_space: bool = option(False, "write even if the file system seems to lack the space the output needs")
    verify: bool = option(True, "skip the final check (the logits against SRC; with --donors, each expert against "
                          "its donor's FFN)")
    verify_tokens: int = option(32, "tokens for the final check", metavar="N", min=1, max=65536)
    verify_atol: float | None = option(None, "max |logit difference| a function-preserving recipe may show (with "
                                       "--donors: max |difference| of an expert from its donor's FFN)",
                                       metavar="ATOL", flag="--atol", min=0, default_text="1e-4; with --donors 1e-5")

    def __post_init__(self):
        self.moe_layers = parse_moe_layers(self.moe_layers)
        if self.num_experts is None:
            self.num_experts = len(self.donors) if isinstance(self.donors, list) and self.donors else 8
        self.validate()

    def validate(self) -> None:
        self._check_prompt_sizes()  # before anything walks the lists
        check_options(self)
        parse_size(self.max_shard_size)
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k {self.top_k} is greater than --num-experts {self.num_experts}")
        self._validate_donors()
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

    def _validate_donors(self) -> None:
        D, E = len(self.donors or ()), self.num_experts
        if not self.donors:
            given = [f for f in ("base", "shared_donor", "positive_prompts", "negative_prompts", "tokenizer_source",
                                 "residual_scale", "expert_noise") if getattr(self, f)]
            if given or self.router_init in PROMPT_INITS:
                what = f"--{given[0].replace('_', '-')}" if given else f"--router-init {self.router_init}"
                raise ConfigError(f"{what} is an option of --donors (experts from several dense checkpoints)")
            return
        if self.tokenizer_source is not None and self.tokenizer_source not in TOKENIZER_SOURCES:
            raise ConfigError(f"--tokenizer-source {shown(self.tokenizer_source)} is not supported yet; moekit "
                              "implements base (the base's tokenizer and embeddings, donors of one vocab_size)")
        if D > E:
            raise ConfigError(f"{D} donors but --num-experts {E}: every donor needs at least one expert")
        if E % D:
            raise ConfigError(f"--num-experts {E} is not a multiple of the {D} donors (each donor gets E / D copies)")
        if self.recipe == "granular" or self.shared_experts:
            what = "--recipe granular" if self.recipe == "granular" else f"--shared-experts {self.shared_experts}"
            raise ConfigError(f"{what} cuts one dense FFN into shards; with --donors each expert is a whole donor FFN "
                              "(--shared-donor makes a shared expert)")
        prompts = {kind: self.prompts(kind) for kind in ("positive", "negative")}
        keys = set(range(D)) | ({"shared"} if self.shared_donor else set())
        want = f"0..{D - 1}" + (" or shared" if self.shared_donor else "")
        for flag, by_key in [*((f"{kind}-prompts", v) for kind, v in prompts.items()),
                             ("residual-scale", self.per_donor("residual_scale")),
                             ("expert-noise", self.per_donor("expert_noise"))]:
            bad = next((k for k in by_key if k not in keys), None)
            if bad is not None:
                raise ConfigError(f"--{flag}: expert {shown(str(bad))} does not exist; expected I with I in {want}")
        if D > 1 and len({os.path.abspath(d) for d in self.donors}) == 1 and \
                not self.i_understand_this_is_not_useful_without_training:
            raise ConfigError(f"every donor is {self.donors[0]}: the MoE would compute what that one model does, at "
                              f"more cost; give donors that differ, or {ALL_SAME} to train it on")
        if self.router_init in PROMPT_INITS:
            missing = next((i for i in range(D) if not prompts["positive"].get(i)), None)
            if missing is not None:
                raise ConfigError(f"--router-init {self.router_init}: expert {missing} (donor {self.donors[missing]}) "
                                  "has no positive prompts; give them as --positive-prompts "
                                  f"'{missing}:TEXT'")
            same = {(tuple(prompts["positive"][i]), tuple(prompts["negative"].get(i, ()))) for i in range(D)}
            if D > 1 and len(same) == 1:
                raise ConfigError("every expert has the same positive and negative prompts, so their routers would "
                                  "be the same row; give each expert prompts of its own, or --router-init random")
        elif prompts["positive"] or prompts["negative"]:
            raise ConfigError(f"prompts are read by --router-init {', '.join(PROMPT_INITS)}, not "
                              f"'{self.router_init}'")

    def _check_prompt_sizes(self) -> None:
        """At most MAX_PROMPTS prompts of each kind, each at most MAX_PROMPT_CHARS characters (one-line errors
        naming the limit, before anything tokenises or allocates for them)."""
        for kind in ("positive", "negative"):
            texts = getattr(self, f"{kind}_prompts")
            if not isinstance(texts, (list, tuple)):
                continue
            if len(texts) > MAX_PROMPTS:
                raise ConfigError(f"--{kind}-prompts: {len(texts):,} prompts; at most {MAX_PROMPTS:,}")
            long = next((p for p in texts if isinstance(p, str) and len(p) > MAX_PROMPT_CHARS), None)
            if long is not None:
                raise ConfigError(f"--{kind}-prompts: a prompt of {len(long):,} characters ({shown(long, 40)}); a "
                                  f"prompt holds at most {MAX_PROMPT_CHARS:,} (and at most the model's "
                                  "max_position_embeddings tokens)")

    def prompts(self, kind: str = "positive") -> dict[int | str, list[str]]:
        """{expert key (donor position, or 'shared'): [prompt, ...]} from the I:TEXT strings."""
        out: dict[int | str, list[str]] = {}
        for p in getattr(self, f"{kind}_prompts") or ():
            key, text = expert_key(p)
            if key is None:
                raise ConfigError(f"--{kind}-prompts {shown(p, 40)}: expected I:TEXT, I the expert's index or "
                                  "'shared'")
            out.setdefault(key, []).append(text)
        return out

    def per_donor(self, name: str) -> dict[int | str, float]:
        """{expert key: value} from the I:X strings of `residual_scale` or `expert_noise` (finite; noise >= 0)."""
        out: dict[int | str, float] = {}
        flag = f"--{name.replace('_', '-')}"
        for p in getattr(self, name) or ():
            key, value = expert_key(str(p))
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if key is None or not math.isfinite(number) or (name == "expert_noise" and number < 0):
                what = "a standard deviation >= 0" if name == "expert_noise" else "a finite factor"
                raise ConfigError(f"{flag} {shown(p, 40)}: expected I:X, I the expert's index or 'shared' and X "
                                  f"{what}")
            if key in out:
                raise ConfigError(f"{flag}: expert {key} is given twice")
            out[key] = number
        return out

    @property
    def copies(self) -> int:
        """c = E / D: experts per donor (expert j holds donor j // c); without donors, E copies of the one source."""
        return self.num_experts // max(len(self.donors or ()), 1)

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
    def exact_copies(self) -> bool:
        """Whether each expert equals the FFN it was made from (times its --residual-scale): copy, or noise / drop
        that change nothing, without --expert-noise."""
        if any(self.per_donor("expert_noise").values()):
            return False
        return self.recipe == "copy" or {"noise": self.noise_scale, "drop": self.drop_ratio}.get(self.recipe) == 0

    @property
    def function_preserving(self) -> bool:
        """Whether the recipe reproduces the dense function (in exact arithmetic): copy, granular with `down`
        scaling, and with R > 1 only under a virtual-group `normal` router (`zeros` makes all experts tie)."""
        if self.donors:
            return False  # the experts compute the donors' FFNs, not the base's
        if self.recipe in ("noise", "drop"):
            return self.exact_copies
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


def expert_key(value: str) -> tuple[int | str | None, str]:
    """'I:REST' -> (I as an int, or 'shared'; None when malformed, REST)."""
    key, sep, rest = value.partition(":")
    key = key.strip()
    if not sep or not (re.fullmatch(r"[0-9]{1,6}", key) or key == "shared"):
        return None, rest
    return (int(key) if key != "shared" else key), rest


def parse_moe_layers(value: str | list[int]) -> str | list[int]:
    """'all' | 'every-other' | '0,2,5' | [0, 2, 5] -> 'all' | 'every-other' | [0, 2, 5]."""
    if value in ("all", "every-other"):
        return value
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--moe-layers {shown(value)}: expected all, every-other or a list like 0,2,5") \
                from None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"--moe-layers {shown(value)}: expected all, every-other or a non-empty list of layer "
                          "indices")
    if len(set(value)) != len(value):
        raise ConfigError(f"--moe-layers {shown(list(value))}: a layer is listed twice")
    return sorted(value)


SCALARS = (str, int, float, bool, type(None))  # what one option's value (or one item of a list option) may be


def unknown_keys(where: str, context: str, keys, allowed, not_implemented=()) -> None:
    """A one-line error naming the first keys of `keys` (from a file: any value) not in `allowed`."""
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        extra = [k for k in unknown if k in not_implemented]
        why = f"mergekit's {extra[0]} is not implemented by moekit" if extra else f"expected {', '.join(allowed)}"
        names = ", ".join(shown(k) for k in unknown[:3]) + (f" and {len(unknown) - 3:,} more" if len(unknown) > 3
                                                              else "")
        raise ConfigError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {names} in {context} ({why})")


def options_from_dict(values: dict, where: str, context: str, fixed: dict | None = None) -> UpcycleOptions:
    """UpcycleOptions from a mapping of option names read from a file (a moekit recipe, an upcycling.json's
    `options`), with `fixed` on top: unknown names, a list or mapping where one value belongs, and every value the
    command line would refuse are one-line errors naming `where` and the key."""
    fields = {f.name: f for f in dataclasses.fields(UpcycleOptions)}
    unknown_keys(where, context, values, list(fields))
    for key, value in values.items():
        many = "list[" in str(fields[key].type)
        items = value if many and isinstance(value, list) else [value]
        if not all(isinstance(v, SCALARS) for v in items):
            want = "a list of strings or numbers" if many else "one string, number or boolean"
            raise ConfigError(f"{where}: {key} in {context} must be {want}, got {shown(value)}")
    try:
        return UpcycleOptions(**{**values, **(fixed or {})})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class VerifyOptions:
    """check an upcycled checkpoint computes its dense source's function

    Run two checkpoint directories (dense Llama, Mixtral or Qwen2-MoE) layer by layer from disk in fp32 on the same
    random tokens and print the max absolute and relative logit difference. Given MOE alone (an MoE merged from
    --donors), check that every expert computes its donor's FFN on the MoE's own hidden states and report the share
    of each expert's positive prompts routed to it. Exit code 1 when a difference is above --atol."""

    tokens: int = option(32, "number of random tokens", metavar="N", min=1, max=65536)
    atol: float | None = option(None, "largest accepted max |logit difference| (MOE alone: max |difference| of an "
                                "expert from its donor's FFN)", metavar="ATOL", min=0,
                                default_text="1e-4; MOE alone 1e-5")
    seed: int = option(0, "seed of the random tokens", metavar="N", min=0, max=MAX_SEED)
    dense_dtype: Literal["bf16", "fp16"] | None = option(None, "round DENSE's weights to this dtype first (for an "
                                                         "MoE written with upcycle --dtype)")

    def __post_init__(self):
        check_options(self)
