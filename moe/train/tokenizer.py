"""Tokenizers for training data: a checkpoint's own `tokenizer.json` (read with the `tokenizers` library, no
transformers needed), another one, or raw bytes.

Documents are joined following the tokenizer's convention: a tokenizer whose post-processor starts a sequence
with BOS (Llama) gets BOS before each document; otherwise a document token goes after each one (GPT-2 style):
<|endoftext|> or <|end_of_text|> where the tokenizer has one as a special token, else its EOS. A chat checkpoint's
EOS is its end-of-turn token (SmolLM2-Instruct's <|im_end|>), which should end turns, not documents, so a document
token it also has wins. `set_separator` (`moekit train --doc-separator TOKEN`) chooses the token that follows every
document instead. A tokenizer with none of these gets a newline between documents.

The `tokenizers` library is never handed more than PIECE characters at once: a longer document (a 200 MB line)
is cut into pieces first (`pieces`), as its users do, just before whitespace that follows a letter or digit,
where GPT-2's and Llama 3's pre-tokenizers split anyway (so the ids are those of the whole); a document up to
PIECE characters is tokenised whole, as before.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import deque
from collections.abc import Iterator

import numpy as np

from moekit.llama.checkpoint import read_tokenizer
from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.io import file_sha256, inside, read_side_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_DOCUMENT_NAMES = ("<|endoftext|>", "<|end_of_text|>")  # tokens that end documents, not turns
PIECE = 1 << 20  # characters: the most text handed to the `tokenizers` library at once (~1.5 s of BPE)
BATCH_CHARS = 1 << 20  # characters encoded in one encode_batch call (bounds the library's Encoding objects)
_CUTS = (re.compile(r"(?<=[^\W_])(?=\s)"),  # before whitespace after a letter or digit: a pre-token boundary
         re.compile(r"(?<=\S)(?=\s)"))  # before any whitespace after a non-space character


def pieces(text: str, size: int | None = None) -> list[str]:
    """`text` as consecutive pieces of at most `size` (default PIECE) characters, joined back exactly: each cut
    at the last place in the second half of the piece that `_CUTS` finds (the first pattern first), else at
    `size`. A text up to `size` characters is one piece."""
    size = size or PIECE
    out, start = [], 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        cut = hi
        for pattern in _CUTS:
            last = deque(pattern.finditer(text, lo, hi), maxlen=1)  # the last match, found at C speed
            if last:
                cut = last[0].start()
                break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def write_tokenizer_files(write, out: str, what: str = "the tokenizer") -> None:
    """Run `write()` (which saves tokenizer files); a full disk or a read-only directory becomes one line naming
    `out`, the user's path (not the temporary one being written)."""
    try:
        write()
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write {what} ({e.strerror or e})") from e
    except Exception as e:  # the `tokenizers` library raises its own exception type for I/O errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{out}: cannot write {what} ({reason})") from e


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-to-character table: the symbol of each byte value in a byte-level tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(rest)}}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no files needed; the model's vocabulary must hold 256 ids. Saved as a
    byte-level `tokenizer.json` (id = byte value), so a byte-level model's output is complete too."""

    name, fingerprint, convention = "bytes", "bytes", "concatenated"
    key = "bytes|concatenated"
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

        def write():
            tok.save(os.path.join(directory, "tokenizer.json"))
            with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)

        write_tokenizer_files(write, directory)


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`); BOS / EOS ids from the model's config, else the
    tokenizer's config, else the usual token names."""

    def __init__(self, path: str, model_config: dict | None = None, file: str | None = None):
        """`path`: DIR/tokenizer.json, read through `inside` DIR (never a link out of it) unless `file` names what
        to read instead (a tokenizer.json the user named); DIR's tokenizer_config.json gives special tokens."""
        self.path = path
        self.directory = os.path.dirname(path)
        self.name = path
        file = file or inside(self.directory, os.path.basename(path), "file")
        if not stat.S_ISREG(os.stat(file).st_mode):  # a FIFO or device would block or never end
            raise ConfigError(f"{path}: not a regular file (a FIFO, socket or device); expected a tokenizer.json")
        self.tok = read_tokenizer(file)
        self.fingerprint = file_sha256(file)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        self.num_ids = max(vocab.values(), default=-1) + 1
        self.bos_id = self._special("bos", model_config, _BOS_NAMES)
        self.eos_id = self._special("eos", model_config, _EOS_NAMES)
        probe = self.tok.encode("a", add_special_tokens=True).ids
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.separator_id = next((self.tok.token_to_id(n) for n in _DOCUMENT_NAMES
                                  if self.tok.token_to_id(n) in special), self.eos_id)  # after each document
        if self.bos_id is not None and probe[:1] == [self.bos_id]:
            self.convention = "bos"
        elif self.separator_id is not None:
            self.convention = "eos"
        else:
            self.convention = "newline"

    def set_separator(self, token: str) -> None:
        """Follow every document with the special token `token` (and start none with BOS)."""
        added = self.tok.get_added_tokens_decoder()
        special = {t.content: i for i, t in added.items() if t.special}
        if token not in special:
            names = ", ".join(sorted(special)[:12]) or "none"
            raise ConfigError(f"--doc-separator {token!r} is not a special token of {self.path}; its special tokens: "
                              f"{names}")
        self.separator_id, self.convention = special[token], "eos"

    @property
    def key(self) -> str:
        """What fixes the ids of tokenised data besides the text (the token cache's key)."""
        return f"{self.fingerprint}|{self.convention}|{self.separator_id}"

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
        config = read_side_json(self.directory, "tokenizer_config.json")  # through `inside`: never outside
        token = (config or {}).get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and self.tok.token_to_id(token) in special:
            return self.tok.token_to_id(token)
        return next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) in special), None)

    def encode(self, text: str) -> list[int]:
        return [i for piece in pieces(text) for i in self.tok.encode(piece, add_special_tokens=False).ids]

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Each document's ids [n] (uint32) with its separator (see the module docstring); long documents in
        pieces."""
        parts = [pieces(t) for t in texts]
        flat = iter(self._encode_pieces([p for ps in parts for p in ps]))
        before = [self.bos_id] if self.convention == "bos" else []
        after = [self.separator_id] if self.convention == "eos" else self.encode("\n") if not before else []
        return [np.concatenate([np.asarray(before, np.uint32), *(next(flat) for _ in ps), np.asarray(after, np.uint32)])
                for ps in parts]

    def _encode_pieces(self, texts: list[str]) -> Iterator[np.ndarray]:
        """The ids of each text, encoded in batches of at most about BATCH_CHARS characters."""
        batch, chars = [], 0
        for text in [*texts, None]:
            if batch and (text is None or chars + len(text) > BATCH_CHARS):
                for e in self.tok.encode_batch(batch, add_special_tokens=False):
                    yield np.asarray(e.ids, np.uint32)  # 4 bytes an id: a long document's ids held once
                batch, chars = [], 0
            if text is not None:
                batch.append(text)
                chars += len(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(spec: str | None, model_dir: str | None, model_config: dict | None = None):
    """`spec` ('bytes', a tokenizer.json, a directory holding one) or, when None, the checkpoint `model_dir`'s
    own tokenizer (None when it has none, and for presets: the caller decides whether bytes will do)."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_dir is None or not os.path.lexists(os.path.join(model_dir, "tokenizer.json")):
            return None
        tok = HFTokenizer(os.path.join(model_dir, "tokenizer.json"), model_config)
    elif os.path.isdir(spec):
        if not os.path.lexists(os.path.join(spec, "tokenizer.json")):
            raise ConfigError(f"--tokenizer {spec}: no tokenizer.json there; expected a tokenizer.json, a directory "
                              "holding one, or 'bytes'")
        tok = HFTokenizer(os.path.join(os.path.abspath(spec), "tokenizer.json"), model_config)
    elif os.path.isfile(spec):
        tok = HFTokenizer(os.path.abspath(spec), model_config, file=os.path.abspath(spec))
    else:
        raise ConfigError(f"--tokenizer {spec}: no tokenizer.json there; expected a tokenizer.json, a directory "
                          "holding one, or 'bytes'")
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
    seen = [0]  # documents with some text that is not whitespace

    def texts() -> Iterator[str]:
        for text in docs.texts():
            seen[0] += bool(text.strip())
            yield from pieces(text)

    tok.train_from_iterator(texts(), trainer)
    if not seen[0]:
        raise ConfigError(f"{data}: the data holds no text (only empty or blank documents); no tokenizer written")
    with AtomicDir(out, force, [("DATA", data)], "--out") as tmp:
        def write():
            tok.save(os.path.join(tmp, "tokenizer.json"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                           "eos_token": "<|endoftext|>", "model_max_length": 1_000_000}, f, indent=2)

        write_tokenizer_files(write, out)
    return f"trained a {tok.get_vocab_size()}-token byte-level BPE tokenizer on {docs.description}; wrote {out}"
