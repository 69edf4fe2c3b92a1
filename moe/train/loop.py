"""The training loop: a dense Llama or an MoE causal LM with accelerate (`moekit train`, `accelerate launch -m
moekit train`, `torchrun -m moekit train`), read top to bottom like nanoGPT's, in phases like torchtitan's:

    train(options)            the accelerator and OUT's lock; release the lock on every way out
      open_work               --resume: the interrupted run's options (see `resume`); else a new OUT
      start_run -> Run        model, tokenizer and data (all checked, and the memory estimated, before anything is
                              written), optimizer, the newest complete state (`resume.restore`), OUT.partial
      run_steps               per optimizer step: train_step, then log_entry / evaluate / save_state when due
        train_step            the step's windows (the same whatever the number of processes and micro-batches),
                              forward_backward per micro-batch, clip, AdamW, the schedule, the MoE router bias
      finish_run              gather the model, write the complete checkpoint, publish OUT

Host syncs happen only on log, evaluation and save steps. A run lives in OUT.partial until it ends (see `state`);
a loss that turns non-finite stops it with the last good state kept for --resume, and OUT is never published with
a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.llama.checkpoint import dtype_from_name
from moekit.llama.errors import ConfigError, MoekitError
from moekit.llama.io import check_inputs, read_side_json
from moekit.moe.model import MoEForCausalLM

from . import sharded
from .data import TokenData
from .metrics import (
    Interval,
    device_peak_flops,
    flat_scalars,
    mfu,
    perplexity,
    routing_entry,
    trackers,
    train_flops_per_token,
    train_state_bytes,
)
from .optim import Schedule, make_optimizer
from .options import TrainOptions
from .parallel import Parallel, resharded, return_large_frees
from .resume import real_paths, restore, resume_command, resumed_options
from .source import Source, load_inputs, make_schedule
from .state import WorkDir, gathered, save_complete, saved_dtype, write_json
from .weights import persistent_buffers


class TrainingDiverged(MoekitError):
    """The loss became NaN or infinite."""


# The run says so when rounding the trained weights to the saved dtype loses more than this share of its gain in
# validation loss. The default --save-dtype (the source's) stays: an output the size and dtype of its source that
# loads like it, and a user told, with the figures, when fp32 would keep what training bought.
ROUNDING_SHARE = 0.1


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped, eval mode; still split when trained with `parallel`)
    steps: int
    tokens: int  # training tokens seen, all processes
    train_loss: float  # mean loss of the last logging interval (MoE: with router losses)
    val_loss: float  # validation LM loss at the end
    initial_val_loss: float  # ... before the first step (of the first run, when resumed)
    seconds: float
    metrics: list[dict]
    out: str | None
    start_step: int = 0  # the step this run resumed at (0: it started at the beginning)
    val_loss_unrounded: float | None = None  # val_loss of the fp32 weights, when OUT holds them rounded
    saved_dtype: str | None = None  # the dtype of OUT's weights
    note: str | None = None  # what the rounding to saved_dtype cost, when it cost much


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
    model: nn.Module  # as accelerate prepared it (wrapped for data parallelism), or sharded by `parallel`
    raw: nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any  # the LambdaLR of `schedule`
    flops_per_token: float
    peak: float | None  # peak FLOP/s of one device, for MFU
    parameters: int  # of the whole model, however it is split
    parallel: Parallel | None  # sharded or expert-parallel (None: replicated by accelerate)
    interval: Interval = field(default_factory=Interval)  # sums since the last log line
    metrics: list[dict] = field(default_factory=list)
    start_step: int = 0  # the step a resumed run saved
    initial_val: float | None = None  # validation loss before the first step
    last_time: float = 0.0  # when the current logging interval started (tokens/s)
    untimed_steps: int = 0  # steps of the interval trained before a resume (not in this run's time)
    setup_memory_gb: float | None = None  # peak memory once set up (the model loaded and split), until logged

    @property
    def is_moe(self) -> bool:
        return isinstance(self.raw, MoEForCausalLM)

    @property
    def sequences_per_step(self) -> int:
        o = self.options
        return o.batch_size * o.grad_accum * self.accelerator.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.options.seq_len

    def record(self, entry: dict) -> None:
        """A metrics line: kept, appended to OUT's metrics.jsonl, sent to the trackers."""
        self.metrics.append(entry)
        if self.work:
            self.work.append_metrics(entry)
        if self.accelerator.log_with:
            self.accelerator.log(flat_scalars(entry), step=entry["step"])


# ---- set-up --------------------------------------------------------------------------------------------------

def open_work(options: TrainOptions, work: WorkDir | None, given: set[str] | None,
              processes: int) -> tuple[TrainOptions, str | None]:
    """(options, a line for the log or None): with --resume, the interrupted run's options (those typed now on top,
    its global batch kept under another number of processes); else the options with real paths (what
    train_config.json records) and a check that OUT may be written."""
    if work is None:
        return options, None
    note = None
    if options.resume:
        work.reopen()
        options, note = resumed_options(work.path, options, given, processes)
    else:
        options = real_paths(options)
    inputs = [("MODEL", options.model), ("--data", options.data), ("--val-data", options.val_data),
              ("--tokenizer", options.tokenizer)]
    for out in (work.out, work.path):  # no input is OUT or OUT.partial, inside them, or holds them
        check_inputs(out, "--out", inputs)
    if not options.resume:
        work.check_new(options.force)
    return options, note


def start_run(options: TrainOptions, accelerator, work: WorkDir | None, log=None) -> Run:
    """The run, ready for its first (or resumed) step; OUT.partial created (or reopened) and its options written."""
    from accelerate.utils import set_seed

    if (options.shard_degree > 1 or options.expert_parallel > 1) and accelerator.device.type == "cpu":
        return_large_frees()  # before anything large is allocated
    source, layout, tokenizer, data, data_source = load_inputs(options, accelerator)
    schedule = make_schedule(options, source)
    flops_per_token = train_flops_per_token(source.model, options.seq_len)
    peak = options.peak_flops or device_peak_flops(accelerator.device, options.mixed_precision)
    parameters, parallel, model = source.model.num_parameters(), None, source.model
    set_seed(options.seed)
    if layout.parallel:
        parallel = Parallel.apply(model, layout, accelerator.device, source.weights, options.mixed_precision,
                                  options.activation_checkpointing)
    else:
        model.model.checkpoint_layers = options.activation_checkpointing
    optimizer, scheduler = make_optimizer(model, schedule, options.weight_decay, (options.beta1, options.beta2),
                                          options.router_lr_mult, options.train)
    if parallel is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(options, accelerator, work, source, tokenizer, data, schedule, model, accelerator.unwrap_model(model),
              optimizer, scheduler, flops_per_token, peak, parameters, parallel)
    restored = bool(work and options.resume) and restore(run, log)
    if work:
        if options.resume:  # without a saved state the run starts over: nothing of it is kept
            run.metrics = work.truncate_metrics(run.start_step if restored else -1)
        else:
            work.create()
        accelerator.wait_for_everyone()
        work.write_options(options, {"source": source.description, "data_source": data_source,
                                     "tokenizer": tokenizer.name if tokenizer else None,
                                     "schedule": {**dataclasses.asdict(schedule), "final_lr": schedule.lr_at(
                                         options.steps - 1)}, "processes": accelerator.num_processes,
                                     "layout": layout.describe()})
    run.initial_val = next((m["val_loss"] for m in run.metrics if m.get("step") == 0 and "val_loss" in m), None)
    run.setup_memory_gb = peak_memory_gb(accelerator)
    if accelerator.log_with:
        accelerator.init_trackers("moekit", config={k: v for k, v in dataclasses.asdict(options).items()
                                                    if isinstance(v, (int, float, str, bool))})
    return run


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
    if run.parallel:
        run.parallel.reduce_gradients(run.model)
        grad_norm = run.parallel.clip_grad_norm(run.model, o.grad_clip or float("inf"))
    else:
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
    tokens_per_s = (n - run.untimed_steps) * run.tokens_per_step / (now - run.last_time)
    run.untimed_steps = 0
    entry = {"lr": lr, "loss": values["loss"], "ppl": round(perplexity(values.get("lm_loss", values["loss"])), 4),
             **{k: values[k] for k in ("lm_loss", "aux_loss", "z_loss") if k in values},
             "grad_norm": values["grad_norm"], "tokens_per_s": round(tokens_per_s, 1),
             "mfu": mfu(run.flops_per_token, tokens_per_s, run.peak, acc.num_processes)}
    entry["peak_memory_gb"] = peak_memory_gb(acc)
    entry["train_state_gb"] = largest(acc, train_state_bytes(run.model, run.optimizer))
    if run.setup_memory_gb is not None:  # this run's first line
        entry["setup_memory_gb"], run.setup_memory_gb = run.setup_memory_gb, None
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
    resharded(model).train()  # FSDP2 leaves the root gathered after a forward without backward
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def check_finite(loss: float, step: int, shown: str | None = None, what: str = "training loss") -> None:
    """TrainingDiverged naming `shown` (default: the value) unless `loss` is finite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the {what} became {shown or loss} by step {step}; lower --lr or check the "
                               "data and the source weights")


def last_logged(metrics: list[dict], key: str) -> float:
    """The last finite number logged as `key` (a resumed run's progress bar shows it), else NaN."""
    return next((m[key] for m in reversed(metrics) if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])),
                float("nan"))


def save_state(run: Run, step: int) -> None:
    """Every --save-every steps: a complete checkpoint OUT.partial/step-N and the training state for --resume."""
    acc, work, o = run.accelerator, run.work, run.options
    if run.interval.steps:  # every process decides on the same (summed) value, so none waits alone
        check_finite(acc.reduce(run.interval.sums["loss"], "sum").item(), step, "non-finite")
    directory = os.path.join(work.path, f"step-{step:06d}")
    if acc.is_main_process:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    write_checkpoint(run, directory).train()
    progress = {"step": step, "seq_len": o.seq_len, "global_batch": run.sequences_per_step,
                "processes": acc.num_processes, "interval": run.interval.state()}
    write = (lambda d: sharded.save(d, run.raw, run.optimizer, acc.process_index)) if run.parallel else None
    work.save_state(acc, step, o.keep_last, progress, write)


def evaluate_as_saved(run: Run, val: float, dtype: str) -> tuple[float, str | None]:
    """The validation loss of the weights as OUT holds them: every saved tensor of the trained model rounded in place
    to `dtype` (elementwise, so shards too), evaluated as training evaluates; and a note when the rounding lost more
    than ROUNDING_SHARE of the run's gain in validation loss."""
    cast = dtype_from_name(dtype)
    with torch.no_grad():
        for t in [*run.model.parameters(), *(b for _, b in persistent_buffers(run.model))]:
            if t.is_floating_point():
                t.copy_(t.to(cast).to(t.dtype))
    rounded = evaluate(run.model, run.data, run.options, run.accelerator)
    gain = run.initial_val - val if run.initial_val is not None else 0.0
    note = None
    if gain > 0 and rounded - val > ROUNDING_SHARE * gain:
        note = (f"note: rounding the weights to {dtype} for OUT cost {rounded - val:.4f} of the run's {gain:.4f} gain "
                f"in validation loss ({(rounded - val) / gain:.0%}); --save-dtype fp32 keeps the trained weights")
    return rounded, note


def write_checkpoint(run: Run, directory: str) -> nn.Module:
    """The complete checkpoint in `directory` (every process takes part, the main one writes); returns the trained
    model in eval mode: whole, or still split when `run.parallel` (the checkpoint then gathered and written one
    decoder layer at a time)."""
    acc, o, source = run.accelerator, run.options, run.source
    main = acc.is_main_process
    if run.parallel is None:
        model = gathered(acc, run.model)
        if main:
            save_complete(model, directory, o.save_dtype, source.directory, source.config, run.tokenizer)
        return model
    units = run.parallel.gathered_units(run.model, main)
    if main:
        with torch.device("meta"):
            shell = next(c for c in type(run.raw).__mro__ if c.__module__.startswith("moekit."))(run.raw.config)
        save_complete(shell, directory, o.save_dtype, source.directory, source.config, run.tokenizer, units)
    else:
        for _ in units:  # the main process gathers them
            pass
    return run.raw.eval()


def peak_memory_gb(accelerator) -> float:
    """The largest peak memory of any process: allocated on a GPU, resident (RSS) on a CPU, in GB."""
    import resource

    if accelerator.device.type == "cuda":
        return largest(accelerator, torch.cuda.max_memory_allocated())
    return largest(accelerator, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def largest(accelerator, n_bytes: float) -> float:
    """The largest of the processes' `n_bytes`, in GB (to the kB)."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        t = torch.tensor(float(n_bytes), device=accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_bytes = t.item()
    return round(n_bytes / 1e9, 6)


# ---- the run -------------------------------------------------------------------------------------------------

def run_steps(run: Run) -> tuple[float, float, float]:
    """Every step from the resumed one to the last, with its logging, evaluation and saving: (last train loss,
    last validation loss, seconds)."""
    from tqdm.auto import tqdm

    o, acc = run.options, run.accelerator
    start = run.last_time = time.perf_counter()
    val, train_loss = last_logged(run.metrics, "val_loss"), last_logged(run.metrics, "loss")  # resumed: shown
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
    check_finite(train_loss, o.steps)  # never publish OUT with a loss that is not a number
    check_finite(val, o.steps, what="validation loss")
    acc.wait_for_everyone()
    dtype, unrounded, note = saved_dtype(o.save_dtype, run.source.config) if work else None, None, None
    if work:
        model = write_checkpoint(run, work.path)
        if dtype != "float32":  # what the run reports is what it wrote
            unrounded, (val, note) = val, evaluate_as_saved(run, val, dtype)
            model.eval()
    else:
        model = run.raw.eval() if run.parallel else gathered(acc, run.model)
    if acc.log_with:
        acc.end_training()
    result = TrainResult(model, o.steps, o.steps * run.tokens_per_step, train_loss, val,
                         run.initial_val if run.initial_val is not None else float("nan"), seconds, run.metrics,
                         work.out if work else None, run.start_step, unrounded, dtype, note)
    if work and acc.is_main_process:
        initial = result.initial_val_loss if math.isfinite(result.initial_val_loss) else None  # lost: unknown
        resumed = {"resumed_at_step": run.start_step} if run.start_step else {}
        rounded = {"val_loss_before_rounding": unrounded} if unrounded is not None else {}
        write_json(os.path.join(work.path, "train_config.json"), {
            **read_side_json(work.path, "train_config.json", required=True), "model_type": run.raw.config.model_type,
            "parameters": run.parameters, "tokens": result.tokens, "seconds": round(seconds, 3), **resumed,
            "train_loss": train_loss, "initial_val_loss": initial, "val_loss": val, "saved_dtype": dtype,
            **rounded})
    if work:
        work.finish(o.force)
    return result


def train(options: TrainOptions, log=print, given: set[str] | None = None) -> TrainResult:
    """Train as `options` say; write OUT (see `moekit.moe.train.state`) unless `options.out` is None. `given`: the
    options the user typed (command line), which a --resume keeps over the interrupted run's."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    options.validate()
    try:  # a rank that dies leaves the others in a collective: they stop after --collective-timeout
        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=options.collective_timeout))
        accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=not torch.cuda.is_available(),
                                  log_with=trackers(options.report_to) or None, kwargs_handlers=[timeout])
    except (RuntimeError, ValueError) as e:  # e.g. a launch configuration this machine cannot run
        raise ConfigError(f"accelerate cannot set up this launch: {str(e).strip().splitlines()[0]}") from None
    if accelerator.distributed_type == "FSDP":  # accelerate's plugin: not the path that shards here
        raise ConfigError("accelerate's FSDP plugin is not a path of moekit train; launch with --multi_gpu (or "
                          "torchrun) and give --shard-degree N")
    work = WorkDir(options.out, accelerator.is_main_process) if options.out else None
    main_log = log if accelerator.is_main_process else None
    try:
        options, note = open_work(options, work, given, accelerator.num_processes)
        if note and main_log:
            main_log(note)
        run = start_run(options, accelerator, work, main_log)
        if main_log:
            layout = f" ({run.parallel.layout.describe()})" if run.parallel else ""
            main_log(f"training {run.source.description}: {run.parameters:,} parameters, "
                     f"{accelerator.num_processes} process(es){layout}, {run.tokens_per_step:,} tokens per step; "
                     f"{run.schedule.describe()}")
        result = _run(run)
    except RuntimeError as e:
        if accelerator.num_processes > 1 and lost_peer(e):
            raise MoekitError(f"process {accelerator.process_index} of {accelerator.num_processes}: another process "
                              f"stopped or stalled (no answer within --collective-timeout "
                              f"{options.collective_timeout} s); its own error says why") from None
        raise
    finally:
        if work:
            work.release()  # on every way out (a resumed run's lock, an error before training starts)
    if main_log:
        main_log(summary_line(result, run.source.description))
        if result.note:
            main_log(result.note)
    return result


def lost_peer(e: RuntimeError) -> bool:
    """Whether `e` is a collective that timed out or lost its peer (gloo and NCCL words), not a fault of ours."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, (dist.DistBackendError, dist.DistNetworkError)) or any(
        words in text for words in ("timed out", "timeout", "closed by peer", "reset by peer"))


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
                          f"with `{resume_command(work.out)}`") from None
        raise
    except BaseException:
        if work:
            work.abandon()
        raise


def summary_line(r: TrainResult, source: str) -> str:
    """The run's last line; after a resume the speed is this run's: its steps' tokens over its time."""
    where = f"; wrote {r.out}" if r.out else ""
    mine = r.tokens * (r.steps - r.start_step) // r.steps  # tokens of the steps this run trained
    speed = f"{mine / max(r.seconds, 1e-9):,.0f} tokens/s"
    timing = (f"{r.tokens:,} tokens in {r.seconds:.1f} s ({speed})" if not r.start_step else
              f"{r.tokens:,} tokens; resumed at step {r.start_step}: {r.steps - r.start_step} steps, {mine:,} tokens in "
              f"{r.seconds:.1f} s ({speed} in this run)")
    rounded = (f" (as saved in {r.saved_dtype}; {r.val_loss_unrounded:.4f} before rounding)"
               if r.val_loss_unrounded is not None else "")
    return (f"trained {source}: {r.steps} steps, {timing}; train loss {r.train_loss:.4f}, "
            f"val loss {r.initial_val_loss:.4f} -> {r.val_loss:.4f}{rounded}{where}")
