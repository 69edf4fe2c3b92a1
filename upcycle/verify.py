"""`moekit verify`: run two checkpoints on the same tokens and compare their logits (`verify_checkpoints`), or
check each expert of an MoE merged from donors against its donor's FFN (`verify_merged`). Both run the checkpoints
layer by layer from disk (`streamed.StreamedCheckpoint`), so memory stays near one tensor of the model and the
check runs wherever the upcycler ran.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from moekit.llama.errors import ConfigError, MoekitError
from moekit.moe import formats
from moekit.moe.config import MoEConfig

from .options import UpcycleOptions
from .record import recorded_options
from .routers import routing_shares
from .streamed import StreamedCheckpoint

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
                       tokens: int = 32, seed: int = 0, progress: bool = False,
                       residual: dict | None = None) -> list[float]:
    """Run the MoE on `tokens` random tokens; at each MoE layer l, evaluate every expert j on all the tokens' FFN
    inputs and compare with layer l's FFN of donor j // c (rounded to the expert's dtype; its down_proj first
    times `residual`[donor position or 'shared'] where given, as the merge wrote it): max |difference| per expert
    (the shared expert, against `shared_donor`, last)."""
    m = StreamedCheckpoint(moe)
    readers: dict[str, StreamedCheckpoint] = {}
    try:
        if not isinstance(m.config, MoEConfig):
            raise ConfigError(f"{m.source.path}: model_type '{m.format}' is not an MoE")
        E, fmt = m.config.num_local_experts, m.format
        copies = E // len(donors)
        first = next(i for i in range(m.config.num_hidden_layers) if m.is_moe(i))
        dtype = m.source.dtype(formats.expert_names(fmt, first, 0)["gate"])
        residual = residual or {}
        keys = [*range(len(donors)), *(["shared"] if shared_donor else [])]
        paths = [*donors, *([shared_donor] if shared_donor else [])]
        for key, path in zip(keys, paths):  # one reader per (donor, residual scale)
            r = residual.get(key, 1.0)
            if (path, r) not in readers:
                readers[path, r] = StreamedCheckpoint(path, dtype, {"down_proj": r} if r != 1.0 else None)
        source = {key: readers[path, residual.get(key, 1.0)] for key, path in zip(keys, paths)}
        worst = [0.0] * (E + bool(shared_donor))

        def tap(i: int, x: torch.Tensor) -> None:
            if not m.is_moe(i):
                return
            x, dense = x.reshape(-1, x.shape[-1]), formats.dense_mlp_names(i)  # [T, H]
            want = {d: source[d].mlp(x, dense) for d in range(len(donors))}  # each donor's FFN once, not per copy
            for j in range(E):
                got = m.mlp(x, formats.expert_names(fmt, i, j))
                worst[j] = max(worst[j], (got - want[j // copies]).abs().max().item())
            if shared_donor:
                names = formats.shared_expert_names(fmt, i)
                half = not m.get(names["shared_gate"]).any()  # a zero gate: sigmoid = 1/2, so down was doubled
                got = m.mlp(x, names) / (2.0 if half else 1.0)
                worst[-1] = max(worst[-1], (got - source["shared"].mlp(x, dense)).abs().max().item())

        ids = torch.randint(0, m.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
        m.run(ids, tap, progress=progress)
    finally:
        m.close()
        for r in readers.values():
            r.close()
    return worst


def check_merged(moe: str | os.PathLike, options: UpcycleOptions, tokens: int = 32, atol: float | None = None, seed: int = 0,
                 progress: bool = False) -> ExpertsResult:
    """The expert check (`expert_differences`) and, with prompts, the share of each donor's positive prompts whose
    tokens the MoE sends first to that donor's experts (`upcycle.routers.routing_shares`)."""
    atol = EXPERT_ATOL if atol is None else atol
    per = expert_differences(moe, options.donors, options.shared_donor, tokens, seed, progress,
                             options.per_donor("residual_scale"))
    routing = routing_shares(str(moe), options, progress)
    return ExpertsResult(max(per), per, tokens, atol, max(per) <= atol, routing, round(1 / len(options.donors), 4))


def verify_merged(moe: str | os.PathLike, tokens: int = 32, atol: float | None = None, seed: int = 0,
                  progress: bool = False) -> ExpertsResult:
    """`check_merged` of an MoE directory merged from donors, with the donors and prompts of its upcycling.json."""
    options = recorded_options(moe)
    if options is None or not options.donors:
        raise ConfigError(f"{moe}: not merged from donors (its upcycling.json lists none); compare it with its dense "
                          "source: moekit verify DENSE MOE")
    return check_merged(moe, options, tokens, atol, seed, progress)
