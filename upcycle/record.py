"""`upcycling.json`: what an upcycled directory records of how it was made (source or donors, recipe, options,
layout, checksums, the verification)."""

from __future__ import annotations

import os

from moekit.llama.errors import CheckpointError
from moekit.llama.io import read_json

RECORD_NAME = "upcycling.json"


def read_record(path: str | os.PathLike) -> dict:
    """The `upcycling.json` of an upcycled directory."""
    record = read_json(os.path.join(str(path), RECORD_NAME), RECORD_NAME)
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}/{RECORD_NAME}: expected a JSON object")
    return record
