"""Tokenizers for training data: a checkpoint's own `tokenizer.json` (read with the `tokenizers` library, no
transformers needed), another one, or raw bytes.

Documents are joined following the tokenizer's convention: a tokenizer whose post-processor starts a sequence
with BOS (Llama) gets BOS before each document; otherwise EOS goes after each one (GPT-2 style); a tokenizer
with neither gets a newline between documents.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moekit.llama.checkpoint import read_tokenizer
from moekit.llama.errors import ConfigError
from moekit.llama.io import file_sha256, inside, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-to-character table: the symbol of each byte value in a byte-level tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(rest)}}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no files needed; the model's vocabulary must hold 256 ids. Saved as a
    byte-level `tokenizer.json` (id = byte value), so a byte-level model's output is complete too."""

    name, fingerprint, convention = "bytes", "bytes", "concatenated"
    vocab_size = num_ids = 256  # ids are 0..num_ids-1
    bos_id = eos_id = None

    def __init__(self, directory: str | None = None):
        self.directory = directory  # where its tokenizer.json came from, if it did

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode(), np.uint8) for t in texts]  # no Python int per byte

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def save(self, directory: str) -> None:
        """tokenizer.json (the `tokenizers` library: ByteLevel without merges) and a tokenizer_config.json that
        transformers' AutoTokenizer reads."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab=_byte_symbols(), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`); BOS / EOS ids from the model's config, else the
    tokenizer's config, else the usual token names."""

    def __init__(self, path: str, model_config: dict | None = None):
        self.path = path
        self.directory = os.path.dirname(path)
        self.name = path
        self.tok = read_tokenizer(path)
        self.fingerprint = file_sha256(path)
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

    def is_bytes(self) -> bool:
        """A byte-level tokenizer.json without merges or special tokens (as `ByteTokenizer.save` writes)."""
        return self.tok.get_vocab(with_added_tokens=True) == _byte_symbols()

    def _special(self, kind: str, model_config: dict | None, names: tuple[str, ...]) -> int | None:
        """The id of a special token of the tokenizer (an added one, not a piece of text)."""
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        ids = (model_config or {}).get(f"{kind}_token_id")
        ids = ids[0] if isinstance(ids, list) and ids else ids
        if ids in special:
            return ids
        cfg_path = os.path.join(self.directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            token = read_json(cfg_path, "tokenizer_config.json").get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tok.token_to_id(token) in special:
                return self.tok.token_to_id(token)
        return next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) in special), None)

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
        tok = HFTokenizer(inside(model_dir, "tokenizer.json", "file"), model_config)
    else:
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise ConfigError(f"--tokenizer {spec}: no tokenizer.json there; expected a tokenizer.json, a directory "
                              "holding one, or 'bytes'")
        tok = HFTokenizer(os.path.abspath(path), model_config)
    return ByteTokenizer(tok.directory) if tok.is_bytes() else tok


def check_fits(tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can produce must index the model's embedding."""
    if tokenizer.num_ids > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name} has ids up to {tokenizer.num_ids - 1}; the model's "
                          f"vocab_size is {vocab_size} (ids 0..{vocab_size - 1}): use the model's own tokenizer")


def train_tokenizer(data: str, out: str, vocab_size: int = 4096, text_field: str = "text", force: bool = False,
                    progress: bool = True) -> str:
    """A byte-level BPE tokenizer of `vocab_size` ids trained on `data` (any --data source with text) with the
    `tokenizers` library, written atomically to `out`: tokenizer.json and a tokenizer_config.json that
    transformers reads. Its one special token, <|endoftext|>, ends each document (GPT-2's convention)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moekit.llama.io import AtomicDir, check_output

    from .data import Documents

    check_output(out, force, "--out", [("DATA", data)])  # before the training: fail fast
    docs = Documents(data, text_field)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs.texts(), trainer)
    with AtomicDir(out, force, [("DATA", data)], "--out") as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                       "eos_token": "<|endoftext|>", "model_max_length": 1_000_000}, f, indent=2)
    return f"trained a {tok.get_vocab_size()}-token byte-level BPE tokenizer on {docs.description}; wrote {out}"
