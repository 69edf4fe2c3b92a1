"""Tokenizers for training data: a checkpoint's own `tokenizer.json` (read with the `tokenizers` library, no
transformers needed), another one, or raw bytes.

Documents are joined following the tokenizer's convention: a tokenizer whose post-processor starts a sequence
with BOS (Llama) gets BOS before each document; otherwise EOS goes after each one (GPT-2 style); a tokenizer
with neither gets a newline between documents.
"""

from __future__ import annotations

import hashlib
import os

from llama.checkpoint import resolve_inside
from llama.errors import ConfigError
from llama.io import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no files needed; the model's vocabulary must hold 256 ids."""

    name, fingerprint, directory = "bytes", "bytes", None
    vocab_size = num_ids = 256  # ids are 0..num_ids-1
    bos_id = eos_id = None
    convention = "concatenated"

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`); BOS / EOS ids from the model's config, else the
    tokenizer's config, else the usual token names."""

    def __init__(self, path: str, model_config: dict | None = None):
        from tokenizers import Tokenizer

        self.path = path
        self.directory = os.path.dirname(path)
        self.name = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises its own exception types for malformed files
            raise ConfigError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        with open(path, "rb") as f:
            self.fingerprint = hashlib.sha256(f.read()).hexdigest()
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        self.num_ids = max(vocab.values(), default=-1) + 1
        self.bos_id = self._special("bos", model_config, _BOS_NAMES)
        self.eos_id = self._special("eos", model_config, _EOS_NAMES)
        probe = self.tok.encode("a", add_special_tokens=True).ids
        if self.bos_id is not None and probe[:1] == [self.bos_id]:
            self.convention = "bos"
        elif self.eos_id is not None:
            self.convention = "eos"
        else:
            self.convention = "newline"

    def _special(self, kind: str, model_config: dict | None, names: tuple[str, ...]) -> int | None:
        ids = (model_config or {}).get(f"{kind}_token_id")
        ids = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(ids, int) and not isinstance(ids, bool) and self.tok.id_to_token(ids) is not None:
            return ids
        cfg_path = os.path.join(self.directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            token = read_json(cfg_path, "tokenizer_config.json").get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tok.token_to_id(token) is not None:
                return self.tok.token_to_id(token)
        return next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each document's ids with its separator (see the module docstring)."""
        encoded = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        if self.convention == "bos":
            return [[self.bos_id, *ids] for ids in encoded]
        if self.convention == "eos":
            return [[*ids, self.eos_id] for ids in encoded]
        newline = self.encode("\n")
        return [[*ids, *newline] for ids in encoded]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str | None, model_dir: str | None, model_config: dict | None = None):
    """`spec` ('bytes', a tokenizer.json, a directory holding one) or, when None, the checkpoint `model_dir`'s
    own tokenizer (None when it has none, and for presets: the caller decides whether bytes will do)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_dir is None or not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            return None
        return HFTokenizer(resolve_inside(model_dir, "tokenizer.json", "file"), model_config)
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(f"--tokenizer {spec}: no tokenizer.json there; expected a tokenizer.json, a directory "
                          "holding one, or 'bytes'")
    return HFTokenizer(os.path.abspath(path), model_config)


def check_fits(tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can produce must index the model's embedding."""
    if tokenizer.num_ids > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name} has ids up to {tokenizer.num_ids - 1}; the model's "
                          f"vocab_size is {vocab_size} (ids 0..{vocab_size - 1}): use the model's own tokenizer")
