"""Where dense tensors come from: a checkpoint directory (read with plain file reads) or an in-memory state dict.

`DirSource` reads each tensor's bytes with one `readinto` into a fresh buffer instead of safetensors' memory map:
mapped file pages count towards the process's resident memory until unmapped, so reading a whole model through
a map would make peak RSS grow with the model; read this way, memory holds only the tensors in use.
"""

from __future__ import annotations

import math
import os

import torch

from llama.checkpoint import DTYPES, CheckpointReader, read_header
from llama.errors import CheckpointError


class DirSource:
    """A Hugging Face checkpoint directory: `.config` (config.json dict), `.names()`, `.shape`, `.dtype`, `.get`."""

    def __init__(self, path: str | os.PathLike):
        self.reader = CheckpointReader(path)  # validates config.json, shards, truncation
        self.path, self.config = self.reader.path, self.reader.config
        self._data_start = {f: read_header(os.path.join(self.path, f))[1] for f in self.reader.files}
        self._files: dict[str, object] = {}

    def names(self) -> list[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str) -> torch.Tensor:
        if name not in self.reader:
            raise CheckpointError(f"{self.path}: tensor '{name}' not found")
        file, info = self.reader.tensors[name]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype = DTYPES[info["dtype"]]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}/{file}: tensor '{name}' has {end - start} bytes, its shape "
                                  f"{list(shape)} and dtype {info['dtype']} need {math.prod(shape) * dtype.itemsize}")
        if file not in self._files:
            self._files[file] = open(os.path.join(self.path, file), "rb")
        f = self._files[file]
        buf = torch.empty(end - start, dtype=torch.uint8)
        f.seek(self._data_start[file] + start)
        if f.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{self.path}/{file}: truncated while reading tensor '{name}'")
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StateDictSource:
    """A live model's tensors under their checkpoint names, with the config dict they were built from."""

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

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def close(self) -> None:
        pass
