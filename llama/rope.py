"""Rotary position embeddings: default, linear and Meta's ``llama3`` frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, with the config's rope_scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    kind, rs = config.rope_type, config.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset(self, device=None) -> None:
        """Recompute the frequencies (after building the model on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config, device=device)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, S, head_dim], computed in fp32 and cast to `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] (halves of the last dimension)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, S, D], cos/sin [B, S, D] -> x * cos + rotate_half(x) * sin, as transformers writes it."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same in fewer passes over x: rotate_half(x) * sin = roll(x, D/2) * [-sin1, sin2] (sin's halves
    sin1, sin2), so one roll and one multiply-add replace chunk, neg, cat, mul and add (and their backward)."""
    half = x.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # [B, S, D], small
    return torch.addcmul(x * cos[:, None], torch.roll(x, half, dims=-1), signed_sin[:, None])
