"""What a run trains or a prompt is completed with: a checkpoint directory (Llama or MoE by config.json's
model_type) or a preset (random init, seeded), loaded in fp32 (`load_model`); the learning rate a checkpoint's
own training ended at (`source_final_lr`); and a run's set-up: its model, tokenizer and data checked against each
other and its memory estimated (`load_inputs`), its schedule (`make_schedule`), its MoE options
(`configure_moe`).

Every file is read from inside the checkpoint (`moekit.llama.io.inside`: a link out of it is refused), and a value
read from a file passes the checks its command-line option has: a recorded learning rate is a finite number in
(0, 1], as --lr is. A path recorded in a file (upcycling.json's "source") is never followed."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import read_config_json, read_side_json
from moekit.llama.model import Llama
from moekit.moe.config import MOE_PRESETS, MoEConfig
from moekit.moe.model import MoEForCausalLM

from .budget import check_budget
from .data import TokenData, load_tokens
from .optim import Schedule
from .options import CONTINUED, SCRATCH, TrainOptions
from .parallel import Layout, check_layout
from .tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_tokenizer
from .weights import CheckpointWeights, SeededWeights

MOE_TYPES = MoEConfig.MODEL_TYPES  # moekit's own model_type and the checkpoint formats


@dataclass
class Source:
    model: nn.Module
    description: str  # "preset mini" or the checkpoint's path
    directory: str | None  # the checkpoint directory (None for a preset)
    config: dict | None  # its config.json
    weights: CheckpointWeights | SeededWeights | None = None  # where a model on the meta device takes its values


def load_model(source: str, seed: int = 0, tokenizer=None, meta: bool = False) -> Source:
    """A checkpoint directory (Llama or MoE by config.json's model_type) or a preset (random init, seeded), in
    fp32 and train mode. A preset trained with a tokenizer other than bytes takes its vocabulary (rounded up to a
    multiple of 64) and its BOS / EOS ids. meta=True: the model on the meta device and the source of its values in
    `.weights` (a checkpoint's names and shapes checked already), for `weights.materialize` once it is split."""
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
        config = read_config_json(source)  # through `inside`: never a config.json linked from elsewhere
        model_type = config.get("model_type")
        if model_type in LlamaConfig.MODEL_TYPES:
            cls = Llama
        elif model_type in MOE_TYPES:
            cls = MoEForCausalLM
        else:
            raise CheckpointError(f"{path}: model_type {shown(model_type)} cannot be trained; expected "
                                  f"{', '.join((*LlamaConfig.MODEL_TYPES, *MOE_TYPES))}")
        where = os.path.abspath(source)
        if not meta:
            return Source(cls.from_pretrained(source).float().train(), where, where, config)
        with torch.device("meta"):
            model = cls(cls.config_class.from_dict(config, source=path))
        return Source(model.train(), where, where, config, CheckpointWeights(model, source))
    fit = {}
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        fit = dict(vocab_size=-(-tokenizer.num_ids // 64) * 64, bos_token_id=tokenizer.bos_id,
                   eos_token_id=tokenizer.eos_id)
    if source.lower() in LLAMA_PRESETS:
        cls, config = Llama, LlamaConfig.from_name(source, **fit)
    elif source.lower() in MOE_PRESETS:
        cls, config = MoEForCausalLM, MoEConfig.from_name(source, **fit)
    else:
        raise ConfigError(f"{shown(source)}: not a checkpoint directory nor a preset; presets: "
                          f"{', '.join(sorted(LLAMA_PRESETS) + sorted(MOE_PRESETS))}")
    if not meta:
        torch.manual_seed(seed)
        return Source(cls(config).float().train(), f"preset {source}", None, None)
    with torch.device("meta"):
        model = cls(config)
    return Source(model.train(), f"preset {source}", None, None, SeededWeights(model, seed))


def source_final_lr(directory: str | None) -> float | None:
    """The learning rate the moekit run that produced checkpoint `directory` ended at: its own train_config.json's
    schedule.final_lr, else its own upcycling.json's "source_final_lr" (which the upcycler copies from the dense
    source's run); None when neither records one. Checked as --lr is."""
    if directory is None:
        return None
    run = read_side_json(directory, "train_config.json")
    schedule = (run or {}).get("schedule")
    if isinstance(schedule, dict) and schedule.get("final_lr") is not None:
        return checked_lr(schedule["final_lr"], os.path.join(directory, "train_config.json"), "schedule.final_lr")
    record = read_side_json(directory, "upcycling.json")
    if (record or {}).get("source_final_lr") is not None:
        return checked_lr(record["source_final_lr"], os.path.join(directory, "upcycling.json"), "source_final_lr")
    return None


def checked_lr(value, path: str, key: str) -> float:
    """A learning rate read from a file, valid as --lr is (a finite number, 0 < lr <= 1)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1  # NaN, inf fail
    if not ok:
        raise ConfigError(f"{path}: {key} {shown(value)} is not a learning rate moekit uses; expected a number in "
                          "(0, 1], as --lr")
    return float(value)


# ---- a run's set-up ------------------------------------------------------------------------------------------

def make_schedule(options: TrainOptions, source: Source) -> Schedule:
    """The options' schedule; what they leave out depends on whether the model is new or continues a checkpoint."""
    if source.directory is None:
        lr, warmup = options.lr or SCRATCH["lr"], options.warmup if options.warmup is not None else SCRATCH["warmup"]
    else:
        lr = options.lr or source_final_lr(source.directory) or CONTINUED["lr"]
        warmup = options.warmup if options.warmup is not None else math.ceil(
            CONTINUED["warmup_fraction"] * options.steps)
    return Schedule(lr, warmup, options.steps, options.min_lr_ratio)


def configure_moe(model: nn.Module, options: TrainOptions) -> None:
    """The MoE options that override the checkpoint's config for this run."""
    if not isinstance(model, MoEForCausalLM):
        if options.train != "all" or options.balance != "micro" or options.router_lr_mult != 1.0:
            raise ConfigError("--train experts, --balance global and --router-lr-mult apply to MoE models; this "
                              "model is dense")
        return
    for option, name in (("router_bias_rate", "router_bias_update_rate"), ("aux_loss_coef", "router_aux_loss_coef"),
                         ("z_loss_coef", "router_z_loss_coef")):
        if getattr(options, option) is not None:
            setattr(model.config, name, getattr(options, option))


def load_inputs(options: TrainOptions, accelerator) -> tuple[Source, Layout, Any, TokenData, str]:
    """(the model, how the processes split it, its tokenizer, the tokenised data, a description of the data), each
    checked against the others, and the run's memory estimated (`budget`) before the data is tokenised or anything
    large allocated. A run split across processes (--shard-degree, --expert-parallel) gets the model on the meta
    device, for `Parallel.apply` to split and fill."""
    directory = os.path.abspath(options.model) if os.path.isdir(options.model) else None
    config = read_config_json(directory) if directory else None
    tokenizer = load_tokenizer(options.tokenizer, directory, config)
    if tokenizer is None and directory is None:
        tokenizer = ByteTokenizer()
    if options.doc_separator is not None:
        if not isinstance(tokenizer, HFTokenizer):
            raise ConfigError(f"--doc-separator {options.doc_separator!r}: the "
                              f"{'bytes tokenizer has' if tokenizer else 'data are token ids and have'} no special "
                              "tokens; give a tokenizer.json that has it")
        tokenizer.set_separator(options.doc_separator)
    source = load_model(options.model, options.seed, tokenizer,
                        meta=options.shard_degree > 1 or options.expert_parallel > 1)
    mcfg = source.model.config
    layout = check_layout(accelerator.num_processes, options.shard_degree, options.expert_parallel, mcfg)
    configure_moe(source.model, options)
    if options.seq_len + 1 > mcfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {options.seq_len} needs windows of {options.seq_len + 1} tokens; the model's "
                          f"max_position_embeddings is {mcfg.max_position_embeddings}")
    if tokenizer is not None:
        check_fits(tokenizer, mcfg.vocab_size)
    check_budget(options, source.model, layout, accelerator.device)
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
        kw = dict(vocab_size=mcfg.vocab_size, text_field=options.text_field, cache_dir=options.token_cache,
                  progress=options.progress and main, write_cache=main)
        ids, data_source = load_tokens(options.data, tokenizer, **kw)
        val_ids = load_tokens(options.val_data, tokenizer, **kw)[0] if options.val_data else None
    return source, layout, tokenizer, TokenData(ids, options.seq_len, options.seed, options.data, val_ids), data_source
