"""What every parameter formula is built from: the count types (`ParamCount`, `Arch`), the running `Tally`,
config fields read the way transformers reads them (`Fields`), and the parameter counts of the usual pieces
(linear layers, SwiGLU FFNs, GQA and MLA attention, routed-expert layers, Mamba mixers). Plain dicts and ints:
no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moekit.llama.errors import ConfigError, shown

COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router", "norm",
              "lm_head", "other")

# transformers 5 renames legacy layer kinds on load (configuration_utils._LEGACY_LAYER_TYPE_REMAP)
_LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention",
                       "deepseek_sparse_attention": "indexed_attention", "qwen_sparse_attention": "indexed_attention"}


@dataclass
class Arch:
    """What the derived figures (FLOPs, KV cache) need beyond the counts."""

    num_hidden_layers: int
    num_attention_heads: int
    qk_head_dim: int  # per head: width of q and k (MLA: nope + rope)
    v_head_dim: int  # per head: width of v
    kv_cache_dim: int  # elements cached per token per layer: 2·K·D, or MLA's kv_lora_rank + qk_rope_head_dim
    sliding_window: int | None = None  # attention context is min(seq_len, window) when set
    num_experts: int = 0  # E of the routed layers (0: dense)
    num_experts_per_tok: int = 0  # k
    attention_layers: int | None = None  # layers attending over the context (None: all); hybrids have fewer
    sliding_layers: int | None = None  # of those, how many use the window (None: all, when a window is set)
    zero_experts: int = 0  # zero-computation (identity) experts the router may pick besides the E real ones
    hidden_size: int = 0  # H, what each token copy sends under expert parallelism (0: unknown)


@dataclass
class ParamCount:
    """Parameters of one model by component; ``active`` is what one token uses in a forward pass."""

    target: str  # what was counted (preset name, path, module class, number)
    source: str  # preset | config | checkpoint | module | number
    total: dict[str, int]
    active: dict[str, int]
    tied: bool = False  # LM head shares the embedding matrix (counted once, under embedding)
    arch: Arch | None = None
    model_type: str | None = None
    notes: list[str] = field(default_factory=list)
    buffers: dict[str, int] = field(default_factory=dict)  # stored state that is no parameter (not in the totals)

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())

    @property
    def matmul_active_params(self) -> int:
        """Active parameters that are matrix-multiply weights: active minus embedding lookup and norms, plus
        the vocabulary projection when it reuses the (tied) embedding matrix."""
        emb = self.active.get("embedding", 0)
        return self.active_params - emb - self.active.get("norm", 0) + (emb if self.tied else 0)


class Tally:
    """Accumulates (total, active) per component; routed experts count k/E toward active (k/(E + Z) of the E
    real experts when the router may also pick Z zero-computation experts)."""

    def __init__(self):
        self.total = dict.fromkeys(COMPONENTS, 0)
        self.active = dict.fromkeys(COMPONENTS, 0)
        self.routed: list[tuple[int, int, int | None, int]] = []  # (parameters, E, k or None: the model's, Z)
        self.buffers: dict[str, int] = {}

    def add(self, component: str, n: int, times: int = 1) -> None:
        self.total[component] += n * times
        self.active[component] += n * times

    def add_routed(self, n: int, num_experts: int, top_k: int | None = None, zero_experts: int = 0) -> None:
        self.total["routed_experts"] += n
        self.routed.append((n, num_experts, top_k, zero_experts))

    def buffer(self, name: str, n: int) -> None:
        self.buffers[name] = self.buffers.get(name, 0) + n

    def result(self, top_k: int, **kw) -> ParamCount:
        active = Fraction(0)
        for n, E, k, Z in self.routed:
            if n % E:
                raise ConfigError(f"{kw.get('target')}: {n} routed-expert parameters do not split evenly into "
                                  f"{E} experts")
            k = top_k if k is None else k
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E + Z:
                choices = f"{E} routed experts" + (f" + {Z} zero-computation experts" if Z else "")
                raise ConfigError(f"{kw.get('target')}: top-k (num_experts_per_tok) is {shown(k)}; the router picks "
                                  f"k of {choices}, so k must be an integer from 1 to {E + Z}")
            active += Fraction(n // E * E * k, E + Z)
        self.active["routed_experts"] += round(active)
        return ParamCount(total=dict(self.total), active=dict(self.active), buffers=dict(self.buffers), **kw)


class Fields:
    """A config dict read the way transformers reads it, with errors that name the file and field."""

    MAX_LAYERS = 100_000  # a bound on layer counts (and on the formulas' per-layer loops)
    MAX_INT = 2**53  # a bound on every other size: far above any model's, and counts stay exact as floats

    def __init__(self, d: dict[str, Any], source: str):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        self.d, self.source = d, source

    def sub(self, key: str) -> Fields:
        """A nested config (attn_config, ffn_config, ...), empty when absent; an object when present."""
        return Fields(self.d.get(key) or {}, f"{self.source}: {key}")

    def req(self, *keys: str, positive: bool = True) -> int:
        """The first of `keys` (aliases) present; a required integer (> 0, or >= 0 if not `positive`)."""
        for k in keys:
            if self.d.get(k) is not None:
                return self._int(k, self.d[k], positive)
        raise ConfigError(f"{self.source}: required field '{keys[0]}' is missing")

    def opt(self, key: str, default: Any, positive: bool = True) -> Any:
        """An optional field: transformers' default when absent or null; checked when the default is an int
        or None (an optional int such as sliding_window) or a list (of ints, such as mlp_only_layers)."""
        v = self.d.get(key)
        if v is None:
            return default
        if default is None or (isinstance(default, int) and not isinstance(default, bool)):
            return self._int(key, v, positive)
        if isinstance(default, list) and not (isinstance(v, list) and all(_is_int(x) for x in v)):
            raise ConfigError(f"{self.source}: field '{key}' must be a list of integers, got {shown(v)}")
        return v

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.opt(key, default))

    def nullable(self, key: str, default: int | None) -> int | None:
        """An int where an explicit null means 'none' (e.g. q_lora_rank: null is a plain q_proj)."""
        if key not in self.d:
            return default
        return None if self.d[key] is None else self._int(key, self.d[key], True)

    def per_layer(self, key: str, L: int, default: Callable[[int], str] | None) -> list[str]:
        """A per-layer list of kinds (layer_types, mlp_layer_types, ...), legacy names renamed as transformers
        does; `default(i)` for each layer when absent (required when there is no default)."""
        v = self.d.get(key)
        if v is None and default is None:
            raise ConfigError(f"{self.source}: required field '{key}' is missing")
        if v is None:
            return [default(i) for i in range(L)]
        if not isinstance(v, list) or len(v) < L:
            raise ConfigError(f"{self.source}: field '{key}' must be a list of {L} layer kinds, got {shown(v)}")
        return [_LEGACY_LAYER_TYPES.get(x, x) for x in v[:L]]

    def _int(self, key: str, v: Any, positive: bool) -> int:
        if _is_int(v) and v > self.MAX_INT:
            raise ConfigError(f"{self.source}: field '{key}' is {shown(v)}; expected at most 2^53")
        if "layers" in key and _is_int(v) and v > self.MAX_LAYERS:
            raise ConfigError(f"{self.source}: field '{key}' is {v:,}; moekit counts models of at most "
                              f"{self.MAX_LAYERS:,} layers")
        if not _is_int(v) or v < (1 if positive else 0):
            kind = "a positive" if positive else "a non-negative"
            raise ConfigError(f"{self.source}: field '{key}' must be {kind} integer, got {shown(v)}")
        return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the pieces ---------------------------------------------------------------------------------------------

def linear(i: int, o: int, bias: bool = False) -> int:
    return i * o + (o if bias else 0)


def glu(H: int, F: int, bias: bool = False) -> int:
    """SwiGLU FFN: gate and up [F, H], down [H, F]."""
    return 2 * linear(H, F, bias) + linear(F, H, bias)


def core(c: Fields, layers: str = "num_hidden_layers"):
    """(V, H, L, N, K, D) with HF's defaults for K (= N) and head_dim (= H // N)."""
    V, H, L, N = c.req("vocab_size"), c.req("hidden_size"), c.req(layers), c.req("num_attention_heads")
    K = c.opt("num_key_value_heads", N)
    D = c.opt("head_dim", H // N)
    if N % K:
        raise ConfigError(f"{c.source}: num_attention_heads ({N}) must be a multiple of num_key_value_heads ({K})")
    return V, H, L, N, K, D


def gqa(H: int, N: int, K: int, D: int, qkv_bias: bool = False, o_bias: bool = False) -> int:
    """q [N·D, H], k and v [K·D, H], o [H, N·D]."""
    return linear(H, N * D, qkv_bias) + 2 * linear(H, K * D, qkv_bias) + linear(N * D, H, o_bias)


def mla(c: Fields, t: Tally, H: int, N: int, layers: int = 1, q_lora_default: int | None = 1536,
        bias: bool = False) -> tuple[int, int, int]:
    """DeepSeek's multi-head latent attention in `layers` layers: q through a rank-q_lora_rank bottleneck
    (or a plain q_proj when it is null), k/v from one rank-kv_lora_rank latent plus a shared rope key.
    Returns (qk head dim, v head dim, cached elements per token)."""
    nope, rope, Dv, r_kv = c.req("qk_nope_head_dim"), c.req("qk_rope_head_dim"), c.req("v_head_dim"), \
        c.req("kv_lora_rank")
    r_q = c.nullable("q_lora_rank", q_lora_default)
    Dqk = nope + rope
    if r_q is None:
        attn = linear(H, N * Dqk)
    else:
        attn = linear(H, r_q, bias) + linear(r_q, N * Dqk)
        t.add("norm", r_q, layers)  # q_a_layernorm
    attn += linear(H, r_kv + rope, bias) + linear(r_kv, N * (nope + Dv)) + linear(N * Dv, H, bias)
    t.add("attention", attn, layers)
    t.add("norm", r_kv, layers)  # kv_a_layernorm
    return Dqk, Dv, r_kv + rope


def routed(t: Tally, H: int, E: int, F: int, k: int | None = None, router_bias: bool = False,
           expert_bias: bool = False, correction_bias: bool = False, zero_experts: int = 0) -> None:
    """One routed layer: a router over E (+ Z zero-computation) choices and E SwiGLU experts of width F; the
    routing-score correction bias, where the model keeps one, is a buffer."""
    t.add("router", linear(H, E + zero_experts, router_bias))
    t.add_routed(E * glu(H, F, expert_bias), E, k, zero_experts)
    if correction_bias:
        t.buffer("e_score_correction_bias", E + zero_experts)


def ffn_layers(t: Tally, H: int, kinds: list[str], dense_F: int = 0, E: int = 0, Fe: int = 0,
               shared_F: int = 0, shared_gate: bool = False, bias: bool = False, **routed_kw) -> None:
    """Each layer's FFN: 'dense' is a SwiGLU of width dense_F; 'sparse' a routed layer, plus a shared expert of
    width shared_F (with a sigmoid gate [1, H] when shared_gate) where shared_F > 0."""
    for kind in kinds:
        if kind == "sparse":
            routed(t, H, E, Fe, **routed_kw)
            if shared_F:
                t.add("shared_experts", glu(H, shared_F, bias) + (H if shared_gate else 0))
        elif kind == "dense":
            t.add("dense_ffn", glu(H, dense_F, bias))
        else:  # a layer-type list in the config names something else: counting it as dense would be a guess
            raise ConfigError(f"FFN layer kind {shown(kind)} is not known; expected 'dense' or 'sparse'")


def mamba2(H: int, Di: int, heads: int, groups: int, state: int, conv: int, conv_bias: bool = True,
           proj_bias: bool = False) -> int:
    """A Mamba-2 mixer of inner width Di, without its gated RMSNorm [Di]: in_proj makes x, z, B, C and dt; a
    depthwise conv over x, B, C; per head dt_bias, A_log and D; out_proj."""
    conv_dim = Di + 2 * groups * state
    mixer = linear(H, Di + conv_dim + heads, proj_bias) + conv_dim * conv + (conv_dim if conv_bias else 0)
    return mixer + 3 * heads + linear(Di, H, proj_bias)


def finish(t: Tally, c: Fields, V: int, H: int, tied_default: bool = False, final_norm: int | None = None,
           head_bias: bool = False) -> bool:
    """Embedding, final norm (H unless given) and LM head (its weight unless tied; a bias stays its own);
    True when tied."""
    t.add("embedding", V * H)
    t.add("norm", H if final_norm is None else final_norm)
    tied = c.flag("tie_word_embeddings", tied_default)
    t.add("lm_head", (0 if tied else V * H) + (V if head_bias else 0))
    return tied


def sparse_kinds(L: int, is_sparse: Callable[[int], bool]) -> list[str]:
    return ["sparse" if is_sparse(i) else "dense" for i in range(L)]


def attention_arch(L: int, N: int, D: int, kv_dim: int, kinds: list[str], window: int | None, E: int = 0,
                   k: int = 0, Dv: int | None = None, **kw) -> Arch:
    """Arch from per-layer attention kinds: linear / Mamba layers keep a fixed-size state (no KV cache);
    'sliding_attention' layers attend over the window."""
    attn = [x for x in kinds if x != "linear_attention"]
    sliding = sum(x == "sliding_attention" for x in attn) if window else 0
    return Arch(L, N, D, D if Dv is None else Dv, kv_dim, window if sliding else None, E, k,
                attention_layers=len(attn) if len(attn) < L else None,
                sliding_layers=sliding if 0 < sliding < len(attn) else None, **kw)
