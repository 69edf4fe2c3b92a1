"""The training loop: a dense Llama or an MoE causal LM with accelerate (`moekit train`, `accelerate launch -m
moekit train`, `torchrun -m moekit train`), read top to bottom like nanoGPT's, in phases like torchtitan's:

    train(options)            the accelerator and OUT's lock; release the lock on every way out
      open_work               --resume: the interrupted run's options and last state; else a new OUT
      start_run -> Run        model, tokenizer and data (all checked before anything is written), optimizer,
                              the resumed state, OUT.partial
      run_steps               per optimizer step: train_step, then log_entry / evaluate / save_state when due
        train_step            the step's windows (the same whatever the number of processes and micro-batches),
                              forward_backward per micro-batch, clip, AdamW, the schedule, the MoE router bias
      finish_run              gather the model, write the complete checkpoint, publish OUT

Host syncs happen only on log, evaluation and save steps. A run lives in OUT.partial until it ends (see `state`);
a loss that turns non-finite stops it with the last good state kept for --resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.llama.errors import ConfigError, MoekitError
from moekit.llama.io import check_inputs, read_config_json, read_json, write_json
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
from .source import Source, load_model, source_final_lr
from .state import WorkDir, gathered, save_complete
from .tokenizer import ByteTokenizer, check_fits, load_tokenizer


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
class Run:
    """A run between its steps: what it trains on, the prepared model and optimizer, and its metrics so far."""

    options: TrainOptions
    accelerator: Any
    work: WorkDir | None
    source: Source
    tokenizer: Any
    data: TokenData
    schedule: Schedule
    model: nn.Module  # as accelerate prepared it (wrapped for data parallelism under several processes)
    raw: nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any  # the LambdaLR of `schedule`
    flops_per_token: float
    peak: float | None  # peak FLOP/s of one device, for MFU
    interval: Interval = field(default_factory=Interval)  # sums since the last log line
    metrics: list[dict] = field(default_factory=list)
    start_step: int = 0  # the step a resumed run saved
    initial_val: float | None = None  # validation loss before the first step
    last_time: float = 0.0  # when the current logging interval started (tokens/s)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.raw, MoEForCausalLM)

    @property
    def tokens_per_step(self) -> int:
        o = self.options
        return o.batch_size * o.grad_accum * self.accelerator.num_processes * o.seq_len

    def record(self, entry: dict) -> None:
        """A metrics line: kept, appended to OUT's metrics.jsonl, sent to the trackers."""
        self.metrics.append(entry)
        if self.work:
            self.work.append_metrics(entry)
        if self.accelerator.log_with:
            self.accelerator.log(flat_scalars(entry), step=entry["step"])


# ---- set-up --------------------------------------------------------------------------------------------------

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


def open_work(options: TrainOptions, work: WorkDir | None, given: set[str] | None):
    """(options, the last saved state (step, path) or None): with --resume, the interrupted run's options (those
    typed now on top) and state; else a check that OUT may be written."""
    if work is None:
        return options, None
    resume_from = None
    if options.resume:
        work.reopen()
        options = work.resumed_options(options, given)
        resume_from = work.last_state()
    inputs = [("MODEL", options.model), ("--data", options.data), ("--val-data", options.val_data),
              ("--tokenizer", options.tokenizer)]
    for out in (work.out, work.path):  # no input is OUT or OUT.partial, inside them, or holds them
        check_inputs(out, "--out", inputs)
    if not options.resume:
        work.check_new(options.force)
    return options, resume_from


def load_inputs(options: TrainOptions, accelerator) -> tuple[Source, Any, TokenData, str]:
    """(the model, its tokenizer, the tokenised data, a description of the data), each checked against the others."""
    directory = os.path.abspath(options.model) if os.path.isdir(options.model) else None
    config = read_config_json(directory) if directory else None
    tokenizer = load_tokenizer(options.tokenizer, directory, config)
    if tokenizer is None and directory is None:
        tokenizer = ByteTokenizer()
    source = load_model(options.model, options.seed, tokenizer)
    mcfg = source.model.config
    configure_moe(source.model, options)
    if options.seq_len + 1 > mcfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {options.seq_len} needs windows of {options.seq_len + 1} tokens; the model's "
                          f"max_position_embeddings is {mcfg.max_position_embeddings}")
    if tokenizer is not None:
        check_fits(tokenizer, mcfg.vocab_size)
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
        kw = dict(vocab_size=mcfg.vocab_size, text_field=options.text_field, cache_dir=options.token_cache,
                  progress=options.progress and main, write_cache=main)
        ids, data_source = load_tokens(options.data, tokenizer, **kw)
        val_ids = load_tokens(options.val_data, tokenizer, **kw)[0] if options.val_data else None
    return source, tokenizer, TokenData(ids, options.seq_len, options.seed, options.data, val_ids), data_source


def start_run(options: TrainOptions, accelerator, work: WorkDir | None, resume_from) -> Run:
    """The run, ready for its first (or resumed) step; OUT.partial created (or reopened) and its options written."""
    from accelerate.utils import set_seed

    source, tokenizer, data, data_source = load_inputs(options, accelerator)
    schedule = make_schedule(options, source)
    flops_per_token = train_flops_per_token(source.model, options.seq_len)
    peak = options.peak_flops or device_peak_flops(accelerator.device, options.mixed_precision)
    set_seed(options.seed)
    optimizer, scheduler = make_optimizer(source.model, schedule, options.weight_decay, (options.beta1, options.beta2),
                                          options.router_lr_mult, options.train)
    model, optimizer = accelerator.prepare(source.model, optimizer)
    run = Run(options, accelerator, work, source, tokenizer, data, schedule, model, accelerator.unwrap_model(model),
              optimizer, scheduler, flops_per_token, peak)
    if resume_from is not None:
        restore(run, resume_from[1])
    if work:
        if options.resume:  # without a saved state the run starts over: nothing of it is kept
            run.metrics = work.truncate_metrics(run.start_step if resume_from is not None else -1)
        else:
            work.create()
        accelerator.wait_for_everyone()
        work.write_options(options, {"source": source.description, "data_source": data_source,
                                     "tokenizer": tokenizer.name if tokenizer else None,
                                     "schedule": {**dataclasses.asdict(schedule), "final_lr": schedule.lr_at(
                                         options.steps - 1)}, "processes": accelerator.num_processes})
    run.initial_val = next((m["val_loss"] for m in run.metrics if m.get("step") == 0 and "val_loss" in m), None)
    if accelerator.log_with:
        accelerator.init_trackers("moekit", config={k: v for k, v in dataclasses.asdict(options).items()
                                                    if isinstance(v, (int, float, str, bool))})
    return run


def restore(run: Run, path: str) -> None:
    """The model, optimizer and RNG states, the schedule and the open logging interval saved at `path`."""
    run.accelerator.load_state(path)
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    run.start_step = progress["step"]
    run.scheduler.load_state_dict(progress["scheduler"])
    run.interval.load(progress["interval"], run.accelerator.device)


# ---- the step ------------------------------------------------------------------------------------------------

def forward_backward(run: Run, batch: torch.Tensor) -> torch.Tensor | None:
    """Forward and backward of each micro-batch of `batch` [A*B, S+1] (gradients synchronised on the last one);
    the losses and routing into the interval. Returns the token copies per expert [L_moe, E] (MoE) or None."""
    o, acc, model = run.options, run.accelerator, run.model
    A, counts = o.grad_accum, None
    for i, ids in enumerate(batch.split(o.batch_size)):  # micro-batches [B, S+1]
        with acc.no_sync(model) if i < A - 1 else nullcontext():
            out = model(ids, labels=ids, return_logits=False,  # the loss fused with the LM head
                        **({"global_balance": True} if o.balance == "global" else {}))
            acc.backward(out.loss / A)
        run.interval.add("loss", out.loss / A)
        if run.is_moe:
            for name in ("lm_loss", "aux_loss", "z_loss"):
                run.interval.add(name, getattr(out, name) / A)
            run.interval.add_routing(out.router_stats, 1 / A)
            c = out.router_stats.tokens_per_expert
            counts = c if counts is None else counts + c
    return counts


def train_step(run: Run, step: int) -> float:
    """One optimizer step; returns the learning rate it used."""
    o, acc = run.options, run.accelerator
    batch = run.data.train_batch(step, o.batch_size, o.grad_accum, acc.process_index, acc.num_processes)
    if acc.device.type == "cuda":  # an asynchronous copy: no wait for the previous step's work
        batch = batch.pin_memory().to(acc.device, non_blocking=True)
    else:
        batch = batch.to(acc.device)
    counts = forward_backward(run, batch)
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), o.grad_clip or float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.is_moe and run.raw.config.router_bias_update_rate:
        run.raw.update_router_bias(acc.reduce(counts, "sum"))  # once per optimizer step
    run.interval.add("grad_norm", grad_norm.float())
    run.interval.steps += 1
    return lr


def log_entry(run: Run, step: int, lr: float) -> dict:
    """The metrics of the interval since the last log line, reduced over the processes (the loop's host sync)."""
    acc, n = run.accelerator, run.interval.steps
    values = run.interval.report(lambda v: acc.reduce(v, "mean"), lambda v: acc.reduce(v, "sum"))
    now = time.perf_counter()  # after the sync in report: the interval's device work is done
    check_finite(values["loss"], step)
    tokens_per_s = n * run.tokens_per_step / (now - run.last_time)
    entry = {"lr": lr, "loss": values["loss"], "ppl": round(perplexity(values.get("lm_loss", values["loss"])), 4),
             **{k: values[k] for k in ("lm_loss", "aux_loss", "z_loss") if k in values},
             "grad_norm": values["grad_norm"], "tokens_per_s": round(tokens_per_s, 1),
             "mfu": mfu(run.flops_per_token, tokens_per_s, run.peak, acc.num_processes)}
    if torch.cuda.is_available():
        entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    if run.is_moe:
        entry.update(routing_entry(values))
    run.last_time = now
    return entry


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


def save_state(run: Run, step: int) -> None:
    """Every --save-every steps: a complete checkpoint OUT.partial/step-N and the training state for --resume."""
    acc, work, o = run.accelerator, run.work, run.options
    if run.interval.steps:  # every process decides on the same (summed) value, so none waits alone
        check_finite(acc.reduce(run.interval.sums["loss"], "sum").item(), step, "non-finite")
    full = gathered(acc, run.model)
    if acc.is_main_process:
        directory = os.path.join(work.path, f"step-{step:06d}")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        save_complete(full, directory, o.save_dtype, run.source.directory, run.source.config, run.tokenizer)
    full.train()
    progress = {"step": step, "scheduler": run.scheduler.state_dict(), "interval": run.interval.state()}
    work.save_state(acc, step, o.keep_last, progress)


# ---- the run -------------------------------------------------------------------------------------------------

def run_steps(run: Run) -> tuple[float, float, float]:
    """Every step from the resumed one to the last, with its logging, evaluation and saving: (last train loss,
    last validation loss, seconds)."""
    from tqdm.auto import tqdm

    o, acc = run.options, run.accelerator
    start = run.last_time = time.perf_counter()
    val, train_loss = float("nan"), float("nan")
    if run.start_step == 0:
        run.initial_val = val = evaluate(run.model, run.data, o, acc)
        run.record({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": round(perplexity(val), 4)})
    bar = tqdm(range(run.start_step + 1, o.steps + 1), desc="train", unit="step", initial=run.start_step,
               total=o.steps, disable=not (o.progress and acc.is_main_process))
    for step in bar:
        lr = train_step(run, step)
        entry = {}
        if step % o.log_every == 0 or step == o.steps:
            entry = log_entry(run, step, lr)
            train_loss = entry["loss"]
        if (o.eval_every and step % o.eval_every == 0) or step == o.steps:
            val = evaluate(run.model, run.data, o, acc)
            entry.update(val_loss=val, val_ppl=round(perplexity(val), 4))
            run.last_time = time.perf_counter()  # tokens/s leaves evaluation out
        if entry:
            run.record({"step": step, "tokens": step * run.tokens_per_step, **entry})
            bar.set_postfix_str(f"loss {train_loss:.4f} val {val:.4f} lr {lr:.2e}")
        if run.work and o.save_every and step % o.save_every == 0 and step < o.steps:
            save_state(run, step)
            run.last_time = time.perf_counter()
    bar.close()
    return train_loss, val, time.perf_counter() - start


def finish_run(run: Run, train_loss: float, val: float, seconds: float) -> TrainResult:
    """The trained model gathered on every process; OUT written (the complete checkpoint and the run's summary
    in train_config.json) and published."""
    o, acc, work = run.options, run.accelerator, run.work
    acc.wait_for_everyone()
    model = gathered(acc, run.model)
    if acc.log_with:
        acc.end_training()
    result = TrainResult(model, o.steps, o.steps * run.tokens_per_step, train_loss, val,
                         run.initial_val if run.initial_val is not None else float("nan"), seconds, run.metrics,
                         work.out if work else None)
    if work and acc.is_main_process:
        save_complete(model, work.path, o.save_dtype, run.source.directory, run.source.config, run.tokenizer)
        path = os.path.join(work.path, "train_config.json")
        write_json(path, {**read_json(path, "train_config.json"), "model_type": model.config.model_type,
                          "parameters": model.num_parameters(), "tokens": result.tokens,
                          "seconds": round(seconds, 3), "train_loss": train_loss,
                          "initial_val_loss": result.initial_val_loss, "val_loss": val})
    if work:
        work.finish(o.force)
    return result


def train(options: TrainOptions, log=print, given: set[str] | None = None) -> TrainResult:
    """Train as `options` say; write OUT (see `moekit.moe.train.state`) unless `options.out` is None. `given`: the
    options the user typed (command line), which a --resume keeps over the interrupted run's."""
    from accelerate import Accelerator

    options.validate()
    try:
        accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=not torch.cuda.is_available(),
                                  log_with=trackers(options.report_to) or None)
    except (RuntimeError, ValueError) as e:  # e.g. a launch configuration this machine cannot run
        raise ConfigError(f"accelerate cannot set up this launch: {str(e).strip().splitlines()[0]}") from None
    work = WorkDir(options.out, accelerator.is_main_process) if options.out else None
    try:
        options, resume_from = open_work(options, work, given)
        run = start_run(options, accelerator, work, resume_from)
        if log and accelerator.is_main_process:
            log(f"training {run.source.description}: {run.raw.num_parameters():,} parameters, "
                f"{accelerator.num_processes} process(es), {run.tokens_per_step:,} tokens per step; "
                f"{run.schedule.describe()}")
        result = _run(run)
    finally:
        if work:
            work.release()  # on every way out (a resumed run's lock, an error before training starts)
    if log and accelerator.is_main_process:
        log(summary_line(result, run.source.description))
    return result


def _run(run: Run) -> TrainResult:
    """run_steps then finish_run; on an error or Ctrl-C, OUT.partial keeps the last saved state (named in the
    error) or, with none saved, is removed."""
    work = run.work
    try:
        return finish_run(run, *run_steps(run))
    except (MoekitError, KeyboardInterrupt) as e:
        if work and work.abandon():
            last = work.last_state()
            raise type(e)(f"{e}{'; ' if str(e) else ''}{work.path} keeps the state of step {last[0]}: continue "
                          f"with `moekit train --resume --out {run.options.out}`") from None
        raise
    except BaseException:
        if work:
            work.abandon()
        raise


def summary_line(r: TrainResult, source: str) -> str:
    where = f"; wrote {r.out}" if r.out else ""
    return (f"trained {source}: {r.steps} steps, {r.tokens:,} tokens in {r.seconds:.1f} s "
            f"({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s); train loss {r.train_loss:.4f}, "
            f"val loss {r.initial_val_loss:.4f} -> {r.val_loss:.4f}{where}")
