"""Completions from a trained checkpoint with its own tokenizer (`moekit generate`): what a model writes after a
prompt, the quickest look at what training did."""

from __future__ import annotations

import torch

from moekit.llama.errors import ConfigError

from .source import load_model
from .tokenizer import load_tokenizer


def complete(model_dir: str, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> list[str]:
    """The text each prompt is continued with (greedy at temperature 0; generation stops at the EOS token)."""
    source = load_model(model_dir)
    tokenizer = load_tokenizer(None, source.directory, source.config)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: no tokenizer.json; moekit generate needs the checkpoint's tokenizer")
    model = source.model.eval()
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
    limit = model.config.max_position_embeddings
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        if getattr(tokenizer, "convention", None) == "bos":
            ids = [tokenizer.bos_id, *ids]
        n = min(max_new_tokens, limit - len(ids))
        if n < 1:
            raise ConfigError(f"prompt of {len(ids)} tokens leaves no room in the model's {limit} positions")
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=n, temperature=temperature, top_k=top_k,
                                 stop_tokens=stop, generator=torch.Generator().manual_seed(seed))[0, len(ids):]
        new = new.tolist()
        out.append(tokenizer.decode([i for i in new if i != tokenizer.eos_id]))
    return out
