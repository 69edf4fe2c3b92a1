"""Hugging Face checkpoint directories: lazy safetensors reading and streaming, atomic, sharded writing.

Reading never loads a whole file: headers are parsed here, tensors come one at a time through safetensors'
memory map. Writing streams tensors straight into shard files whose headers are laid out up front from a
plan, so memory holds one tensor at a time, and the directory appears only when complete (built in
``DST.tmp-PID-*``, fsynced, renamed). No pickle is ever loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {  # safetensors name <-> torch dtype
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_size(size: int | str) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes (GB = 10**9, GiB = 2**30, as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"cannot read size '{size}'; expected e.g. 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}
    if name not in table:
        raise CheckpointError(f"unknown dtype '{name}'; expected one of {sorted(table)}")
    return table[name]


# ---- reading ------------------------------------------------------------------------------------

def read_header(path: str) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without reading tensor data: ({name: info}, data start offset).

    Checks that the file holds every byte its header promises (a truncated download fails here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return header, 8 + n


class CheckpointReader:
    """A Hugging Face model directory: config.json plus one or many safetensors shards, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = str(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: checkpoint directory not found")
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            with open(cfg) as f:
                self.config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        self.files = self._weight_files()
        self.tensors: dict[str, tuple[str, dict]] = {}  # name -> (file, {dtype, shape, data_offsets})
        for file in self.files:
            header, _ = read_header(os.path.join(path, file))
            for name, info in header.items():
                self.tensors[name] = (file, info)
        if self.index is not None:
            missing = [n for n in self.index if n not in self.tensors]
            if missing:
                raise CheckpointError(f"{path}: tensor '{missing[0]}' is listed in {INDEX_NAME} "
                                      f"but not found in {self.index[missing[0]]}")
        self._handles: dict[str, Any] = {}

    def _weight_files(self) -> list[str]:
        path, self.index = self.path, None
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.index = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map')") from None
            files = sorted(set(self.index.values()))
            for file in files:
                if not os.path.isfile(os.path.join(path, file)):
                    raise CheckpointError(f"{path}: shard '{file}' listed in {INDEX_NAME} is missing")
            return files
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if files:
            return files
        pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(f"{path}: only pickle weights ({pickles[0]}); moekit never loads pickle: convert "
                                  "them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))")
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

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (memory-mapped; only its bytes are touched)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor '{name}' not found")
        file = self.tensors[name][0]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- writing ------------------------------------------------------------------------------------

class AtomicDir:
    """Build a directory in ``DST.tmp-PID-<random>`` and rename it to DST on success; remove it on failure.

    An existing DST is refused unless ``force``; stale temporaries of dead processes are cleaned first."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = os.path.abspath(str(dst)).rstrip("/")
        self.force = force
        self.tmp = None

    def __enter__(self) -> str:
        if os.path.lexists(self.dst) and not self.force:
            raise CheckpointError(f"{self.dst} already exists; pass --force (force=True) to overwrite it")
        clean_stale_temporaries(self.dst)
        os.makedirs(os.path.dirname(self.dst) or ".", exist_ok=True)
        self.tmp = f"{self.dst}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for name in os.listdir(self.tmp):
            _fsync(os.path.join(self.tmp, name))
        _fsync(self.tmp)
        old = None
        if os.path.lexists(self.dst):
            old = f"{self.dst}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        _fsync(os.path.dirname(self.dst))
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        return False


def _fsync(path: str) -> None:
    if os.path.isfile(path) or os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale_temporaries(dst: str) -> None:
    """Remove ``DST.tmp-PID-*`` / ``DST.old-PID-*`` left by killed runs whose process is gone."""
    parent, base = os.path.split(dst)
    for name in os.listdir(parent or "."):
        m = re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}", name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_state_dict(directory: str, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> None:
    """Write an in-memory state dict as (sharded) safetensors into an existing directory."""
    writer = ShardedWriter(directory, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_size)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
