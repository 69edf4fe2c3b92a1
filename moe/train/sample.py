"""Completions from a trained checkpoint with its own tokenizer (`moekit generate`): what a model writes after a
prompt, the quickest look at what training did.

Every prompt is checked before any is generated: it must encode to at least one token (an empty prompt is
continued from the BOS token where the tokenizer starts sequences with one, and refused otherwise) and leave room
in the model's context (max_position_embeddings). Bytes that are not UTF-8 come out as U+FFFD replacement
characters, in prompts (undecodable command-line bytes) and in completions alike; `for_terminal` is how a prompt
or completion is printed (a tokenizer's vocabulary may hold terminal escape sequences).
"""

from __future__ import annotations

import re

import torch

from moekit.llama.errors import ConfigError, shown

from .source import load_model
from .tokenizer import load_tokenizer

_SURROGATES = re.compile("[\ud800-\udfff]")  # how Python holds bytes of the command line that are not UTF-8


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
    encoded = [prompt_ids(tokenizer, prompt, limit) for prompt in prompts]
    out = []
    for ids in encoded:
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=min(max_new_tokens, limit - len(ids)),
                                 temperature=temperature, top_k=top_k, stop_tokens=stop,
                                 generator=torch.Generator().manual_seed(seed))[0, len(ids):]
        out.append(_SURROGATES.sub("\ufffd", tokenizer.decode([i for i in new.tolist() if i != tokenizer.eos_id])))
    return out


def prompt_ids(tokenizer, prompt: str, limit: int) -> list[int]:
    """The ids generation starts from: the prompt's (after the BOS token where the tokenizer starts sequences
    with one), at least one and fewer than the model's `limit` positions."""
    ids = tokenizer.encode(_SURROGATES.sub("\ufffd", prompt))
    if getattr(tokenizer, "convention", None) == "bos":
        ids = [tokenizer.bos_id, *ids]
    if not ids:
        raise ConfigError(f"prompt {shown(prompt)} encodes to no token, and the tokenizer has no BOS token to start "
                          "from; give a prompt with some text")
    if len(ids) >= limit:
        raise ConfigError(f"prompt {shown(prompt, 40)} is {len(ids):,} tokens; the model's context "
                          f"(max_position_embeddings) is {limit:,} tokens, and generation needs room after the prompt")
    return ids


def for_terminal(text: str) -> str:
    """`text` as a terminal may show it: lines and tabs kept, every other control character escaped (\\x1b...),
    bytes that were not UTF-8 as U+FFFD."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else repr(ch)[1:-1]
                   for ch in _SURROGATES.sub("\ufffd", text))
