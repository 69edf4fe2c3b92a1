"""Completions from a trained checkpoint with its own tokenizer (`moekit generate`): what a model writes after a
prompt, the quickest look at what training did.

A checkpoint with a chat template (moe.train.chat) gets each prompt as a user message (after a `system` one if
given) through that template, and its reply ends at the end-of-turn token; the template is the default where it
opens the model's turn (a template that only closes a document, ending the rendered text with a stop token, is
used only when asked). Without it, the prompt is continued as raw text and generation stops at the EOS token.

Every prompt is checked before any is generated: it must encode to at least one token (an empty prompt is
continued from the BOS token where the tokenizer starts sequences with one, and refused otherwise) and leave room
in the model's context (max_position_embeddings). Bytes that are not UTF-8 come out as U+FFFD replacement
characters, in prompts (undecodable command-line bytes) and in completions alike; `for_terminal` is how a prompt
or completion is printed (a tokenizer's vocabulary may hold terminal escape sequences).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moekit.llama.errors import ConfigError, shown

from .chat import TEMPLATE_FILES, ChatTemplate, load_chat_template, stop_ids
from .source import load_model
from .tokenizer import load_tokenizer

_SURROGATES = re.compile("[\ud800-\udfff]")  # how Python holds bytes of the command line that are not UTF-8


@dataclass
class Completion:
    text: str  # what the model wrote, without the stop token
    ids: list[int]  # its token ids
    chat: bool  # the prompt went through the chat template
    ended_turn_at_once: bool  # the first token generated was a stop token: the text is empty


def complete(model_dir: str, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, **kw) -> list[str]:
    """The text each prompt is continued with (greedy at temperature 0); `kw` as `completions` takes them."""
    return [c.text for c in completions(model_dir, prompts, max_new_tokens, temperature, top_k, seed, **kw)]


def completions(model_dir: str, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.0,
                top_k: int | None = None, seed: int = 0, *, chat: bool | None = None, system: str | None = None,
                top_p: float = 1.0, repetition_penalty: float = 1.0) -> list[Completion]:
    """Each prompt's completion: greedy at temperature 0, else sampled (top-k, top-p) with `seed`.
    chat: True applies the checkpoint's chat template, False feeds raw text, None (the default) applies it where
    the checkpoint has one that opens the model's turn; `system` needs a template."""
    source = load_model(model_dir)
    tokenizer = load_tokenizer(None, source.directory, source.config)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: no tokenizer.json; moekit generate needs the checkpoint's tokenizer")
    template = chat_template(source.directory, tokenizer, chat, system)
    stop = stop_ids(tokenizer, template) if template else [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    model = source.model.eval()
    limit = model.config.max_position_embeddings
    encoded = [prompt_ids(tokenizer, prompt, limit, template, system) for prompt in prompts]
    out = []
    for ids in encoded:
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=min(max_new_tokens, limit - len(ids)),
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                                 repetition_penalty=repetition_penalty,
                                 generator=torch.Generator().manual_seed(seed))[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in stop), len(new))  # the stop token is not shown
        out.append(Completion(_SURROGATES.sub("\ufffd", tokenizer.decode(new[:end])), new[:end], template is not None,
                              end == 0 < len(new)))
    return out


def chat_template(directory: str, tokenizer, chat: bool | None, system: str | None) -> ChatTemplate | None:
    """The template prompts go through, or None for raw text (see the module docstring): `chat` True (or a
    `system` message) needs one; None takes the checkpoint's where it opens the model's turn."""
    template = load_chat_template(directory) if chat is not False else None
    if template is None and (chat or system is not None):
        flag = "--chat" if chat else "--system"
        raise ConfigError(f"{directory}: {flag} needs a chat template, and the checkpoint has none (looked for "
                          f"{TEMPLATE_FILES[0]} and {TEMPLATE_FILES[1]}'s chat_template); drop {flag}")
    if chat is None and system is None and template is not None:
        last = tokenizer.encode(template.render("hi"))[-1:]
        if last and last[0] in stop_ids(tokenizer, template):  # it closes the text instead of opening a turn
            return None
    return template


def prompt_ids(tokenizer, prompt: str, limit: int, template: ChatTemplate | None = None,
               system: str | None = None) -> list[int]:
    """The ids generation starts from: the prompt's (after the BOS token where the tokenizer starts sequences
    with one), or the chat `template`'s rendering of it (the template writes its own special tokens), at least
    one and fewer than the model's `limit` positions."""
    if template is not None:
        clean = lambda text: None if text is None else _SURROGATES.sub("\ufffd", text)
        ids = tokenizer.encode(template.render(clean(prompt), clean(system)))
    else:
        ids = tokenizer.encode(_SURROGATES.sub("\ufffd", prompt))
        if getattr(tokenizer, "convention", None) == "bos":
            ids = [tokenizer.bos_id, *ids]
    if not ids:
        raise ConfigError(f"prompt {shown(prompt)} encodes to no token, and the tokenizer has no BOS token to start "
                          "from; give a prompt with some text")
    if len(ids) >= limit:
        raise ConfigError(f"prompt {shown(prompt, 40)} is {len(ids):,} tokens"
                          f"{' through the chat template' if template else ''}; the model's context "
                          f"(max_position_embeddings) is {limit:,} tokens, and generation needs room after the prompt")
    return ids


def for_terminal(text: str) -> str:
    """`text` as a terminal may show it: lines and tabs kept, every other control character escaped (\\x1b...),
    bytes that were not UTF-8 as U+FFFD."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else repr(ch)[1:-1]
                   for ch in _SURROGATES.sub("\ufffd", text))
