"""What a run trains or a prompt is completed with: a checkpoint directory (Llama or MoE by config.json's
model_type) or a preset (random init, seeded), loaded in fp32 (`load_model`); and the learning rate a checkpoint's
own training ended at (`source_final_lr`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError
from moekit.llama.io import config_path, read_config_json, read_json
from moekit.llama.model import Llama
from moekit.moe.config import MOE_PRESETS, MoEConfig
from moekit.moe.model import MoEForCausalLM

from .tokenizer import ByteTokenizer

MOE_TYPES = MoEConfig.MODEL_TYPES  # moekit's own model_type and the checkpoint formats


@dataclass
class Source:
    model: nn.Module
    description: str  # "preset mini" or the checkpoint's path
    directory: str | None  # the checkpoint directory (None for a preset)
    config: dict | None  # its config.json


def load_model(source: str, seed: int = 0, tokenizer=None) -> Source:
    """A checkpoint directory (Llama or MoE by config.json's model_type) or a preset (random init, seeded), in
    fp32 and train mode. A preset trained with a tokenizer other than bytes takes its vocabulary (rounded up to a
    multiple of 64) and its BOS / EOS ids."""
    if os.path.isdir(source):
        path = config_path(source)
        config = read_config_json(path)
        model_type = config.get("model_type")
        if model_type in LlamaConfig.MODEL_TYPES:
            model = Llama.from_pretrained(source)
        elif model_type in MOE_TYPES:
            model = MoEForCausalLM.from_pretrained(source)
        else:
            raise CheckpointError(f"{path}: model_type {model_type!r} cannot be trained; expected "
                                  f"{', '.join((*LlamaConfig.MODEL_TYPES, *MOE_TYPES))}")
        return Source(model.float().train(), os.path.abspath(source), os.path.abspath(source), config)
    torch.manual_seed(seed)
    fit = {}
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        fit = dict(vocab_size=-(-tokenizer.num_ids // 64) * 64, bos_token_id=tokenizer.bos_id,
                   eos_token_id=tokenizer.eos_id)
    if source.lower() in LLAMA_PRESETS:
        model = Llama(LlamaConfig.from_name(source, **fit))
    elif source.lower() in MOE_PRESETS:
        model = MoEForCausalLM(MoEConfig.from_name(source, **fit))
    else:
        raise ConfigError(f"{source}: not a checkpoint directory nor a preset; presets: "
                          f"{', '.join(sorted(LLAMA_PRESETS) + sorted(MOE_PRESETS))}")
    return Source(model.float().train(), f"preset {source}", None, None)


def source_final_lr(directory: str | None) -> float | None:
    """The learning rate a moekit run that produced `directory` (or the dense model it was upcycled from) ended at."""
    for _ in range(2):
        if directory is None:
            return None
        path = os.path.join(directory, "train_config.json")
        if os.path.isfile(path):
            schedule = read_json(path, "train_config.json").get("schedule")
            return schedule.get("final_lr") if isinstance(schedule, dict) else None
        record = os.path.join(directory, "upcycling.json")
        directory = read_json(record, "upcycling.json").get("source") if os.path.isfile(record) else None
    return None
