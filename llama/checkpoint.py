"""Hugging Face checkpoint directories: one safetensors reader, streaming sharded writing, side files.

Reading never maps or loads a whole file: headers are parsed (and checked) here, and each tensor's bytes come
with one ``readinto`` into a fresh buffer, so memory holds only the tensors in use (mapped pages would count
towards resident memory until unmapped) and nothing but the checked byte range is ever read. Weight files must
lie inside the checkpoint directory (or, for a Hugging Face hub cache snapshot, inside that model's cache
folder). Writing streams tensors straight into shard files whose headers are laid out up front from a plan, so
memory holds one tensor at a time; the directory appears only when complete (``llama.io.AtomicDir``). No pickle
is ever loaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, shown
from .io import MARKER, inside, read_bytes, read_config_json, read_json, write_json
from .options import parse_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000

DTYPES = {  # safetensors name <-> torch dtype
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}
    if name not in table:
        raise ConfigError(f"unknown dtype '{name}'; expected one of {sorted(table)}")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")


# ---- reading ------------------------------------------------------------------------------------

def read_header(path: str) -> tuple[dict[str, dict], int]:
    """Parse and check a safetensors header without reading tensor data: ({name: info}, data start offset).

    Every entry must name a known dtype, a shape of non-negative integers and a byte range of exactly
    shape x dtype bytes inside the file (a truncated download fails here). Errors name the file and what was
    expected, never the bytes read."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file ({what})")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise bad("its header length field exceeds the file: corrupt or truncated")
            header = json.loads(f.read(n))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, an integer of thousands of digits
        raise bad("the header is not JSON") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            raise bad(f"tensor {shown(name)} has no known dtype; expected one of {', '.join(DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {shown(name)} has no valid shape; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {shown(name)} has no valid data_offsets; expected [begin, end] with 0 <= begin <= end")
        want = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if offsets[1] - offsets[0] != want:
            raise bad(f"tensor {shown(name)} spans {offsets[1] - offsets[0]} bytes; its shape and dtype need {want}")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header promises {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


class CheckpointReader:
    """A Hugging Face model directory: config.json plus one or many safetensors shards, read lazily.

    `.config` (the config.json dict), `.names()`, `.shape(n)`, `.dtype(n)`, `.nbytes(n)`, `.get(n)`; a context
    manager that closes its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = str(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: checkpoint directory not found")
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
        inside(path, "config.json", "file")
        self.config = read_config_json(cfg)
        self.files = self._weight_files()  # {file name: real path}
        self.tensors: dict[str, tuple[str, dict]] = {}  # name -> (file, {dtype, shape, data_offsets})
        self._data_start: dict[str, int] = {}
        for file, real in self.files.items():
            header, self._data_start[file] = read_header(real)
            for name, info in header.items():
                if name in self.tensors and self.index is None:
                    raise CheckpointError(f"{path}: tensor '{name}' is in both {self.tensors[name][0]} and {file} "
                                          f"(and no {INDEX_NAME} says which to use); remove the stale file")
                if self.index is None or self.index.get(name) == file:
                    self.tensors[name] = (file, info)
        if self.index is not None:
            missing = [n for n in self.index if n not in self.tensors]
            if missing:
                raise CheckpointError(f"{path}: tensor '{missing[0]}' is listed in {INDEX_NAME} "
                                      f"but not found in {self.index[missing[0]]}")
        self._open: dict[str, Any] = {}

    def _weight_files(self) -> dict[str, str]:
        path, self.index = self.path, None
        if os.path.isfile(os.path.join(path, INDEX_NAME)):
            index = read_json(inside(path, INDEX_NAME, "file"), "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{path}/{INDEX_NAME}: not a safetensors index (expected a 'weight_map' "
                                      "object of tensor name -> file name)")
            self.index = weight_map
            files = {}
            for file in sorted(set(weight_map.values())):
                real = inside(path, file, "index entry")
                if not os.path.isfile(real):
                    raise CheckpointError(f"{path}: shard '{file}' listed in {INDEX_NAME} is missing")
                files[file] = real
            return files
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if names:
            return {f: inside(path, f, "weight file") for f in names}
        pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(f"{path}: no *.safetensors weight files (only pickle weights, {pickles[0]}, which "
                                  "moekit never loads: convert them to safetensors, e.g. with transformers' "
                                  "save_pretrained(safe_serialization=True))")
        raise CheckpointError(f"{path}: no *.safetensors weight files")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.tensors[name][1]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self.tensors[name][1]["data_offsets"]
        return end - start

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """One tensor, read from its shard into a fresh buffer (only its bytes are touched); `rows`: only those
        indices of its first dimension (a slice of step 1), i.e. one contiguous range of its bytes."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor '{name}' not found")
        file, info = self.tensors[name]
        start, end = info["data_offsets"]
        shape = list(info["shape"])
        if rows is not None:
            first, stop, _ = rows.indices(shape[0])
            row_bytes = (end - start) // max(shape[0], 1)
            start, end, shape[0] = start + first * row_bytes, start + stop * row_bytes, stop - first
        if file not in self._open:
            self._open[file] = open(self.files[file], "rb")
        f = self._open[file]
        buf = torch.empty(end - start, dtype=torch.uint8)
        f.seek(self._data_start[file] + start)
        if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{self.path}/{file}: truncated while reading tensor '{name}'")
        return buf.view(DTYPES[info["dtype"]]).reshape(shape)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


MAX_TOKENIZER_BYTES = 256 << 20  # released tokenizer.json files are at most a few tens of MB


def read_tokenizer(path: str):
    """A tokenizer.json (a regular file of bounded size) read with the Hugging Face `tokenizers` library; a
    one-line ConfigError when unreadable."""
    from tokenizers import Tokenizer

    data = read_bytes(path, "tokenizer.json", MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the library raises its own exception types for malformed files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not a readable tokenizer.json ({first[:200]})") from None


def checkpoint_tokenizer(directory: str, why: str = ""):
    """A checkpoint directory's own tokenizer.json (which must lie inside it), read with `read_tokenizer`."""
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ConfigError(f"{directory}: no tokenizer.json{why}")
    return read_tokenizer(inside(directory, "tokenizer.json", "file"))


class StateDictReader:
    """In-memory tensors under their checkpoint names, with the config dict they belong to: the reader interface
    of `CheckpointReader` over a live model (e.g. to upcycle a model without writing it first)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], path: str = "<state dict>"):
        self.config, self.tensors, self.path = config, tensors, path

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.tensors[name].detach()
        return t if rows is None else t[rows]

    def close(self) -> None:
        pass


def copy_side_files(src: str, dst: str, skip: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Copy a checkpoint's non-weight files (tokenizer, chat template, generation config, ...) from `src` into
    `dst`; return (copied, skipped). config.json, weights, indexes, pickles, directories and `skip` are not
    copied; a file resolving outside the checkpoint is refused."""
    copied, skipped = [], []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in ("config.json", MARKER) or name in skip:
            continue  # written anew
        if not os.path.isfile(path) or name == INDEX_NAME or name.endswith((".safetensors", *PICKLE_SUFFIXES)):
            skipped.append(name)  # weights, and directories (e.g. Meta's original/ with .pth weights)
            continue
        shutil.copyfile(inside(src, name, "file"), os.path.join(dst, name))
        copied.append(name)
    return copied, skipped


# ---- writing ------------------------------------------------------------------------------------

class ShardedWriter:
    """Writes planned tensors into safetensors shards of at most ``max_shard_size`` bytes, streaming.

    ``specs`` lists (name, dtype, shape) in the order tensors will be written; each shard's header is
    written when the shard is opened, then tensor bytes are appended as they come. Shards are named like
    transformers names them, with ``model.safetensors.index.json`` (or a single ``model.safetensors``).
    """

    def __init__(self, directory: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str = "5GB"):
        self.dir = directory
        limit = parse_size(max_shard_size)
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > limit:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        n = len(self.shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(s[3] for shard in self.shards for s in shard)
        self._order: Iterator = ((i, spec) for i, shard in enumerate(self.shards) for spec in shard)
        self._file = None
        self._shard = -1

    def _open(self, i: int) -> None:
        if self._file:
            self._file.close()
        header, offset = {}, 0
        for name, dtype, shape, nbytes in self.shards[i]:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(os.path.join(self.dir, self.files[i]), "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            i, (want, dtype, shape, _) = next(self._order)
        except StopIteration:
            raise CheckpointError(f"tensor '{name}' was not planned for this checkpoint") from None
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"writing '{name}' {tuple(tensor.shape)} {tensor.dtype}, but the plan expects "
                                  f"'{want}' {shape} {dtype} next")
        if i != self._shard:
            self._open(i)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        left = next(self._order, None)
        if left is not None:
            raise CheckpointError(f"checkpoint incomplete: tensor '{left[1][0]}' was never written")
        if self._file:
            self._file.close()
        if len(self.files) > 1:
            weight_map = {s[0]: self.files[i] for i, shard in enumerate(self.shards) for s in shard}
            write_json(os.path.join(self.dir, INDEX_NAME),
                       {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})


def save_state_dict(directory: str, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> None:
    """Write an in-memory state dict as (sharded) safetensors into an existing directory."""
    writer = ShardedWriter(directory, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_size)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
