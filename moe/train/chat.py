"""A checkpoint's chat template, rendered as transformers' `apply_chat_template(messages,
add_generation_prompt=True)` renders it, without transformers.

The template is the checkpoint's chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a
list of {name, template} of which the one named "default" is used). It runs in jinja2's immutable sandbox (a
template from the hub is untrusted code) with what transformers gives it: `raise_exception`, a `tojson` filter that
does not escape HTML, `strftime_now`, loop controls, and the variables `messages`, `add_generation_prompt`, `tools`,
`documents` and the tokenizer's special-token texts (`bos_token`, `eos_token`, ...). The rendered text writes its
own special tokens: it is tokenised without adding any.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime

from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import inside, read_bytes, read_side_json

TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")  # where a template is looked for, first wins
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")  # ChatML, Llama 3, Gemma
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class ChatTemplate:
    source: str  # the file the template came from
    text: str
    tokens: dict[str, str]  # special-token texts from tokenizer_config.json: bos_token, eos_token, ...

    def render(self, prompt: str, system: str | None = None) -> str:
        """The conversation [system,] user `prompt`, up to the start of the assistant's reply."""
        import jinja2

        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return compile_template(self.text).render(messages=messages, add_generation_prompt=True, tools=None,
                                                      documents=None, **self.tokens)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{self.source}: the chat template is not valid jinja (line {e.lineno}: "
                              f"{shown(e.message)})") from None
        except Exception as e:  # an untrusted template may raise anything: raise_exception, a type error, ...
            raise ConfigError(f"{self.source}: the chat template failed on this conversation: "
                              f"{type(e).__name__}: {shown(str(e))}") from None


@functools.lru_cache(maxsize=4)
def compile_template(text: str):
    """`text` compiled in the sandbox transformers uses (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(text)


def load_chat_template(directory: str) -> ChatTemplate | None:
    """The checkpoint `directory`'s chat template (its files read through `inside`), or None when it has none."""
    config = read_side_json(directory, "tokenizer_config.json") or {}
    tokens = {k: token_text(config[k]) for k in SPECIAL_TOKENS if token_text(config.get(k))}
    path = os.path.join(directory, TEMPLATE_FILES[0])
    if os.path.lexists(path):
        data = read_bytes(inside(directory, TEMPLATE_FILES[0], TEMPLATE_FILES[0]), "chat template")
        try:
            return ChatTemplate(path, data.decode("utf-8"), tokens)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a jinja chat template") from None
    template, source = config.get("chat_template"), os.path.join(directory, TEMPLATE_FILES[1])
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{source}: chat_template holds templates named {shown(sorted(map(str, named)))} "
                              "and none named 'default'; expected one to use")
        template = named["default"]
    if template is None:
        return None
    if not isinstance(template, str):
        raise ConfigError(f"{source}: chat_template must be a string or a list of {{name, template}}, got "
                          f"{shown(template)}")
    return ChatTemplate(source, template, tokens)


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json holds it (a string, or an AddedToken's {"content": ...})."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def stop_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """The ids that end the model's turn: the tokenizer's EOS (tokenizer_config.json's eos_token, and the id
    the model's config names) and the special tokens <|im_end|>, <|eot_id|>, <end_of_turn> where it has them."""
    added = tokenizer.tok.get_added_tokens_decoder() if hasattr(tokenizer, "tok") else {}  # none for bytes
    special = {t.content: i for i, t in added.items() if t.special}
    ids = [tokenizer.eos_id, special.get(template.tokens.get("eos_token")), *map(special.get, END_OF_TURN)]
    return sorted({i for i in ids if i is not None})
