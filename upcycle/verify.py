"""`moekit verify DENSE MOE`: run two checkpoints on the same tokens and compare their logits, streaming.

Each checkpoint runs layer by layer with weights read from disk as they are needed: one layer's attention at a
time, one expert at a time (only experts some token was routed to), linear maps in fp32 chunks of output rows.
Memory stays near one tensor of the model, so the check runs wherever the upcycler ran. The MoE feed-forward is
written out here from the HF formats' definition (softmax in fp32, top-k, renormalised if norm_topk_prob,
shared expert scaled by sigmoid(x . w)), independently of `moe.layer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llama.checkpoint import CheckpointReader
from llama.config import LlamaConfig
from llama.errors import CheckpointError, ConfigError, MoekitError
from llama.model import DecoderLayer
from llama.rope import RotaryEmbedding
from moe import formats
from moe.config import MoEConfig

ROWS = 1 << 22  # elements of a weight converted to fp32 at a time
LOGIT_ATOL, EXPERT_ATOL = 1e-4, 1e-5  # --atol: logits against the dense source; an expert against its donor's FFN


class VerifyError(MoekitError):
    """An upcycled checkpoint that should compute the dense function does not."""


@dataclass
class VerifyResult:
    max_abs: float  # max |logits_a - logits_b|
    max_rel: float  # max_abs / max |logits_a|
    tokens: int
    atol: float
    ok: bool

    def line(self) -> str:
        verdict = "OK" if self.ok else f"FAIL (above --atol {self.atol:g})"
        return (f"max |dlogit| {self.max_abs:.3g}, relative {self.max_rel:.3g} (of max |logit|) on "
                f"{self.tokens} tokens: {verdict}")

    def to_dict(self) -> dict:
        return asdict(self)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] fp32 @ w [out, in]^T in fp32, converting w a block of rows at a time -> [T, out]."""
    rows = max(1, ROWS // max(w.shape[1], 1))
    return torch.cat([x @ w[a:a + rows].float().T for a in range(0, w.shape[0], rows)], dim=1)


class StreamedCheckpoint:
    """A Llama, Mixtral or Qwen2-MoE checkpoint directory, run layer by layer in fp32 from disk (weights first
    rounded to `round_to` if given: the dense model as it would be stored in an upcycled model's dtype)."""

    def __init__(self, path: str | os.PathLike, round_to: torch.dtype | None = None):
        self.source, self.round_to = CheckpointReader(path), round_to
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
            progress: bool = False) -> torch.Tensor:
        """ids [B, T] -> the output of the first `layers` layers (all by default) [B, T, H] fp32. `tap(i, x)` sees
        layer i's FFN input x [B, T, H] (after its post-attention norm: what its router reads). Right padding is
        harmless: attention is causal, so no position sees a later one."""
        cfg = self.config
        x = self.get("model.embed_tokens.weight")[ids].float()  # [B, T, H]
        cos, sin = RotaryEmbedding(cfg)(torch.arange(ids.shape[1])[None], torch.float32)  # [1, T, D]
        n = cfg.num_hidden_layers if layers is None else layers
        for i in tqdm(range(n), desc=f"run {self.format}", disable=not progress, leave=False):
            layer = self.layer(i)
            if tap is not None:
                layer.mlp.register_forward_pre_hook(lambda module, args, i=i: tap(i, args[0]))
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


def verify_checkpoints(dense: str | os.PathLike, moe: str | os.PathLike, tokens: int = 32, atol: float = 1e-4,
                       seed: int = 0, progress: bool = False, dense_dtype: torch.dtype | None = None) -> VerifyResult:
    """Logits of two checkpoints (e.g. dense and upcycled) on the same `tokens` random token ids, compared
    (`dense_dtype`: round the first one's weights to that dtype, for an MoE written in a lower precision)."""
    a, b = StreamedCheckpoint(dense, dense_dtype), StreamedCheckpoint(moe)
    try:
        for f in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(a.config, f) != getattr(b.config, f):
                raise ConfigError(f"cannot compare {a.source.path} and {b.source.path}: {f} "
                                  f"{getattr(a.config, f)} != {getattr(b.config, f)}")
        ids = torch.randint(0, a.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
        la, lb = a.logits(ids, progress), b.logits(ids, progress)
    finally:
        a.close()
        b.close()
    max_abs = (la - lb).abs().max().item()
    max_rel = max_abs / max(la.abs().max().item(), 1e-30)
    return VerifyResult(max_abs, max_rel, tokens, atol, max_abs <= atol)


# ---- an MoE merged from donors ----------------------------------------------------------------------

@dataclass
class ExpertsResult:
    max_abs: float  # max over MoE layers, experts and tokens of |expert(x) - its donor's FFN(x)|
    per_expert: list[float]  # the same per expert (the shared expert last, if any)
    tokens: int
    atol: float
    ok: bool
    routing: dict[str, float]  # donor position -> share of its positive prompts' tokens sent first to its experts
    chance: float  # that share for a router blind to the prompts, on average: 1 / number of donors

    def line(self) -> str:
        verdict = "OK" if self.ok else f"FAIL (above --atol {self.atol:g})"
        line = (f"max |expert - donor FFN| {self.max_abs:.3g} over {len(self.per_expert)} experts on "
                f"{self.tokens} tokens: {verdict}")
        if self.routing:
            shares = ", ".join(f"{d}: {v:.0%}" for d, v in self.routing.items())
            line += f"; first choice on each donor's prompts: {shares} (chance {self.chance:.0%})"
        return line

    def to_dict(self) -> dict:
        return asdict(self)


def expert_differences(moe: str | os.PathLike, donors: list[str], shared_donor: str | None = None,
                       tokens: int = 32, seed: int = 0, progress: bool = False) -> list[float]:
    """Run the MoE on `tokens` random tokens; at each MoE layer l, evaluate every expert j on all the tokens' FFN
    inputs and compare with layer l's FFN of donor j // c (rounded to the expert's dtype): max |difference| per
    expert (the shared expert, against `shared_donor`, last)."""
    m = StreamedCheckpoint(moe)
    readers: dict[str, StreamedCheckpoint] = {}
    try:
        if not isinstance(m.config, MoEConfig):
            raise ConfigError(f"{m.source.path}: model_type '{m.format}' is not an MoE")
        E, fmt = m.config.num_local_experts, m.format
        copies = E // len(donors)
        first = next(i for i in range(m.config.num_hidden_layers) if m.is_moe(i))
        dtype = m.source.dtype(formats.expert_names(fmt, first, 0)["gate"])
        for path in dict.fromkeys([*donors, *([shared_donor] if shared_donor else [])]):
            readers[path] = StreamedCheckpoint(path, dtype)
        worst = [0.0] * (E + bool(shared_donor))

        def tap(i: int, x: torch.Tensor) -> None:
            if not m.is_moe(i):
                return
            x, dense = x.reshape(-1, x.shape[-1]), formats.dense_mlp_names(i)  # [T, H]
            want = {d: readers[d].mlp(x, dense) for d in dict.fromkeys(donors)}  # each donor's FFN once, not per copy
            for j in range(E):
                got = m.mlp(x, formats.expert_names(fmt, i, j))
                worst[j] = max(worst[j], (got - want[donors[j // copies]]).abs().max().item())
            if shared_donor:
                names = formats.shared_expert_names(fmt, i)
                half = not m.get(names["shared_gate"]).any()  # a zero gate: sigmoid = 1/2, so down was doubled
                got = m.mlp(x, names) / (2.0 if half else 1.0)
                worst[-1] = max(worst[-1], (got - readers[shared_donor].mlp(x, dense)).abs().max().item())

        ids = torch.randint(0, m.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
        m.run(ids, tap, progress=progress)
    finally:
        m.close()
        for r in readers.values():
            r.close()
    return worst


def check_merged(moe: str | os.PathLike, options, tokens: int = 32, atol: float | None = None, seed: int = 0,
                 progress: bool = False) -> ExpertsResult:
    """The expert check (`expert_differences`) and, with prompts, the share of each donor's positive prompts whose
    tokens the MoE sends first to that donor's experts (`upcycle.routers.routing_shares`)."""
    from .routers import routing_shares

    atol = EXPERT_ATOL if atol is None else atol
    per = expert_differences(moe, options.donors, options.shared_donor, tokens, seed, progress)
    routing = routing_shares(str(moe), options, progress)
    return ExpertsResult(max(per), per, tokens, atol, max(per) <= atol, routing, round(1 / len(options.donors), 4))


def verify_merged(moe: str | os.PathLike, tokens: int = 32, atol: float | None = None, seed: int = 0,
                  progress: bool = False) -> ExpertsResult:
    """`check_merged` of an MoE directory merged from donors, with the donors and prompts of its upcycling.json."""
    from .convert import read_record
    from .options import UpcycleOptions

    options = read_record(moe).get("options") or {}
    if not options.get("donors"):
        raise ConfigError(f"{moe}: not merged from donors (its upcycling.json lists none); compare it with its dense "
                          "source: moekit verify DENSE MOE")
    return check_merged(moe, UpcycleOptions(**{**options, "config": None}), tokens, atol, seed, progress)
