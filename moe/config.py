"""MoEConfig: LlamaConfig plus the routed-expert fields, under Hugging Face's names (Mixtral, Qwen2-MoE, DeepSeek).

Which layers are MoE: every layer by default; `decoder_sparse_step` n keeps only layers with (i+1) % n == 0;
`mlp_only_layers` lists dense layers; `first_k_dense_replace` k makes layers 0..k-1 dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import ConfigError
from moekit.llama.options import option

MoEModelType = Literal["moe", "mixtral", "qwen2_moe"]  # moekit's own, and the HF formats it reads and writes

# Defaults transformers applies to fields a hand-written config.json may leave out (real ones list them all).
_HF_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=8, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, router_aux_loss_coef=0.001, norm_topk_prob=True),
    "qwen2_moe": dict(num_local_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False, qkv_bias=True,
                      rms_norm_eps=1e-6, max_position_embeddings=32768, router_aux_loss_coef=0.001,
                      decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=None, eos_token_id=None),
}
_HF_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0}


@dataclass
class MoEConfig(LlamaConfig):
    """LlamaConfig's fields and the routed-expert fields, each declared with its type and range."""

    num_local_experts: int = option(8, "E: routed experts per MoE layer (Qwen2-MoE's config.json: num_experts)",
                                    min=1)
    num_experts_per_tok: int = option(2, "k: experts per token", min=1)
    moe_intermediate_size: int | None = option(None, "F of one expert; None: = intermediate_size", min=1)
    num_shared_experts: int = option(0, "experts every token goes through, fused into one MLP", min=0)
    shared_expert_intermediate_size: int = option(0, "width of that MLP; 0 with shared experts: = n * F", min=0)
    shared_expert_gate: bool = option(False, "Qwen2-MoE: shared output scaled by sigmoid(x @ w), w [1, H]")
    router_score: Literal["softmax", "sigmoid"] = option("softmax", "softmax (Mixtral, Qwen) | sigmoid "
                                                         "(DeepSeek-V3)")
    norm_topk_prob: bool = option(True, "renormalise the k weights to sum to 1 (Mixtral: always)")
    router_jitter_noise: float = option(0.0, "multiplicative noise on the router input, training only", min=0,
                                        lt=1)
    capacity_factor: float | None = option(None, "None: dropless; else each expert takes ceil(cf * T * k / E) "
                                           "copies", gt=0)
    router_aux_loss_coef: float = option(0.001, "load-balancing loss weight (Switch / Mixtral)", min=0)
    router_z_loss_coef: float = option(0.0, "router z-loss weight (ST-MoE)", min=0)
    router_bias_update_rate: float = option(0.0, "auxiliary-loss-free balancing step (DeepSeek-V3); 0 = off",
                                            min=0)
    decoder_sparse_step: int = option(1, "every n-th layer is MoE", min=1)
    mlp_only_layers: list[int] = option(default_factory=list, help="dense layers (indices in [0, L))")
    first_k_dense_replace: int = option(0, "the first k layers are dense", min=0)
    qkv_bias: bool | None = option(None, "biases on q/k/v only (Qwen2); None: = attention_bias")
    model_type: MoEModelType = option("moe", "moekit's own, or the HF format it was read from")

    MODEL_TYPES: ClassVar[tuple[str, ...]] = get_args(MoEModelType)

    def __post_init__(self):
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_shared_experts and not self.shared_expert_intermediate_size:
            self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
        if self.shared_expert_intermediate_size and not self.num_shared_experts:
            self.num_shared_experts = 1
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        super().__post_init__()

    def validate(self) -> None:
        super().validate()  # every declared field, the MoE fields too
        E, k, L = self.num_local_experts, self.num_experts_per_tok, self.num_hidden_layers
        if k > E:
            raise ConfigError(f"num_experts_per_tok ({k}) must be at most num_local_experts ({E})")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ConfigError("shared_expert_gate is set but there is no shared expert "
                              "(num_shared_experts and shared_expert_intermediate_size are 0)")
        if (i := next((i for i in self.mlp_only_layers if not 0 <= i < L), None)) is not None:
            raise ConfigError(f"mlp_only_layers entry {i} is not a layer index in [0, {L})")
        if self.first_k_dense_replace > L:
            raise ConfigError(f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers ({L})")

    # ---- layout -------------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i has a routed feed-forward (else llama's dense MLP)."""
        if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
            raise ConfigError(f"layer index {i!r} is out of range [0, {self.num_hidden_layers})")
        return (i not in self.mlp_only_layers and i >= self.first_k_dense_replace
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def attention_qkv_bias(self) -> bool:
        return self.attention_bias if self.qkv_bias is None else self.qkv_bias

    def capacity(self, num_tokens: int) -> int | None:
        """Token copies one expert accepts for `num_tokens` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.num_experts_per_tok
                                / self.num_local_experts))

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> MoEConfig:
        """Our own configs, and Hugging Face config.json files of model_type mixtral and qwen2_moe."""
        d = dict(d)
        mt = d.get("model_type", "moe")
        if mt == "qwen2_moe":
            if "num_experts" in d:
                d["num_local_experts"] = d.pop("num_experts")
            if d.get("use_sliding_window"):
                raise ConfigError(f"{source}: use_sliding_window is true; moekit has no sliding-window attention")
        if mt == "mixtral" and d.get("sliding_window") not in (None, 0):
            if d["sliding_window"] < d.get("max_position_embeddings", _HF_DEFAULTS["mixtral"]
                                           ["max_position_embeddings"]):
                raise ConfigError(f"{source}: sliding_window {d['sliding_window']} is set; moekit has no "
                                  "sliding-window attention")
        if mt in _HF_DEFAULTS:
            for k, v in _HF_DEFAULTS[mt].items():
                d.setdefault(k, v)
            if "rope_theta" not in d and not isinstance(d.get("rope_parameters"), dict):
                d["rope_theta"] = _HF_ROPE_THETA[mt]
        if mt == "qwen2_moe" and "shared_expert_gate" not in d:
            d["shared_expert_gate"] = d["shared_expert_intermediate_size"] > 0  # Qwen2-MoE always gates it
        return super().from_dict(d, source)  # type: ignore[return-value]

    @classmethod
    def from_dense(cls, dense: LlamaConfig, **moe_fields) -> MoEConfig:
        """The MoE config of a dense Llama config (e.g. for upcycling): same core, experts as given."""
        core = {k: getattr(dense, k) for k in LlamaConfig.field_names() if k != "model_type"}
        return cls(**core, **moe_fields)

    def attention_biases(self) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias): Qwen2-MoE's `qkv_bias` sets q/k/v only."""
        return self.attention_qkv_bias, self.attention_bias


_TINY = {k: v for k, v in LLAMA_PRESETS["tiny"].items()}
MOE_PRESETS: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, model_type="mixtral"),
    # Qwen/Qwen1.5-MoE-A2.7B config.json (4 shared experts fused into one 5632-wide gated MLP)
    "qwen1.5-moe-a2.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
                              rms_norm_eps=1e-6, rope_theta=1e6, num_local_experts=60, num_experts_per_tok=4,
                              moe_intermediate_size=1408, num_shared_experts=4, shared_expert_intermediate_size=5632,
                              shared_expert_gate=True, norm_topk_prob=False, qkv_bias=True,
                              bos_token_id=151643, eos_token_id=151643, model_type="qwen2_moe"),
    # Tiny models for tests and the demo: the llama "tiny" core with 4 experts, top-2.
    "tiny-moe": dict(_TINY, num_local_experts=4, num_experts_per_tok=2),
    "tiny-moe-shared": dict(_TINY, num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, num_shared_experts=1, shared_expert_gate=True,
                            mlp_only_layers=[0]),
    "tiny-moe-8x2": dict(_TINY, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=88),
}
MoEConfig.PRESETS = MOE_PRESETS
