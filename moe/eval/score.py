"""Held-out loss and bits per byte of checkpoints on text, with intervals (`moekit eval`).

Each model reads each data spec's documents (the sources `moekit train --data` reads) through its own tokenizer.
A document is scored as training sees it: after the separator that precedes a document in the training stream
(BOS where the tokenizer starts documents with one, else EOS, else a newline), every one of its tokens is
predicted once. A document longer than the model's window is scored with sliding windows: windows of at most
`max_length` tokens start every `stride` tokens, and each scores only the tokens the previous ones did not, so
every token has at least max_length - stride tokens of context (all it has, near the start).

Per (model, data): tokens scored, UTF-8 bytes of the text, mean loss in nats per token, perplexity, and bits per
byte = total nats / ln 2 / bytes, which does not depend on the tokenizer: models with different vocabularies
compare fairly. Each figure gets a 95% percentile bootstrap interval over documents (BOOTSTRAP resamples of the
documents, seeded), which holds as long as documents are independent; with one document there is none. Two models
on the same text are compared by the gap in bits per byte with its own paired interval (`paired_difference`):
the documents resampled together, so the gap's uncertainty is not that of either figure.

Memory: one batch of windows' activations, and the LM head's logits for CHUNK scored positions at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from moekit.llama.errors import ConfigError, shown

BOOTSTRAP = 1000  # resamples of the documents
CHUNK = 2048  # scored positions whose logits are formed at once: [CHUNK, V] fp32


@dataclass
class DataSpec:
    label: str
    spec: str


def parse_data(values: list[str]) -> list[DataSpec]:
    """'LABEL=SPEC' or 'SPEC' (labelled by its name) -> DataSpecs with distinct labels."""
    out: list[DataSpec] = []
    for value in values:
        label, sep, spec = value.partition("=")
        if not sep or not label or os.path.exists(value) or not all(c.isalnum() or c in "_.-" for c in label):
            label, spec = os.path.basename(value.rstrip("/")) or value, value
        if not spec:
            raise ConfigError(f"--data {shown(value)}: expected SPEC or LABEL=SPEC (a file, directory, .jsonl, "
                              "datasets directory or builtin:NAME)")
        if spec.endswith(".npy"):
            raise ConfigError(f"--data {shown(spec)}: token ids have no text, so no bytes to score; give the text")
        if any(d.label == label for d in out):
            raise ConfigError(f"--data: the label {shown(label)} is given twice; name them LABEL=SPEC")
        out.append(DataSpec(label, spec))
    return out


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over a sequence s of n tokens whose tokens 1..n-1 are scored: (a, b, first) with input s[a:b]
    (b - a <= max_length), targets s[a+1:b+1], of which those at index >= first are scored: each once."""
    out, a, scored = [], 0, 1
    while scored < n:
        b = min(a + max_length, n - 1)
        out.append((a, b, scored))
        scored, a = b + 1, a + stride
    return out


def resamples(n: int, seed: int) -> Iterator[np.ndarray]:
    """BOOTSTRAP resamples of n documents (with replacement), seeded: index arrays [<= 50, n], 50 resamples at a
    time."""
    rng = np.random.default_rng(seed)
    for start in range(0, BOOTSTRAP, 50):
        yield rng.integers(0, n, (min(50, BOOTSTRAP - start), n))


@dataclass
class DocumentScores:
    nats: list[float] = field(default_factory=list)  # per document: summed -log p of its tokens
    tokens: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    def summary(self, seed: int = 0) -> dict:
        """tokens, bytes, loss, perplexity, bits_per_byte, each figure with its _low and _high 95% bounds."""
        nats, tokens, nbytes = (np.asarray(v, dtype=np.float64) for v in (self.nats, self.tokens, self.bytes))
        T, N, Y = tokens.sum(), nats.sum(), nbytes.sum()
        out = {"documents": len(nats), "tokens": int(T), "bytes": int(Y), "loss": N / T,
               "perplexity": math.exp(N / T), "bits_per_byte": N / math.log(2) / Y}
        lo = hi = None
        if len(nats) > 1:
            loss, bpb = (np.concatenate(v) for v in zip(*(
                (nats[i].sum(1) / np.maximum(tokens[i].sum(1), 1),
                 nats[i].sum(1) / math.log(2) / np.maximum(nbytes[i].sum(1), 1)) for i in resamples(len(nats), seed))))
            lo = {"loss": np.percentile(loss, 2.5), "bits_per_byte": np.percentile(bpb, 2.5)}
            hi = {"loss": np.percentile(loss, 97.5), "bits_per_byte": np.percentile(bpb, 97.5)}
        for key in ("loss", "bits_per_byte"):
            out[f"{key}_low"] = float(lo[key]) if lo else None
            out[f"{key}_high"] = float(hi[key]) if hi else None
        out["perplexity_low"] = math.exp(out["loss_low"]) if lo else None
        out["perplexity_high"] = math.exp(out["loss_high"]) if hi else None
        return {k: float(v) if isinstance(v, np.floating) else v for k, v in out.items()}


def paired_difference(base: DocumentScores, other: DocumentScores, seed: int = 0) -> dict:
    """Bits per byte of `other` minus `base` on the same documents, with its 95% interval from resampling the
    documents together (paired: what both find hard cancels out, so the interval is that of the gap itself)."""
    a, b, nbytes = (np.asarray(v, dtype=np.float64) for v in (base.nats, other.nats, base.bytes))
    gap = (b.sum() - a.sum()) / math.log(2) / nbytes.sum()
    out = {"bits_per_byte_diff": float(gap), "bits_per_byte_diff_low": None, "bits_per_byte_diff_high": None}
    if len(a) > 1:
        gaps = np.concatenate([(b[i].sum(1) - a[i].sum(1)) / math.log(2) / np.maximum(nbytes[i].sum(1), 1)
                               for i in resamples(len(a), seed)])
        out.update(bits_per_byte_diff_low=float(np.percentile(gaps, 2.5)),
                   bits_per_byte_diff_high=float(np.percentile(gaps, 97.5)))
    return out


def separator(tokenizer) -> list[int]:
    """The ids that precede a document in the training stream (`moe.train.tokenizer`): BOS, else the token that ends
    the previous document, else a newline."""
    if getattr(tokenizer, "convention", None) == "bos":
        return [tokenizer.bos_id]
    if getattr(tokenizer, "separator_id", None) is not None:
        return [tokenizer.separator_id]
    return tokenizer.encode("\n")


class Scorer:
    """Scores documents with one model: `score(texts)` -> DocumentScores; with `on_routing`, calls
    on_routing(layer_number, expert_ids [N, k]) for the MoE layers' choices at the documents' own tokens (each
    scored input position but the separator: every token of a document once, but its last, which predicts
    nothing)."""

    def __init__(self, model, tokenizer, max_length: int, stride: int, batch_size: int = 8,
                 on_routing: Callable[[int, torch.Tensor], None] | None = None):
        if not 0 < stride <= max_length:
            raise ConfigError(f"--stride {stride} must be between 1 and the window, {max_length} tokens")
        self.model, self.tokenizer, self.max_length, self.stride = model, tokenizer, max_length, stride
        self.batch_size, self.on_routing = batch_size, on_routing
        self.head = model.lm_head.weight  # [V, H]
        self.prefix = separator(tokenizer)

    def score(self, texts: Iterator[str], progress: bool = False, desc: str = "eval") -> DocumentScores:
        scores, pending = DocumentScores(), []  # pending: (document, ids window [b - a + 1], a, first)
        bar = tqdm(desc=desc, unit="doc", disable=not progress, leave=False)
        for text in texts:
            d = len(scores.nats)
            ids = self.prefix + self.tokenizer.encode(text)
            scores.nats.append(0.0)
            scores.tokens.append(len(ids) - len(self.prefix))
            scores.bytes.append(len(text.encode("utf-8", "surrogatepass")))
            for a, b, first in windows(len(ids), self.max_length, self.stride):
                pending.append((d, ids[a:b + 1], a, first))
                if len(pending) == self.batch_size:
                    self._run(pending, scores)
                    pending = []
            bar.update(1)
        if pending:
            self._run(pending, scores)
        bar.close()
        return scores

    @torch.no_grad()
    def _run(self, batch: list, scores: DocumentScores) -> None:
        """One forward of a batch of windows (right-padded: attention is causal), their scored positions' nats
        added to their documents."""
        T = max(len(w) for _, w, _, _ in batch) - 1
        device = self.head.device
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.zeros(len(batch), T, dtype=torch.long)
        scored = torch.zeros(len(batch), T, dtype=torch.bool)  # [B, T]: input position p predicts a scored token
        own = torch.zeros(len(batch), T, dtype=torch.bool)  # [B, T]: ... and is a token of the document
        for i, (_, w, a, first) in enumerate(batch):
            w = torch.as_tensor(w, dtype=torch.long)
            ids[i, :len(w) - 1], targets[i, :len(w) - 1] = w[:-1], w[1:]
            scored[i, first - a - 1:len(w) - 1] = True
            own[i, max(first - a - 1, len(self.prefix) - a):len(w) - 1] = True
        h, aux = self.model.model(ids.to(device))  # [B, T, H], per layer routing or None
        rows, want = h[scored.to(device)], targets[scored].to(device)  # [N, H], [N]
        nats = torch.cat([torch.logsumexp(logits := (rows[c:c + CHUNK] @ self.head.T).float(), -1)
                          - logits.gather(1, want[c:c + CHUNK, None])[:, 0] for c in range(0, len(rows), CHUNK)])
        owner = torch.repeat_interleave(torch.tensor([d for d, _, _, _ in batch]), scored.sum(1))  # [N]
        docs, which = owner.unique(return_inverse=True)  # the batch's documents
        sums = torch.zeros(len(docs), dtype=torch.float64).index_add_(0, which, nats.double().cpu())
        for d, n in zip(docs.tolist(), sums.tolist()):
            scores.nats[d] += n
        if self.on_routing is not None:
            own = own.to(device)
            for number, a in enumerate(a for a in aux if a is not None):
                self.on_routing(number, a.expert_ids.view(len(batch), T, -1)[own])  # [N', k]
