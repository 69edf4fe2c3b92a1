"""Exact parameter counts from a config, by formula: one function per Hugging Face ``model_type`` (the field
names and defaults of transformers 5's config classes, read from plain ``config.json`` dicts), plus moekit's
own MoE configs. Each returns a `ParamCount`: per component, total and active-per-token parameters.

Shape fields (vocabulary, width, layers, heads, FFN widths, expert count, top-k) are required: a default for
them would silently count a different model. Every other key takes transformers' default when absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama.errors import ConfigError

COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router", "norm",
              "lm_head", "other")


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
    """Accumulates (total, active) per component; routed experts count k/E toward active."""

    def __init__(self):
        self.total = dict.fromkeys(COMPONENTS, 0)
        self.active = dict.fromkeys(COMPONENTS, 0)
        self.routed: dict[int, int] = {}  # E -> routed-expert parameters in layers with E experts

    def add(self, component: str, n: int, times: int = 1) -> None:
        self.total[component] += n * times
        self.active[component] += n * times

    def add_routed(self, n: int, num_experts: int) -> None:
        self.total["routed_experts"] += n
        self.routed[num_experts] = self.routed.get(num_experts, 0) + n

    def result(self, top_k: int, **kw) -> ParamCount:
        for E, n in self.routed.items():
            if n % E:
                raise ConfigError(f"{kw.get('target')}: {n} routed-expert parameters do not split evenly into "
                                  f"{E} experts")
            self.active["routed_experts"] += n // E * min(top_k, E)
        return ParamCount(total=dict(self.total), active=dict(self.active), **kw)


class Fields:
    """A config dict read the way transformers reads it, with errors that name the file and field."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def req(self, *keys: str, positive: bool = True) -> int:
        """The first of `keys` (aliases) present; a required integer (> 0, or >= 0 if not `positive`)."""
        for k in keys:
            if self.d.get(k) is not None:
                return self._int(k, self.d[k], positive)
        raise ConfigError(f"{self.source}: required field '{keys[0]}' is missing")

    def opt(self, key: str, default: Any, positive: bool = True) -> Any:
        """An optional field: transformers' default when absent or null; checked when it is an int."""
        v = self.d.get(key)
        if v is None:
            return default
        return self._int(key, v, positive) if isinstance(default, int) and not isinstance(default, bool) else v

    def _int(self, key: str, v: Any, positive: bool) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if positive else 0):
            kind = "a positive" if positive else "a non-negative"
            raise ConfigError(f"{self.source}: field '{key}' must be {kind} integer, got {v!r}")
        return v


def linear(i: int, o: int, bias: bool = False) -> int:
    return i * o + (o if bias else 0)


def glu(H: int, F: int, bias: bool = False) -> int:
    """SwiGLU FFN: gate and up [F, H], down [H, F]."""
    return 2 * linear(H, F, bias) + linear(F, H, bias)


def _core(c: Fields):
    """(V, H, L, N, K, D) with HF's defaults for K (= N) and head_dim (= H // N)."""
    V, H, L, N = (c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers"),
                  c.req("num_attention_heads"))
    K = c.opt("num_key_value_heads", N)
    D = c.opt("head_dim", H // N)
    if N % K:
        raise ConfigError(f"{c.source}: num_attention_heads ({N}) must be a multiple of num_key_value_heads ({K})")
    return V, H, L, N, K, D


def _gqa(H: int, N: int, K: int, D: int, qkv_bias: bool, o_bias: bool) -> int:
    return linear(H, N * D, qkv_bias) + 2 * linear(H, K * D, qkv_bias) + linear(N * D, H, o_bias)


def _finish(t: Tally, c: Fields, V: int, H: int, tied_default: bool = False) -> bool:
    t.add("embedding", V * H)
    t.add("norm", H)  # final norm
    tied = bool(c.opt("tie_word_embeddings", tied_default))
    if not tied:
        t.add("lm_head", V * H)
    return tied


def _moe_layer(t: Tally, H: int, E: int, F: int, router_bias: bool = False) -> None:
    t.add("router", linear(H, E, router_bias))
    t.add_routed(E * glu(H, F), E)


def dense_llama(c: Fields, t: Tally, mt: str):
    """llama and mistral: GQA attention, SwiGLU MLP, two RMSNorms per layer."""
    V, H, L, N, K, D = _core(c)
    F = c.req("intermediate_size")
    ab = bool(c.opt("attention_bias", False)) if mt == "llama" else False
    mb = bool(c.opt("mlp_bias", False)) if mt == "llama" else False
    t.add("attention", _gqa(H, N, K, D, ab, ab), L)
    t.add("dense_ffn", glu(H, F, mb), L)
    t.add("norm", 2 * H, L)
    window = c.opt("sliding_window", 4096) if mt == "mistral" else None
    return _finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, window), 0


def mixtral(c: Fields, t: Tally, mt: str):
    """Every layer routed: E experts of width intermediate_size, top-k, a bias-free router."""
    V, H, L, N, K, D = _core(c)
    F, E, k = c.req("intermediate_size"), c.req("num_local_experts", "num_experts"), c.req("num_experts_per_tok")
    t.add("attention", _gqa(H, N, K, D, False, False), L)
    t.add("norm", 2 * H, L)
    for _ in range(L):
        _moe_layer(t, H, E, F)
    return _finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, c.opt("sliding_window", None), E, k), k


def qwen_moe(c: Fields, t: Tally, mt: str):
    """qwen2_moe / qwen3_moe: routed layers where (i+1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    Qwen2-MoE: q/k/v biases, one gated shared expert per routed layer. Qwen3-MoE: q/k RMSNorm per head."""
    V, H, L, N, K, D = _core(c)
    E, k = c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok")
    Fe = c.req("moe_intermediate_size")
    step, dense = c.opt("decoder_sparse_step", 1), set(c.opt("mlp_only_layers", []))
    if mt == "qwen2_moe":
        qkv_bias = c.opt("qkv_bias", True)
        t.add("attention", _gqa(H, N, K, D, qkv_bias, False), L)
        Fs = c.req("shared_expert_intermediate_size", positive=False)
    else:
        ab = bool(c.opt("attention_bias", False))
        t.add("attention", _gqa(H, N, K, D, ab, ab), L)
        t.add("norm", 2 * D, L)  # q_norm, k_norm over the head dim
    t.add("norm", 2 * H, L)
    routed = [i for i in range(L) if i not in dense and (i + 1) % step == 0]
    if len(routed) < L:
        t.add("dense_ffn", glu(H, c.req("intermediate_size")), L - len(routed))
    for _ in routed:
        _moe_layer(t, H, E, Fe)
        if mt == "qwen2_moe":
            t.add("shared_experts", glu(H, Fs) + H)  # shared expert and its sigmoid gate [1, H]
    window = c.opt("sliding_window", 4096) if c.opt("use_sliding_window", False) else None
    return _finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, window, E, k), k


def olmoe(c: Fields, t: Tally, mt: str):
    """Every layer routed; q_norm over the full query width (H), k_norm over K·(H // N)."""
    V, H, L, N, K, D = _core(c)
    F, E, k = c.req("intermediate_size"), c.req("num_experts", "num_local_experts"), c.req("num_experts_per_tok")
    ab = bool(c.opt("attention_bias", False))
    t.add("attention", _gqa(H, N, K, D, ab, ab), L)
    t.add("norm", 2 * H + H + (H // N) * K, L)
    for _ in range(L):
        _moe_layer(t, H, E, F)
    return _finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, None, E, k), k


def deepseek(c: Fields, t: Tally, mt: str):
    """deepseek_v2 / deepseek_v3: multi-head latent attention (MLA); layers i >= first_k_dense_replace with
    i % moe_layer_freq == 0 are routed, with n_shared_experts fused into one MLP of n·moe_intermediate_size."""
    V, H, L, N = (c.req("vocab_size"), c.req("hidden_size"), c.req("num_hidden_layers"),
                  c.req("num_attention_heads"))
    v2 = mt == "deepseek_v2"
    nope, rope = c.req("qk_nope_head_dim"), c.req("qk_rope_head_dim")
    Dv, r_kv = c.req("v_head_dim"), c.req("kv_lora_rank")
    r_q = c.d.get("q_lora_rank", 1536)  # an explicit null means a plain q_proj
    r_q = None if r_q is None else c._int("q_lora_rank", r_q, True)
    ab, mb = bool(c.opt("attention_bias", False)), bool(c.opt("mlp_bias", False)) and v2
    Dqk = nope + rope
    if r_q is None:  # DeepSeek-V2-Lite
        attn = linear(H, N * Dqk)
    else:
        attn = linear(H, r_q, ab) + linear(r_q, N * Dqk)
        t.add("norm", r_q, L)  # q_a_layernorm
    attn += linear(H, r_kv + rope, ab) + linear(r_kv, N * (nope + Dv)) + linear(N * Dv, H, ab)
    t.add("attention", attn, L)
    t.add("norm", r_kv + 2 * H, L)  # kv_a_layernorm, input and post-attention norms
    first, freq = c.opt("first_k_dense_replace", 0 if v2 else 3, positive=False), c.opt("moe_layer_freq", 1)
    routed = [i for i in range(L) if i >= first and i % freq == 0]
    E, k = (c.req("n_routed_experts", "num_local_experts"), c.req("num_experts_per_tok")) if routed else (0, 0)
    if len(routed) < L:
        t.add("dense_ffn", glu(H, c.req("intermediate_size"), mb), L - len(routed))
    if routed:
        Fe, shared = c.req("moe_intermediate_size"), c.opt("n_shared_experts", 2 if v2 else 1, positive=False)
        for _ in routed:
            t.add("router", H * E)
            t.add_routed(E * glu(H, Fe), E)  # stacked experts carry no bias
            t.add("shared_experts", glu(H, Fe * shared, mb))
    return _finish(t, c, V, H), Arch(L, N, Dqk, Dv, r_kv + rope, None, E, k), k


def dbrx(c: Fields, t: Tally, mt: str):
    """DBRX: fused Wqkv, bias-free LayerNorms, every layer routed; attn_config / ffn_config nested."""
    V, H, L, N = c.req("vocab_size"), c.req("d_model", "hidden_size"), c.req("n_layers"), c.req("n_heads")
    a = Fields(c.opt("attn_config", {}) or {}, c.source + ": attn_config")
    f = Fields(c.opt("ffn_config", {}) or {}, c.source + ": ffn_config")
    K, D = a.opt("kv_n_heads", 1), H // N
    F, E, k = f.req("ffn_hidden_size"), f.req("moe_num_experts"), f.req("moe_top_k")
    t.add("attention", linear(H, H + 2 * K * D) + linear(H, H), L)
    t.add("norm", 2 * H, L)
    for _ in range(L):
        _moe_layer(t, H, E, F)
    return _finish(t, c, V, H), Arch(L, N, D, D, 2 * K * D, None, E, k), k


def moekit(cfg, t: Tally):
    """moekit's own MoEConfig (model_type 'moe', or any MoEConfig object): the llama core with routed layers
    where `cfg.is_moe_layer(i)`, an optional (gated) shared expert, q/k/v biases per `attention_qkv_bias`."""
    V, H, L, N, K, D = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim)
    E, k, Fe = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    t.add("attention", _gqa(H, N, K, D, cfg.attention_qkv_bias, cfg.attention_bias), L)
    t.add("norm", 2 * H, L)
    for i in range(L):
        if cfg.is_moe_layer(i):
            _moe_layer(t, H, E, Fe)
            if cfg.shared_expert_intermediate_size:
                t.add("shared_experts", glu(H, cfg.shared_expert_intermediate_size) + (H if cfg.shared_expert_gate
                                                                                       else 0))
        else:
            t.add("dense_ffn", glu(H, cfg.intermediate_size, cfg.mlp_bias))
    t.add("embedding", V * H)
    t.add("norm", H)
    if not cfg.tie_word_embeddings:
        t.add("lm_head", V * H)
    return bool(cfg.tie_word_embeddings), Arch(L, N, D, D, 2 * K * D, None, E, k), k


FORMULAS = {"llama": dense_llama, "mistral": dense_llama, "mixtral": mixtral, "qwen2_moe": qwen_moe,
            "qwen3_moe": qwen_moe, "olmoe": olmoe, "deepseek_v2": deepseek, "deepseek_v3": deepseek, "dbrx": dbrx}
SUPPORTED_MODEL_TYPES = (*FORMULAS, "moe")


def _moe_config_class():
    from moe.config import MoEConfig  # lazily: the formulas above depend on plain dicts only

    return MoEConfig


def count_config(config: Any, target: str = "config", source: str = "config") -> ParamCount:
    """Exact counts from a config: a config.json dict, a LlamaConfig/MoEConfig, or a transformers config."""
    if not isinstance(config, dict):
        MoEConfig = _moe_config_class()
        if isinstance(config, MoEConfig):
            t = Tally()
            tied, arch, k = moekit(config, t)
            return t.result(k, target=target, source=source, tied=tied, arch=arch, model_type=config.model_type)
        if not hasattr(config, "to_dict"):
            raise ConfigError(f"{target}: expected a config dict or config object, got {type(config).__name__}")
        config = config.to_dict()
    mt = config.get("model_type")
    if mt == "moe":
        return count_config(_moe_config_class().from_dict(config, source=target), target, source)
    if mt not in FORMULAS:
        raise ConfigError(f"{target}: model_type {mt!r} is not supported; expected one of "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    t = Tally()
    tied, arch, k = FORMULAS[mt](Fields(config, target), t, mt)
    return t.result(k, target=target, source=source, tied=tied, arch=arch, model_type=mt)
