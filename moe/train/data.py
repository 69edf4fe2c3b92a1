"""Training data without a tokenizer: the bytes of text files, pre-tokenised `.npy` ids, or a built-in set.

One flat id stream is split into train (the first 95%) and validation (the last 5%). A step's training
sequences are random windows of seq_len + 1 tokens drawn from a generator seeded by (seed, step) only, so they
do not depend on how the step is split into micro-batches or processes: batch 4 x accum 1 and batch 2 x accum 2
see the same four sequences. Validation windows are evenly spaced and the same at every evaluation.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from llama.errors import ConfigError

BUILTIN = ("builtin:arith",)
VAL_FRACTION = 0.05


def arith_text(lines: int = 100_000, seed: int = 0) -> bytes:
    """Deterministic lines like '417+86=503\\n' (operands 0..999): learnable structure, no files needed."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 1000, (2, lines)).tolist()
    return "".join(f"{x}+{y}={x + y}\n" for x, y in zip(a, b)).encode()


def load_tokens(spec: str, vocab_size: int) -> tuple[np.ndarray, str]:
    """The id stream [N] of `spec` (builtin:arith, a text file, a directory of .txt files, or a .npy of ids)
    and a description of where it came from; checks every id fits `vocab_size`."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise ConfigError(f"unknown built-in data '{spec}'; expected one of {list(BUILTIN)}")
        return _bytes(arith_text(), spec, vocab_size), f"{spec} (seed 0)"
    path = os.path.abspath(spec)
    if spec.endswith(".npy"):
        if not os.path.isfile(path):
            raise ConfigError(f"{spec}: data file not found (expected a .npy of token ids)")
        return _npy(path, vocab_size), path
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise ConfigError(f"{spec}: no .txt files in the data directory")
        data = b"".join(_read_text(os.path.join(path, f)) for f in files)
        return _bytes(data, spec, vocab_size), f"{path} ({len(files)} .txt files, bytes)"
    if not os.path.isfile(path):
        raise ConfigError(f"{spec}: data file not found (expected a UTF-8 text file, a directory of .txt files, "
                          f"a .npy of token ids, or {' / '.join(BUILTIN)})")
    return _bytes(_read_text(path), spec, vocab_size), f"{path} (bytes)"


def _read_text(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); pass a .npy of token ids instead") from None
    return data


def _bytes(data: bytes, spec: str, vocab_size: int) -> np.ndarray:
    if vocab_size < 256:
        raise ConfigError(f"{spec}: byte-level data needs vocab_size >= 256; the model has {vocab_size}")
    return np.frombuffer(data, dtype=np.uint8)


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


class TokenData:
    """Train / validation windows of seq_len + 1 tokens from one id stream."""

    def __init__(self, ids: np.ndarray, seq_len: int, seed: int = 0, source: str = ""):
        self.window, self.seed, self.source = seq_len + 1, seed, source
        n = len(ids)
        n_val = max(int(n * VAL_FRACTION), self.window)
        if n - n_val < self.window:
            raise ConfigError(f"{source or 'data'}: {n} tokens is too few for windows of seq_len + 1 = "
                              f"{self.window} in both the train and the validation split (needs {2 * self.window})")
        self.train, self.val = ids[:n - n_val], ids[n - n_val:]

    def _windows(self, ids: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(ids[s:s + self.window], dtype=np.int64) for s in starts]))

    def train_batch(self, step: int, n: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This process's `n` training windows [n, seq_len + 1] of optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train) - self.window + 1, n * world)
        return self._windows(self.train, starts[rank * n:(rank + 1) * n])

    def val_batches(self, batches: int, batch_size: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        """This process's validation windows, `batches` tensors [batch_size, seq_len + 1], evenly spaced."""
        n = batches * batch_size
        starts = np.linspace(0, len(self.val) - self.window, n * world).round().astype(np.int64)
        return list(self._windows(self.val, starts[rank * n:(rank + 1) * n]).split(batch_size))
