"""MoEForCausalLM: the llama core with an MoEFeedForward wherever the config places one.

B batch, S sequence, V vocabulary, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moekit.llama.checkpoint import CheckpointReader, dtype_name
from moekit.llama.model import MLP, KVCache, Llama, Read

from . import formats
from .config import MoEConfig
from .experts import SwiGLUExperts
from .layer import MoEFeedForward
from .losses import (
    RouterStats,
    load_balancing_loss,
    router_probs,
    router_z_losses,
    routing_stats,
    update_router_bias,
)
from .router import Router


@dataclass
class MoECausalLMOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when asked for the loss only (return_logits=False)
    loss: torch.Tensor | None = None  # lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # load-balancing loss (transformers' load_balancing_loss_func)
    z_loss: torch.Tensor | None = None
    router_stats: RouterStats | None = None


class MoEForCausalLM(Llama):
    """Causal LM whose MoE layers are `MoEFeedForward` and whose dense layers keep llama's MLP.

    Parameter names are transformers 5's (`model.layers.N.mlp.gate.weight`, `mlp.experts.gate_up_proj`, ...);
    checkpoints are read and written in HF's `mixtral` or `qwen2_moe` layout through `moe.formats`."""

    config_class = MoEConfig

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if self.config.is_moe_layer(layer_idx):
            return MoEFeedForward(self.config)
        return MLP(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SwiGLUExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.e_score_correction_bias)

    def forward(self, input_ids, attention_mask=None, labels=None, cache: KVCache | None = None,
                global_balance: bool = False, return_logits: bool = True) -> MoECausalLMOutput:
        """input_ids [B, S] (attention_mask [B, L] of 1/0, labels [B, S] with -100 ignored). `global_balance`:
        the load-balancing loss takes its token fractions over every data-parallel process's batch (all-reduced;
        a no-op in a single process). return_logits=False: the loss only, fused with the LM head (logits None)."""
        cfg = self.config
        h, aux = self.model(input_ids, attention_mask, cache)  # [B, S, H], per layer MoEAux or None
        logits, lm_loss = self.head(h, labels, return_logits)  # [B, S, V] or None
        routed = [a for a in aux if a is not None]
        aux_loss = z_loss = z_layers = None
        if routed:
            aux_loss = load_balancing_loss([router_probs(a, cfg.router_score) for a in routed],
                                           [a.expert_ids for a in routed], attention_mask,
                                           _all_reduce_sum if global_balance else None)
            z_layers = router_z_losses([a.logits for a in routed], attention_mask)  # [L_moe], also a statistic
            z_loss = z_layers.mean()
        loss = lm_loss
        if loss is not None and routed:
            if cfg.router_aux_loss_coef:
                loss = loss + cfg.router_aux_loss_coef * aux_loss
            if cfg.router_z_loss_coef:
                loss = loss + cfg.router_z_loss_coef * z_loss
        return MoECausalLMOutput(logits, loss, lm_loss, aux_loss, z_loss,
                                 routing_stats(aux, cfg.router_score, attention_mask, z_layers))

    def update_router_bias(self, counts_per_layer, rate: float | None = None) -> None:
        """Auxiliary-loss-free balancing step (see `moe.losses.update_router_bias`); call once per optimizer step."""
        update_router_bias(self, counts_per_layer, rate)

    # ---- checkpoints ------------------------------------------------------------------------------
    FORMATS = formats.FORMATS

    def resolve_format(self, format: str = "auto") -> str:
        """mixtral or qwen2_moe; `auto`: mixtral when it can express the config (see `moe.formats`)."""
        return formats.choose_format(self.config, format)

    def disk_pairs(self, state: dict[str, torch.Tensor], format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs of `state` as a `format` checkpoint stores them (experts one by one)."""
        return formats.to_disk(self.config, format, dict(super().disk_pairs(state)))

    def checkpoint_plan(self, reader: CheckpointReader) -> dict[str, Read]:
        tied = self.config.tie_word_embeddings
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items() if not (tied and k == "lm_head.weight")}
        return formats.disk_plan(reader, self.config, expected)

    def checkpoint_config(self, dtype: torch.dtype, format: str = "auto") -> dict:
        d = formats.hf_config_dict(self.config, self.resolve_format(format))
        d["torch_dtype"] = dtype_name(dtype)
        return d


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the default process group (no gradient flows through it); `t` itself when alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t
