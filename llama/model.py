"""The dense Llama decoder, in plain PyTorch modules whose parameter names are Hugging Face's.

Shapes: B batch, S new tokens, L cached + new tokens, H hidden, N query heads, K key/value heads,
D head dim, F FFN width, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .checkpoint import CheckpointReader, dtype_from_name, dtype_name, save_state_dict
from .config import LlamaConfig
from .errors import CheckpointError, ConfigError
from .io import AtomicDir, write_json
from .loss import causal_lm_head_loss, causal_lm_loss
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the statistics in fp32, whatever the activation dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: [B, K, max_len, D] each."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0  # tokens already stored (host-side; advanced by the model after each forward)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, K, S, D] after the cached tokens; return all keys/values [B, K, L, D]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        H, D = config.hidden_size, config.head_dim
        qkv_bias, o_bias = config.attention_biases()
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=o_bias)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, N, S, D]
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, K, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, K, S, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, K, L, D]
        gqa = self.n_kv != self.n_heads  # GQA / MQA: each key/value head serves N/K query heads
        if gqa and mask is not None:  # SDPA's own GQA (no copies) serves the unmasked kernels only
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)  # [B, N, L, D]
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        causal = mask is None and S > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa and mask is None)  # [B, N, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, intermediate_size: int | None = None):
        super().__init__()
        H, Fd, bias = config.hidden_size, intermediate_size or config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, Fd, bias=bias)
        self.up_proj = nn.Linear(H, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. `mlp` is any feed-forward module; it returns y, or (y, aux) where aux is passed up."""

    def __init__(self, config: LlamaConfig, layer_idx: int, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        out = self.mlp(self.post_attention_layernorm(x))
        out, aux = out if isinstance(out, tuple) else (out, None)
        return x + out, aux


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm: HF's `model.*` parameter names. `checkpoint_layers`: in training,
    keep only each decoder layer's input and recompute the layer in backward (activation checkpointing)."""

    checkpoint_layers = False

    def __init__(self, config: LlamaConfig, make_mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, make_mlp(i)) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + S, device=input_ids.device).expand(B, S)  # [B, S]
        x = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = self.rotary_emb(positions, x.dtype)
        mask = attention_bias_mask(S, past, attention_mask, input_ids.device)
        aux = []
        recompute = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x, a = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, a = layer(x, cos, sin, mask, cache)
            aux.append(a)
        if cache is not None:
            cache.length += S
        return self.norm(x), aux


def attention_bias_mask(S: int, past: int, attention_mask, device) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, S, past+S] (True = attend), or None when plain causal attention suffices."""
    if attention_mask is None and (past == 0 or S == 1):
        return None  # SDPA's is_causal (S > 1) or no mask at all (one new token sees everything)
    L = past + S
    q_pos = torch.arange(past, L, device=device)[:, None]
    mask = (torch.arange(L, device=device)[None, :] <= q_pos)[None, None]  # [1, 1, S, L]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :L].bool()
        mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: attend anywhere, not NaN
    return mask


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when asked for the loss only (return_logits=False)
    loss: torch.Tensor | None = None
    aux: list[Any] = field(default_factory=list)  # per layer: what its feed-forward module returned beside y


class Llama(nn.Module):
    """Causal LM: `model` (embeddings, layers, norm) and `lm_head`, as in transformers' LlamaForCausalLM.

    Subclasses change the feed-forward of a layer by overriding `make_mlp`, and the on-disk tensor names
    by overriding `disk_pairs` / `load_checkpoint_tensors` (see moe/)."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.make_mlp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return MLP(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, labels=None, cache: KVCache | None = None,
                return_logits: bool = True) -> CausalLMOutput:
        """input_ids [B, S] (and attention_mask [B, L] of 1/0, labels [B, S] with -100 ignored). With labels and
        return_logits=False, the loss is fused with the LM head (`causal_lm_head_loss`) and logits is None."""
        h, aux = self.model(input_ids, attention_mask, cache)  # [B, S, H]
        logits, loss = self.head(h, labels, return_logits)
        return CausalLMOutput(logits=logits, loss=loss, aux=aux)

    def head(self, h: torch.Tensor, labels=None, return_logits: bool = True):
        """h [B, S, H] -> (logits [B, S, V] or None, LM loss or None)."""
        if labels is not None and not return_logits:
            return None, causal_lm_head_loss(h, self.lm_head.weight, labels)
        logits = self.lm_head(h)  # [B, S, V]
        return logits, causal_lm_loss(logits, labels) if labels is not None else None

    def num_parameters(self) -> int:
        """Parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------------
    FORMATS: tuple[str, ...] = ("llama",)  # on-disk layouts this class writes

    def resolve_format(self, format: str = "auto") -> str:
        """The on-disk layout to write: `auto` picks this class's own."""
        if format == "auto":
            return self.FORMATS[0]
        if format not in self.FORMATS:
            raise ConfigError(f"{type(self).__name__} cannot be written as '{format}'; expected one of {self.FORMATS}")
        return format

    def checkpoint_tensors(self, format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs as the checkpoint stores them, in order; a tied lm_head is not stored."""
        return self.disk_pairs(self.state_dict(), format)

    def disk_pairs(self, state: dict[str, torch.Tensor], format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs of `state`, in-memory tensors of this model (all, or a whole
        decoder layer's at a time)."""
        self.resolve_format(format)
        for name, t in state.items():
            if not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                yield name, t

    def checkpoint_config(self, dtype: torch.dtype, format: str = "auto") -> dict:
        """The config.json of a checkpoint in `format` whose weights are stored in `dtype`."""
        self.resolve_format(format)
        d = self.config.to_dict()
        d.setdefault("architectures", ["LlamaForCausalLM"])
        d["torch_dtype"] = dtype_name(dtype)
        return d

    def checkpoint_plan(self, reader: CheckpointReader) -> dict[str, Read]:
        """{state dict name: its reader} for `reader`'s checkpoint, checked against this model's names and shapes
        before anything is read (a sharded run reads each tensor, or its rows, when it places it)."""
        return matching_plan(self, reader)

    def load_checkpoint_tensors(self, reader: CheckpointReader, dtype=None) -> dict[str, torch.Tensor]:
        """The state dict read from `reader`, tensor by tensor, checked against this model's shapes."""
        return read_plan(self.checkpoint_plan(reader), dtype)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None, device=None):
        """Load a Hugging Face checkpoint directory (safetensors, one or many shards)."""
        dtype = dtype_from_name(dtype)
        with CheckpointReader(path) as reader:
            config = cls.config_class.from_dict(reader.config, source=os.path.join(str(path), "config.json"))
            with torch.device("meta"):
                model = cls(config)
            state = model.load_checkpoint_tensors(reader, dtype)
        return cls.from_state_dict(config, state, device, model)

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, state: dict[str, torch.Tensor], device=None, model=None):
        """A model (eval mode) holding `state`'s tensors (moved to `device`), built without initialising weights."""
        if model is None:
            with torch.device("meta"):
                model = cls(config)
        device = torch.device(device or "cpu")
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.reset(device)
        return model.eval()

    def save_pretrained(self, path, format: str = "auto", max_shard_size: int | str = "5GB", force: bool = False,
                        dtype: torch.dtype | str | None = None) -> None:
        """Write config.json and safetensors shards in `format` (subclasses: e.g. mixtral / qwen2_moe),
        atomically; an existing `path` needs force=True. `dtype` casts the floating-point weights."""
        format = self.resolve_format(format)
        dtype = dtype_from_name(dtype)
        tensors = dict(self.checkpoint_tensors(format))
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        stored = next(t.dtype for t in tensors.values() if t.is_floating_point())
        with AtomicDir(path, force) as tmp:
            write_json(os.path.join(tmp, "config.json"), self.checkpoint_config(stored, format))
            save_state_dict(tmp, tensors, max_shard_size)


Read = Callable[[slice | None], torch.Tensor]  # one tensor of a checkpoint (rows: of its first dimension), as stored


def matching_plan(model: nn.Module, reader: CheckpointReader,
                  rename: Callable[[str], str] = lambda n: n) -> dict[str, Read]:
    """{name: its reader} of every tensor `model` expects (under `rename(name)` on disk), the names and shapes
    checked and extras refused before anything is read."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    wanted = {rename(k): k for k in expected}
    for name in reader.names():
        if name not in wanted and not name.endswith("rotary_emb.inv_freq") and not (tied and name == "lm_head.weight"):
            raise CheckpointError(f"{reader.path}: unexpected tensor '{name}' for a {model.config.model_type} "
                                  f"model of this config")
    plan = {}
    for disk, name in wanted.items():
        if disk not in reader:
            raise CheckpointError(f"{reader.path}: tensor '{disk}' is missing")
        shape, want = reader.shape(disk), tuple(expected[name].shape)
        if shape != want:
            raise CheckpointError(f"{reader.path}: tensor '{disk}' has shape {list(shape)}, "
                                  f"expected {list(want)} from config.json")
        plan[name] = partial(reader.get, disk)
    return plan


def read_plan(plan: dict[str, Read], dtype=None) -> dict[str, torch.Tensor]:
    """Every tensor of `plan`, whole, floating-point ones cast to `dtype` (None: as stored)."""
    state = {}
    for name, read in plan.items():
        t = read(None)
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state
