"""`upcycling.json`: what an upcycled directory records of how it was made (source or donors, recipe, options,
layout, checksums, the verification, and `source_final_lr`: the learning rate the dense source's own training
ended at, for a trainer that continues from there).

It is read like every file of a checkpoint (`llama.io.read_side_json`: inside the directory, size-limited, one-line
errors), and its `options` pass the same checks as the command line's (`options.options_from_dict`)."""

from __future__ import annotations

import os

from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import read_side_json

from .options import UpcycleOptions, options_from_dict

RECORD_NAME = "upcycling.json"
SOURCE_RUN_FILES = ("train_config.json", "metrics.jsonl")  # a source's training run: not copied into the MoE


def read_record(path: str | os.PathLike) -> dict:
    """The `upcycling.json` of an upcycled directory (its `options`, if any, a JSON object)."""
    record = read_side_json(path, RECORD_NAME, required=True)
    options = record.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{os.path.join(str(path), RECORD_NAME)}: options must be a JSON object of option names, "
                          f"got {shown(options)}")
    return record


def recorded_options(path: str | os.PathLike) -> UpcycleOptions | None:
    """The UpcycleOptions an upcycled directory was made with (None if its record has none), checked as the command
    line checks them (one-line errors naming the file and the key); `config` (the recipe file) is not followed."""
    options = read_record(path).get("options")
    if options is None:
        return None
    return options_from_dict(options, os.path.join(str(path), RECORD_NAME), "options", {"config": None})


def source_final_lr(directory: str) -> float | None:
    """The learning rate the dense source's own moekit training ended at: its train_config.json's
    `schedule.final_lr`, read through `read_side_json`, when a finite number in (0, 1]; else None. A file that is
    not JSON, or not there, gives None; one that resolves outside the directory is refused."""
    try:
        config = read_side_json(directory, "train_config.json")
    except ConfigError:
        return None
    schedule = config.get("schedule") if config else None
    lr = schedule.get("final_lr") if isinstance(schedule, dict) else None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1:  # NaN, inf, 1e30 fail too
        return None
    return float(lr)
