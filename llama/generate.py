"""Token generation: prefill once, then one-token decode steps against the KV cache."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]: greedy at temperature 0, else sampled after top-k / top-p filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def penalize(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: logits [B, V] of every id in tokens [B, T] divided
    by `penalty` where positive, multiplied by it where not."""
    seen = logits.gather(-1, tokens)  # [B, T]
    return logits.scatter(-1, tokens, torch.where(seen > 0, seen / penalty, seen * penalty))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=None, use_cache: bool = True,
             generator: torch.Generator | None = None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """input_ids [B, S] -> [B, S + n], n <= max_new_tokens. A row that emitted a stop token is padded with
    the config's pad_token_id (else that stop token) until every row has stopped. repetition_penalty > 1
    penalizes each id already in the row, prompt included (`penalize`), before sampling."""
    B, S = input_ids.shape
    stop = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=input_ids.device)
    pad = model.config.pad_token_id
    cache = model.new_cache(B, S + max_new_tokens) if use_cache else None
    tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = model(input_ids, cache=cache).logits[:, -1]  # prefill: [B, V]
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = penalize(logits, tokens, repetition_penalty)
        nxt = sample(logits, temperature, top_k, top_p, generator)  # [B]
        if len(stop):
            nxt = torch.where(done, pad if pad is not None else stop[0], nxt)
            done = done | torch.isin(nxt, stop)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if step == max_new_tokens - 1 or (len(stop) and bool(done.all())):
            break
        logits = model(nxt[:, None] if use_cache else tokens, cache=cache).logits[:, -1]
    return tokens
