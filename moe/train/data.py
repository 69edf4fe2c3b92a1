"""Training data: documents from text files, a directory of them, `.jsonl`, a `datasets` directory or a built-in
set, tokenised once into a cached `.npy` memmap (keyed by the tokenizer's and the documents' hashes, so a second
run and every process of a multi-process run reuse it); or token ids given as `.npy`.

One flat id stream is split into train (the first 95%) and validation (the last 5%), unless a separate
validation source is given. A step's training sequences are random windows of seq_len + 1 tokens drawn from a
generator seeded by (seed, step) only, so they do not depend on how the step is split into micro-batches or
processes: batch 4 x accum 1 and batch 2 x accum 2 see the same four sequences, and two processes of batch 2
see, micro-batch by micro-batch, what one process of batch 4 sees. Validation windows are evenly
spaced and the same at every evaluation.

Text must be UTF-8 (an error names the file and line otherwise); lone surrogates that a .jsonl escapes (`"\ud800"`)
become U+FFFD. A token cache that is not a 1-D array of ids below the vocabulary size is rebuilt, never used; a
cache that cannot be written (a full disk, a read-only home) is one line naming the path, no temporary left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import file_sha256

BUILTIN = ("builtin:arith", "builtin:python-stdlib", "builtin:python-stdlib-val")
# The Python standard library's own sources: text every machine with Python has. Test suites, IDLE, Tk, 2to3 and
# platform build files are left out; one file in 20 (by a hash of its path) is held out for validation.
_STDLIB_SKIP = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "venv", "site-packages",
                "dist-packages", "__pycache__")
VAL_FRACTION = 0.05
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
                 ".js", ".ts", ".html", ".css", ".tex", ".sh", ".toml", ".yaml", ".yml", ".json", ".csv")
_CACHE_VERSION = "1"
FLUSH_CHARS = 1 << 22  # characters of documents tokenised together (with at most 256 documents)
_SURROGATE = re.compile("[\ud800-\udfff]")


def arith_text(lines: int = 100_000, seed: int = 0) -> str:
    """Deterministic lines like '417+86=503\\n' (operands 0..999): learnable structure, no files needed."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 1000, (2, lines)).tolist()
    return "".join(f"{x}+{y}={x + y}\n" for x, y in zip(a, b))


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moekit", "tokens")


# ---- documents ---------------------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte {e.start} of the file); convert the file to "
                          "UTF-8 or pass a .npy of token ids instead") from None


def _no_surrogates(text: str) -> str:
    """`text` with lone surrogates (which JSON can escape, and no encoder accepts) replaced by U+FFFD."""
    return text if text.isascii() or not _SURROGATE.search(text) else _SURROGATE.sub("\ufffd", text)


def _json_line(path: str, n: int, raw: bytes):
    """The JSON value of line `n` of a .jsonl, with a one-line error naming the file and line."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: line {n} is not UTF-8 text (byte {e.start} of the line); a .jsonl is UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {n} is not JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: line {n} is JSON nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits
        raise ConfigError(f"{path}: line {n} is not JSON moekit reads ({str(e)[:80]})") from None


def text_files(directory: str) -> list[str]:
    """Regular files with a text suffix under `directory`, recursively, in a fixed order."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.endswith(TEXT_SUFFIXES) and os.path.isfile(os.path.join(root, f))]
    return found


def stdlib_files(held_out: bool) -> tuple[str, list[str]]:
    """(its directory, the standard library's .py files in a fixed order): the training part, or the held-out
    one (1 in 20)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    chosen = []
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith((".", "config-")))
        for f in sorted(files):
            path = os.path.join(base, f)
            digest = int(hashlib.sha256(os.path.relpath(path, root).encode()).hexdigest(), 16)
            if f.endswith(".py") and (digest % 20 == 0) == held_out:
                chosen.append(path)
    if not chosen:
        raise ConfigError(f"{root}: no Python sources found in the standard library")
    return root, chosen


class Documents:
    """Where a source's documents come from: `key_parts()` (what the cache key hashes) and `texts()`."""

    def __init__(self, spec: str, text_field: str):
        self.spec, self.text_field = spec, text_field
        path = os.path.abspath(spec)
        if spec.startswith("builtin:"):
            if spec not in BUILTIN:
                raise ConfigError(f"unknown built-in data '{spec}'; expected one of {list(BUILTIN)}")
            self.kind, self.files, self.description = "builtin", [], f"{spec} (seed 0)"
            if spec != "builtin:arith":
                root, self.files = stdlib_files(held_out=spec.endswith("-val"))
                self.kind, self.description = "text", f"{spec} ({len(self.files)} .py files under {root})"
        elif any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            self.kind, self.files = "datasets", sorted(
                os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith((".arrow", ".json")))
            self.description = f"{path} (datasets, field '{text_field}')"
        elif os.path.isdir(path):
            self.kind, self.files = "dir", text_files(path)
            if not self.files:
                raise ConfigError(f"{spec}: no text files in the data directory (looked for {', '.join(TEXT_SUFFIXES)})")
            self.description = f"{path} ({len(self.files)} text files)"
        elif os.path.isfile(path):
            self.kind, self.files = ("jsonl" if path.endswith(".jsonl") else "text"), [path]
            self.description = path + (f" (field '{text_field}')" if self.kind == "jsonl" else "")
        else:
            raise ConfigError(f"{spec}: data not found (expected a text file, a directory of text files, a .jsonl, a "
                              f"datasets directory, a .npy of token ids, or {' / '.join(BUILTIN)})")

    def key_parts(self) -> Iterator[bytes]:
        yield f"{_CACHE_VERSION}|{self.kind}|{self.spec if self.kind == 'builtin' else ''}|{self.text_field}".encode()
        for path in self.files:  # a datasets directory's .arrow files may be GBs: hashed 16 MiB at a time
            yield os.path.basename(path).encode() + bytes.fromhex(file_sha256(path))

    def texts(self) -> Iterator[str]:
        if self.kind == "builtin":
            yield arith_text()
        elif self.kind in ("text", "dir"):
            for path in self.files:
                yield _read_text(path)
        elif self.kind == "jsonl":
            yield from self._jsonl(self.files[0])
        else:
            yield from self._datasets()

    def _jsonl(self, path: str) -> Iterator[str]:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _json_line(path, n, line)
                text = row.get(self.text_field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ConfigError(f"{path}: line {n} has no text field {shown(self.text_field)} (choose it with "
                                      "--text-field)")
                yield _no_surrogates(text)

    def _datasets(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{self.spec} is a `datasets` directory; reading it needs the datasets package "
                              "(pip install 'moekit[datasets]')") from None
        ds = datasets.load_from_disk(os.path.abspath(self.spec))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if self.text_field not in ds.column_names:
            raise ConfigError(f"{self.spec}: no column {shown(self.text_field)} (columns: "
                              f"{shown(ds.column_names)}); choose it with --text-field")
        for n, row in enumerate(ds):
            if not isinstance(row[self.text_field], str):
                raise ConfigError(f"{self.spec}: row {n} of column {shown(self.text_field)} is not text")
            yield _no_surrogates(row[self.text_field])


# ---- token streams -----------------------------------------------------------------------------------------

def _npy(path: str, vocab_size: int) -> np.ndarray:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a readable .npy array ({e})") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"{path}: token ids must be integers, got dtype {ids.dtype}")
    ids = ids.reshape(-1)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ConfigError(f"{path}: token ids span {int(ids.min())}..{int(ids.max())}; the model's vocab_size "
                          f"{vocab_size} needs 0..{vocab_size - 1}")
    return ids


def load_tokens(spec: str, tokenizer, vocab_size: int, text_field: str = "text", cache_dir: str | None = None,
                progress: bool = False, write_cache: bool = True) -> tuple[np.ndarray, str]:
    """The id stream [N] of `spec` and a description of where it came from. Text is tokenised by `tokenizer`
    (None: text data is an error naming --tokenizer) once, then read from the cache (a memmap)."""
    if spec.endswith(".npy"):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"{spec}: data file not found (expected a .npy of token ids)")
        return _npy(path, vocab_size), path
    docs = Documents(spec, text_field)
    if tokenizer is None:
        raise ConfigError(f"{spec} is text, and the model has no tokenizer.json: pass --tokenizer PATH (a "
                          "tokenizer.json or a directory holding one) or --tokenizer bytes")
    h = hashlib.sha256(tokenizer.key.encode())
    for part in docs.key_parts():
        h.update(part)
    cache = os.path.join(cache_dir or default_cache_dir(), h.hexdigest()[:32] + ".npy")
    description = f"{docs.description}, tokenizer {tokenizer.name}"
    ids = _cached(cache, vocab_size)
    if ids is not None:
        return ids, description
    if not write_cache:
        raise ConfigError(f"{cache}: the tokenised data the main process should have written is missing or invalid")
    ids = _tokenize(docs, tokenizer, progress)
    if ids.size == 0:
        raise ConfigError(f"{spec}: the data holds no tokens")
    _write_cache(cache, ids)
    return np.load(cache, mmap_mode="r"), description


def _cached(path: str, vocab_size: int) -> np.ndarray | None:
    """The token cache at `path` as a memmap when it is a 1-D array of integer ids in 0..vocab_size-1; None when
    absent or anything else (floats, out-of-range ids, a damaged file): the caller tokenises again."""
    if not os.path.isfile(path):
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        return None
    if np.issubdtype(ids.dtype, np.unsignedinteger) and np.iinfo(ids.dtype).max < vocab_size:
        return ids  # every value of its dtype is an id: no need to read it all
    low = 0 if np.issubdtype(ids.dtype, np.unsignedinteger) else int(ids.min())
    return ids if low >= 0 and int(ids.max()) < vocab_size else None


def _write_cache(path: str, ids: np.ndarray) -> None:
    """`ids` saved at `path` through a temporary file (removed on every error); one-line errors name the path."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot create the token cache directory ({e.strerror or e}); pass "
                              "--token-cache DIR (a writable directory)") from None
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npy"
    try:
        _save_ids(tmp, ids)
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the token cache ({e.strerror or e}); free some space or pass "
                              "--token-cache DIR (a writable directory)") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _save_ids(path: str, ids: np.ndarray) -> None:
    """`ids` [N] as a .npy file, written through Python's file object, 16M ids at a time, and fsynced (numpy's own
    writer, C stdio, can miss a write that a full disk cut short)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(ids))
        for start in range(0, ids.size, 1 << 24):
            f.write(ids[start:start + (1 << 24)].tobytes())
        f.flush()
        os.fsync(f.fileno())


def _tokenize(docs: Documents, tokenizer, progress: bool) -> np.ndarray:
    dtype = np.uint16 if tokenizer.num_ids <= 2**16 else np.uint32
    chunks, batch = [], []
    bar = tqdm(desc=f"tokenize {os.path.basename(docs.spec.rstrip('/'))}", unit="doc", disable=not progress,
               leave=False)

    def flush():
        for ids in tokenizer.encode_documents(batch):
            chunks.append(np.asarray(ids, dtype=dtype))
        bar.update(len(batch))
        batch.clear()

    chars = 0
    for text in docs.texts():
        batch.append(text)
        chars += len(text)
        if len(batch) == 256 or chars >= FLUSH_CHARS:
            flush()
            chars = 0
    flush()
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


class TokenData:
    """Train / validation windows of seq_len + 1 tokens from one id stream (or two: train and validation)."""

    def __init__(self, ids: np.ndarray, seq_len: int, seed: int = 0, source: str = "",
                 val_ids: np.ndarray | None = None):
        self.window, self.seed, self.source = seq_len + 1, seed, source
        if val_ids is None:
            n = len(ids)
            n_val = max(int(n * VAL_FRACTION), self.window)
            if n - n_val < self.window:
                raise ConfigError(f"{source or 'data'}: {n} tokens is too few for windows of seq_len + 1 = "
                                  f"{self.window} in both the train and the validation split (needs {2 * self.window})")
            ids, val_ids = ids[:n - n_val], ids[n - n_val:]
        for name, part in (("training", ids), ("validation", val_ids)):
            if len(part) < self.window:
                raise ConfigError(f"{source or 'data'}: the {name} data has {len(part)} tokens, fewer than one window "
                                  f"of seq_len + 1 = {self.window}")
        self.train, self.val = ids, val_ids

    def _windows(self, ids: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(ids[s:s + self.window], dtype=np.int64) for s in starts]))

    def train_batch(self, step: int, batch_size: int, accum: int = 1, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This process's training windows of optimizer step `step`: [accum * batch_size, seq_len + 1], its
        micro-batch i being windows (i * world + rank) * batch_size ... + batch_size of the step's draw, so that
        micro-batch i of all processes together is micro-batch i of one process with world x the batch size."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train) - self.window + 1, accum * world * batch_size)
        mine = starts.reshape(accum, world, batch_size)[:, rank].reshape(-1)
        return self._windows(self.train, mine)

    def val_batches(self, batches: int, batch_size: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        """This process's validation windows, `batches` tensors [batch_size, seq_len + 1], evenly spaced."""
        n = batches * batch_size
        starts = np.linspace(0, len(self.val) - self.window, n * world).round().astype(np.int64)
        return list(self._windows(self.val, starts[rank * n:(rank + 1) * n]).split(batch_size))
