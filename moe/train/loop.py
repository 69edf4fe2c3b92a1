"""The training loop: a dense Llama or an MoE causal LM with accelerate (`moekit train`, `accelerate launch -m
moekit train`, `torchrun -m moekit train`), read top to bottom like nanoGPT's.

Load the model and its tokenizer, tokenise the data once (cached), then per optimizer step: the step's windows
(the same whatever the number of processes and micro-batches), forward and backward per micro-batch, clip, AdamW,
the schedule, and for MoE the auxiliary-loss-free router bias from the step's summed expert counts. Host syncs
happen only on log, evaluation and save steps. A run lives in OUT.partial until it ends (see `state`); a loss
that turns non-finite stops it with the last good state kept for --resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError, MoekitError
from moekit.llama.io import check_disjoint, config_path, read_config_json, read_json, write_json
from moekit.llama.model import Llama
from moekit.moe import formats
from moekit.moe.config import MOE_PRESETS, MoEConfig
from moekit.moe.model import MoEForCausalLM

from .data import TokenData, load_tokens
from .metrics import (
    Interval,
    device_peak_flops,
    flat_scalars,
    mfu,
    perplexity,
    routing_entry,
    trackers,
    train_flops_per_token,
)
from .optim import Schedule, make_optimizer
from .options import CONTINUED, SCRATCH, TrainOptions
from .state import WorkDir, gathered, save_complete
from .tokenizer import ByteTokenizer, check_fits, load_tokenizer

MOE_TYPES = ("moe", *formats.FORMATS)  # moekit's own model_type and the checkpoint formats


class TrainingDiverged(MoekitError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped, eval mode)
    steps: int
    tokens: int  # training tokens seen, all processes
    train_loss: float  # mean loss of the last logging interval (MoE: with router losses)
    val_loss: float  # validation LM loss at the end
    initial_val_loss: float  # ... before the first step (of the first run, when resumed)
    seconds: float
    metrics: list[dict]
    out: str | None


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
        if model_type == "llama":
            model = Llama.from_pretrained(source)
        elif model_type in MOE_TYPES:
            model = MoEForCausalLM.from_pretrained(source)
        else:
            raise CheckpointError(f"{path}: model_type {model_type!r} cannot be trained; expected llama, mixtral or "
                                  "qwen2_moe")
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
    for option, field in (("router_bias_rate", "router_bias_update_rate"), ("aux_loss_coef", "router_aux_loss_coef"),
                          ("z_loss_coef", "router_z_loss_coef")):
        if getattr(options, option) is not None:
            setattr(model.config, field, getattr(options, option))


@torch.no_grad()
def evaluate(model, data: TokenData, options: TrainOptions, accelerator) -> float:
    """Mean validation LM loss (router losses excluded) over the fixed validation windows."""
    model.eval()
    losses = []
    for ids in data.val_batches(options.eval_batches, options.batch_size, accelerator.process_index,
                                accelerator.num_processes):
        out = model(ids.to(accelerator.device), labels=ids.to(accelerator.device), return_logits=False)
        losses.append(out.lm_loss if hasattr(out, "lm_loss") else out.loss)
    model.train()
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def check_finite(loss: float, step: int, shown: str | None = None) -> None:
    """TrainingDiverged naming `shown` (default: the value) unless `loss` is finite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the training loss became {shown or loss} by step {step}; lower --lr or check the "
                               "data and the source weights")


def train(options: TrainOptions, log=print, given: set[str] | None = None) -> TrainResult:
    """Train as `options` say; write OUT (see `moe.train.state`) unless `options.out` is None. `given`: the
    options the user typed (command line), which a --resume keeps over the interrupted run's."""
    from accelerate import Accelerator

    options.validate()
    try:
        accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=not torch.cuda.is_available(),
                                  log_with=trackers(options.report_to) or None)
    except (RuntimeError, ValueError) as e:  # e.g. FSDP asked for on a machine without GPUs
        raise ConfigError(f"accelerate cannot set up this launch: {str(e).strip().splitlines()[0]}") from None
    main = accelerator.is_main_process
    work = WorkDir(options.out, main) if options.out else None
    try:
        return _train(options, accelerator, work, log, given)
    finally:
        if work:
            work.release()  # on every way out (a resumed run's lock, an error before training starts)


def _train(options: TrainOptions, accelerator, work: WorkDir | None, log, given: set[str] | None) -> TrainResult:
    from accelerate.utils import set_seed

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    resume_from = None
    if work and options.resume:
        work.reopen()
        options = work.resumed_options(options, given)
        resume_from = work.last_state()
    elif work:
        work.check_new(options.force)
    if work and os.path.isdir(options.model):
        check_disjoint(options.model, options.out, "MODEL", "--out")

    # ---- model, tokenizer, data: everything checked before anything is written -----------------------------
    directory = os.path.abspath(options.model) if os.path.isdir(options.model) else None
    config = read_config_json(directory) if directory else None
    tokenizer = load_tokenizer(options.tokenizer, directory, config)
    if tokenizer is None and directory is None:
        tokenizer = ByteTokenizer()
    source = load_model(options.model, options.seed, tokenizer)
    model, mcfg = source.model, source.model.config
    is_moe = isinstance(model, MoEForCausalLM)
    configure_moe(model, options)
    if options.seq_len + 1 > mcfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {options.seq_len} needs windows of {options.seq_len + 1} tokens; the model's "
                          f"max_position_embeddings is {mcfg.max_position_embeddings}")
    if tokenizer is not None:
        check_fits(tokenizer, mcfg.vocab_size)
    with accelerator.main_process_first():
        kw = dict(vocab_size=mcfg.vocab_size, text_field=options.text_field, cache_dir=options.token_cache,
                  progress=options.progress and main, write_cache=main)
        ids, data_source = load_tokens(options.data, tokenizer, **kw)
        val_ids = load_tokens(options.val_data, tokenizer, **kw)[0] if options.val_data else None
    data = TokenData(ids, options.seq_len, options.seed, options.data, val_ids)
    schedule = make_schedule(options, source)
    flops_per_token = train_flops_per_token(model, options.seq_len)
    peak = options.peak_flops or device_peak_flops(accelerator.device, options.mixed_precision)

    # ---- optimizer, state, work directory -----------------------------------------------------------------------
    set_seed(options.seed)
    optimizer, scheduler = make_optimizer(model, schedule, options.weight_decay, (options.beta1, options.beta2),
                                          options.router_lr_mult, options.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    B, A, S = options.batch_size, options.grad_accum, options.seq_len
    tokens_per_step = B * A * world * S
    metrics: list[dict] = []
    interval, start_step, initial_val = Interval(), 0, None
    if resume_from is not None:
        accelerator.load_state(resume_from[1])
        with open(os.path.join(resume_from[1], "progress.json")) as f:
            progress = json.load(f)
        start_step = progress["step"]
        scheduler.load_state_dict(progress["scheduler"])
        interval.load(progress["interval"], accelerator.device)
    if work:
        if options.resume:  # without a saved state the run starts over: nothing of it is kept
            metrics = work.truncate_metrics(start_step if resume_from is not None else -1)
        else:
            work.create()
        accelerator.wait_for_everyone()
        work.write_options(options, {"source": source.description, "data_source": data_source,
                                     "tokenizer": tokenizer.name if tokenizer else None,
                                     "schedule": {**dataclasses.asdict(schedule), "final_lr": schedule.lr_at(
                                         options.steps - 1)}, "processes": world})
    initial_val = next((m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m), None)
    if accelerator.log_with:
        accelerator.init_trackers("moekit", config={k: v for k, v in dataclasses.asdict(options).items()
                                                    if isinstance(v, (int, float, str, bool))})

    def record(entry: dict) -> None:
        metrics.append(entry)
        if work:
            work.append_metrics(entry)
        if accelerator.log_with:
            accelerator.log(flat_scalars(entry), step=entry["step"])

    if main and log:
        log(f"training {source.description}: {raw.num_parameters():,} parameters, {world} process(es), "
            f"{tokens_per_step:,} tokens per step; {schedule.describe()}")
    try:
        start = last_time = time.perf_counter()
        val, train_loss = float("nan"), float("nan")
        if start_step == 0:
            initial_val = val = evaluate(model, data, options, accelerator)
            record({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": round(perplexity(val), 4)})
        from tqdm.auto import tqdm

        bar = tqdm(range(start_step + 1, options.steps + 1), desc="train", unit="step", initial=start_step,
                   total=options.steps, disable=not (options.progress and main))
        for step in bar:
            batch = data.train_batch(step, B, A, rank, world)  # [A*B, S+1]
            if accelerator.device.type == "cuda":  # an asynchronous copy: no wait for the previous step's work
                batch = batch.pin_memory().to(accelerator.device, non_blocking=True)
            else:
                batch = batch.to(accelerator.device)
            counts = None  # [L_moe, E] token copies per expert over the step's micro-batches
            for i, ids in enumerate(batch.split(B)):  # micro-batches [B, S+1]
                with accelerator.no_sync(model) if i < A - 1 else nullcontext():
                    out = model(ids, labels=ids, return_logits=False,  # the loss fused with the LM head
                                **({"global_balance": True} if options.balance == "global" else {}))
                    accelerator.backward(out.loss / A)
                interval.add("loss", out.loss / A)
                if is_moe:
                    for name in ("lm_loss", "aux_loss", "z_loss"):
                        interval.add(name, getattr(out, name) / A)
                    interval.add_routing(out.router_stats, 1 / A)
                    c = out.router_stats.tokens_per_expert
                    counts = c if counts is None else counts + c
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.grad_clip or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if is_moe and raw.config.router_bias_update_rate:
                raw.update_router_bias(accelerator.reduce(counts, "sum"))  # once per optimizer step
            interval.add("grad_norm", grad_norm.float())
            interval.steps += 1

            entry = {}
            if step % options.log_every == 0 or step == options.steps:  # the host syncs of the loop
                n = interval.steps
                values = interval.report(lambda v: accelerator.reduce(v, "mean"), lambda v: accelerator.reduce(v, "sum"))
                now = time.perf_counter()  # after the sync in report: the interval's device work is done
                train_loss = values["loss"]
                check_finite(train_loss, step)
                tokens_per_s = n * tokens_per_step / (now - last_time)
                lm = values.get("lm_loss", train_loss)
                entry = {"lr": lr, "loss": train_loss, "ppl": round(perplexity(lm), 4),
                         **{k: values[k] for k in ("lm_loss", "aux_loss", "z_loss") if k in values},
                         "grad_norm": values["grad_norm"], "tokens_per_s": round(tokens_per_s, 1),
                         "mfu": mfu(flops_per_token, tokens_per_s, peak, world)}
                if torch.cuda.is_available():
                    entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
                if is_moe:
                    entry.update(routing_entry(values))
                last_time = now
            if (options.eval_every and step % options.eval_every == 0) or step == options.steps:
                val = evaluate(model, data, options, accelerator)
                entry.update(val_loss=val, val_ppl=round(perplexity(val), 4))
                last_time = time.perf_counter()  # tokens/s leaves evaluation out
            if entry:
                record({"step": step, "tokens": step * tokens_per_step, **entry})
                bar.set_postfix_str(f"loss {train_loss:.4f} val {val:.4f} lr {lr:.2e}")
            if work and options.save_every and step % options.save_every == 0 and step < options.steps:
                if interval.steps:  # every process decides on the same (summed) value, so none waits alone
                    check_finite(accelerator.reduce(interval.sums["loss"], "sum").item(), step, "non-finite")
                save_state(accelerator, work, model, step, scheduler, interval, options, source, tokenizer)
                last_time = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - start
        accelerator.wait_for_everyone()
        model = gathered(accelerator, model)
        if accelerator.log_with:
            accelerator.end_training()
        result = TrainResult(model, options.steps, options.steps * tokens_per_step, train_loss, val,
                             initial_val if initial_val is not None else float("nan"), seconds, metrics,
                             work.out if work else None)
        if work and main:
            save_complete(model, work.path, options.save_dtype, source.directory, source.config, tokenizer)
            config = read_json(os.path.join(work.path, "train_config.json"), "train_config.json")
            write_json(os.path.join(work.path, "train_config.json"), {
                **config, "model_type": model.config.model_type, "parameters": model.num_parameters(),
                "tokens": result.tokens, "seconds": round(seconds, 3), "train_loss": train_loss,
                "initial_val_loss": result.initial_val_loss, "val_loss": val})
        if work:
            work.finish(options.force)
    except (MoekitError, KeyboardInterrupt) as e:
        if work and work.abandon():
            last = work.last_state()
            raise type(e)(f"{e}{'; ' if str(e) else ''}{work.path} keeps the state of step {last[0]}: continue "
                          f"with `moekit train --resume --out {options.out}`") from None
        raise
    except BaseException:
        if work:
            work.abandon()
        raise
    if log and main:
        log(summary_line(result, source.description))
    return result


def save_state(accelerator, work: WorkDir, model: nn.Module, step: int, scheduler, interval: Interval,
               options: TrainOptions, source: Source, tokenizer) -> None:
    """Every --save-every steps: a complete checkpoint OUT.partial/step-N and the training state for --resume."""
    full = gathered(accelerator, model)
    if accelerator.is_main_process:
        directory = os.path.join(work.path, f"step-{step:06d}")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        save_complete(full, directory, options.save_dtype, source.directory, source.config, tokenizer)
    full.train()
    progress = {"step": step, "scheduler": scheduler.state_dict(), "interval": interval.state()}
    work.save_state(accelerator, step, options.keep_last, progress)


def summary_line(r: TrainResult, source: str) -> str:
    where = f"; wrote {r.out}" if r.out else ""
    return (f"trained {source}: {r.steps} steps, {r.tokens:,} tokens in {r.seconds:.1f} s "
            f"({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s); train loss {r.train_loss:.4f}, "
            f"val loss {r.initial_val_loss:.4f} -> {r.val_loss:.4f}{where}")
