"""A Llama, Mixtral or Qwen2-MoE checkpoint directory run layer by layer from disk, in fp32 (`StreamedCheckpoint`).

Weights are read as they are needed: one layer's attention at a time, one expert at a time (only experts some
token was routed to), linear maps in fp32 chunks of output rows, so memory stays near one tensor of the model. The
MoE feed-forward is written out here from the HF formats' definition (softmax in fp32, top-k, renormalised if
norm_topk_prob, shared expert scaled by sigmoid(x . w)), independently of `moekit.moe.layer`. `verify` compares
checkpoints with it; `routers` reads the hidden states of prompts through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moekit.llama.checkpoint import CheckpointReader
from moekit.llama.config import LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.model import DecoderLayer
from moekit.llama.rope import RotaryEmbedding
from moekit.moe import formats
from moekit.moe.config import MoEConfig

ROWS = 1 << 22  # elements of a weight converted to fp32 at a time


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] fp32 @ w [out, in]^T in fp32, converting w a block of rows at a time -> [T, out]."""
    rows = max(1, ROWS // max(w.shape[1], 1))
    return torch.cat([x @ w[a:a + rows].float().T for a in range(0, w.shape[0], rows)], dim=1)


class StreamedCheckpoint:
    """A Llama, Mixtral or Qwen2-MoE checkpoint directory, run layer by layer in fp32 from disk (weights first
    rounded to `round_to` if given: the dense model as it would be stored in an upcycled model's dtype; before
    that, the tensors whose names end with NAME.weight multiplied by `scales`[NAME], in their own dtype)."""

    def __init__(self, path: str | os.PathLike, round_to: torch.dtype | None = None,
                 scales: dict[str, float] | None = None):
        self.source, self.round_to, self.scales = CheckpointReader(path), round_to, scales or {}
        d, name = self.source.config, os.path.join(self.source.path, "config.json")
        self.format = d.get("model_type")
        if self.format == "llama":
            self.config = LlamaConfig.from_dict(d, source=name)
        elif self.format in formats.FORMATS:
            self.config = MoEConfig.from_dict(d, source=name)
        else:
            raise ConfigError(f"{name}: model_type '{self.format}' cannot be verified; expected llama, "
                              f"{' or '.join(formats.FORMATS)}")

    def get(self, name: str) -> torch.Tensor:
        t = self.source.get(name)
        factor = self.scales.get(name.rpartition(".")[0].rpartition(".")[2], 1.0)
        t = t * factor if factor != 1.0 else t
        return t.to(self.round_to) if self.round_to is not None and t.is_floating_point() else t

    def is_moe(self, i: int) -> bool:
        return isinstance(self.config, MoEConfig) and self.config.is_moe_layer(i)

    def mlp(self, x: torch.Tensor, names: dict[str, str]) -> torch.Tensor:
        """down(silu(gate x) * up x) from disk, x [T, H] -> [T, H]."""
        h = F.silu(linear(x, self.get(names["gate"]))) * linear(x, self.get(names["up"]))
        return linear(h, self.get(names["down"]))

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's feed-forward, x [T, H] fp32 -> [T, H]."""
        if not self.is_moe(i):
            return self.mlp(x, formats.dense_mlp_names(i))
        cfg, fmt = self.config, self.format
        logits = linear(x, self.get(formats.router_name(fmt, i)))  # [T, E]
        scores = logits.softmax(-1) if cfg.router_score == "softmax" else logits.sigmoid()
        weights, ids = torch.topk(scores, cfg.num_experts_per_tok, dim=-1)  # [T, k]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(cfg.num_local_experts):
            token, slot = torch.where(ids == e)
            if token.numel():
                # a token picks an expert at most once, so `token` has no repeats
                y[token] += weights[token, slot, None] * self.mlp(x[token], formats.expert_names(fmt, i, e))
        if cfg.has_shared_expert:
            names = formats.shared_expert_names(fmt, i)
            shared = self.mlp(x, names)
            if cfg.shared_expert_gate:
                shared = torch.sigmoid(linear(x, self.get(names["shared_gate"]))) * shared
            y = y + shared
        return y

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i with its attention and norms loaded (fp32) and this checkpoint's FFN."""
        with torch.device("meta"):
            layer = DecoderLayer(self.config, i, _FFN(self, i))
        prefix = f"model.layers.{i}."
        state = {k[len(prefix):]: self.get(k).float() for k in self.source.names()
                 if k.startswith(prefix) and not any(p in k for p in (".mlp.", ".block_sparse_moe.", "rotary_emb"))}
        expected = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        for k in sorted(set(expected) | set(state)):
            got = tuple(state[k].shape) if k in state else None
            if got != expected.get(k):
                want = f"shape {list(expected[k])} from config.json" if k in expected else "no such tensor"
                have = f"has shape {list(got)}" if got is not None else "is missing"
                raise CheckpointError(f"{self.source.path}: tensor '{prefix}{k}' {have}; expected {want}")
        layer.load_state_dict(state, strict=True, assign=True)
        return layer

    @torch.no_grad()
    def run(self, ids: torch.Tensor, tap: Callable[[int, torch.Tensor], None] | None = None, layers: int | None = None,
            progress: bool = False, on_layer: Callable[[int, torch.Tensor, DecoderLayer], None] | None = None
            ) -> torch.Tensor:
        """ids [B, T] -> the output of the first `layers` layers (all by default) [B, T, H] fp32. `tap(i, x)` sees
        layer i's FFN input x [B, T, H] (after its post-attention norm: what its router reads); `on_layer(i, x,
        layer)` the residual stream entering layer i, and the loaded layer. Right padding is harmless: attention is
        causal, so no position sees a later one."""
        cfg = self.config
        x = self.get("model.embed_tokens.weight")[ids].float()  # [B, T, H]
        cos, sin = RotaryEmbedding(cfg)(torch.arange(ids.shape[1])[None], torch.float32)  # [1, T, D]
        n = cfg.num_hidden_layers if layers is None else layers
        for i in tqdm(range(n), desc=f"run {self.format}", disable=not progress, leave=False):
            layer = self.layer(i)
            if tap is not None:
                layer.mlp.register_forward_pre_hook(lambda module, args, i=i: tap(i, args[0]))
            if on_layer is not None:
                on_layer(i, x, layer)
            x, _ = layer(x, cos, sin)
        return x

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """ids [1, T] -> logits [1, T, V] fp32."""
        cfg = self.config
        x = self.run(ids, progress=progress)  # [1, T, H]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * self.get("model.norm.weight").float()
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return linear(x[0], self.get(head))[None]  # [1, T, V]

    def close(self) -> None:
        self.source.close()


class _FFN(nn.Module):
    def __init__(self, checkpoint: StreamedCheckpoint, i: int):
        super().__init__()
        self.checkpoint, self.i = checkpoint, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.ffn(self.i, x.reshape(-1, x.shape[-1])).view(x.shape)
