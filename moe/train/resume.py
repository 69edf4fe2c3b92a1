"""Continuing an interrupted run (`moekit train --resume`): the options it started with, the newest training state
that loads, and the command that continues it.

    real_paths        MODEL, --data, --val-data, --tokenizer and --token-cache as real paths (what
                      train_config.json records), so that a run resumes from any working directory
    resumed_options   the run's train_config.json options, checked as the command line's are, with the options a
                      resumed run may change taken from the command line; under another number of processes the
                      global batch is kept (--grad-accum adjusted) or the resume is refused in one line
    newest_state      the newest training state that is complete and loads: one with a missing, empty or truncated
                      file (model.safetensors, optimizer.bin, progress.json) is skipped for the one before it, said
                      in one log line; with none complete, a one-line error naming the file
    read_progress     a state's progress.json, checked against the run's options (step, seq_len, global batch)
    restore           the newest complete state loaded into the run: weights, optimizer moments, RNG states; the
                      optimizer's settings and the schedule from the options, never from a file
    resume_command    the command that continues a run: `moekit train --resume --out OUT`, or under torchrun or
                      accelerate launch with several processes that launcher with as many processes

Every file is read through `moekit.llama.io.inside` (never a link out of the run) and every value read from a file
passes the checks its command-line option has: an edited file is a one-line error, never another run.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import stat
import zipfile

from moekit.llama.checkpoint import read_header
from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import inside, read_side_json

from . import sharded
from .metrics import interval_shapes
from .optim import hyperparameters, schedule_at, set_hyperparameters
from .options import TrainOptions

PATH_OPTIONS = ("model", "data", "val_data", "tokenizer", "token_cache")


class IncompleteState(CheckpointError):
    """A training state with a missing, empty or truncated file: a resume falls back to the state before it."""


def real_paths(options: TrainOptions) -> TrainOptions:
    """`options` with each path option that names something on disk as its real path (built-in data, 'bytes' and
    presets stay as they are; --token-cache is made absolute even before it exists)."""
    def real(name: str, value):
        if not isinstance(value, str) or value == "bytes" or value.startswith("builtin:"):
            return value
        return os.path.realpath(value) if name == "token_cache" or os.path.exists(value) else value

    return dataclasses.replace(options, **{n: real(n, getattr(options, n)) for n in PATH_OPTIONS})


def resumed_options(run_dir: str, given: TrainOptions, explicit: set[str] | None,
                    processes: int) -> tuple[TrainOptions, str | None]:
    """(the interrupted run's options with those a resumed run may change taken from `given`, a log line about an
    adjusted --grad-accum or None). An option the user typed (`explicit`; None: those of `given` differing from
    their defaults) with another value than the run's is an error."""
    where = os.path.join(run_dir, "train_config.json")
    config = read_side_json(run_dir, "train_config.json", required=True)
    saved = config.get("options")
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    if not isinstance(saved, dict) or not set(saved) <= set(fields):
        raise CheckpointError(f"{where}: no options of this moekit's trainer")
    try:
        run = TrainOptions(**{**saved, "resume": True, "out": given.out})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    run, note = keep_global_batch(run, config.get("processes"), processes, where)
    if explicit is None:
        explicit = {n for n, f in fields.items() if getattr(given, n) != f.default}
    typed = real_paths(given)
    for name in sorted(explicit - TrainOptions.RESUMABLE):
        theirs = getattr(run, name)
        if getattr(given, name) != theirs and getattr(typed, name) != theirs:
            flag = f"--{name.replace('_', '-')}" if name != "model" else "MODEL"
            raise ConfigError(f"{flag} {shown(getattr(given, name))} differs from the interrupted run's "
                              f"{shown(theirs)}; a resumed run keeps its options ({where})")
    kept = {n: getattr(typed, n) for n in TrainOptions.RESUMABLE & explicit}
    return dataclasses.replace(run, **{**kept, "resume": True, "out": given.out}), note


def keep_global_batch(options: TrainOptions, saved, processes: int, where: str) -> tuple[TrainOptions, str | None]:
    """`options` of a run that `saved` processes started, for `processes` now: the same sequences per optimizer
    step (batch_size x grad_accum x processes), with --grad-accum adjusted, or a one-line refusal."""
    if saved is None or saved == processes:
        return options, None
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        raise ConfigError(f"{where}: processes {shown(saved)} is not a number of processes")
    B, A = options.batch_size, options.grad_accum
    total, per = B * A * saved, B * processes  # sequences per optimizer step; per micro-batch of all processes
    if total % per:
        raise ConfigError(f"the interrupted run used {saved} processes and this one {processes}: its {total} "
                          f"sequences a step (--batch-size {B} x --grad-accum {A} x {saved}) are no multiple of "
                          f"{per}; resume it with {saved} processes")
    S, N = options.shard_degree, options.expert_parallel
    S = processes if S == saved else (S if processes % S == 0 else 1)  # fully sharded stays fully sharded
    N = N if processes % N == 0 else 1
    windows = options.eval_batches * B * saved  # the validation windows: the same set when it divides
    V = windows // per if windows % per == 0 else options.eval_batches
    adjusted = dataclasses.replace(options, grad_accum=total // per, shard_degree=S, expert_parallel=N,
                                   eval_batches=V)
    degrees = "".join(f", {flag} {new} (was {old})" for flag, new, old in (
        ("--eval-batches", V, options.eval_batches), ("--shard-degree", S, options.shard_degree),
        ("--expert-parallel", N, options.expert_parallel)) if new != old)
    return adjusted, (f"resuming with {processes} process(es) instead of {saved}: --grad-accum {total // per} "
                      f"(was {A}) keeps {total} sequences a step{degrees}")


def check_state_files(path: str) -> None:
    """IncompleteState unless the training state `path` holds progress.json and model weights, and each of its
    safetensors and torch (zip) files is a whole regular file; a CheckpointError if the state or any file in it
    resolves outside the run."""
    run_dir = os.path.dirname(os.path.dirname(path))  # OUT.partial; `path` is OUT.partial/state/step-N
    inside(run_dir, os.path.relpath(path, run_dir), "training state")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if "progress.json" not in names:
        raise IncompleteState(f"{path}: an incomplete training state (no progress.json)")
    dcp_state = ".metadata" in names  # torch.distributed.checkpoint's (see `sharded`)
    if not dcp_state and not any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in names):
        raise IncompleteState(f"{path}: an incomplete training state (no model weights)")
    for name in names:
        file = inside(path, name, "training state file")  # every file: accelerate reads some we do not name
        if not name.endswith((".safetensors", ".bin", ".distcp", ".metadata", "progress.json")):
            continue
        if not os.path.exists(file) or not stat.S_ISREG(os.stat(file).st_mode):
            raise IncompleteState(f"{file}: not a regular file; expected a file of the training state")
        try:
            if name.endswith(".safetensors"):
                read_header(file)
            elif name.endswith(".bin"):
                zipfile.ZipFile(file).close()  # torch's zip format: a cut file has no central directory
        except (CheckpointError, zipfile.BadZipFile, OSError) as e:
            detail = str(e).removeprefix(f"{file}: ")
            raise IncompleteState(f"{file}: truncated or damaged ({detail})") from None


def newest_state(states: list[tuple[int, str]], load, log=None):
    """(step, `load(step, path)`) of the newest of `states` (oldest first) that is complete and loads (`load`
    raises IncompleteState for one that does not); skipping newer ones is said in one `log` line."""
    skipped = []
    for step, path in reversed(states):
        try:
            check_state_files(path)
            result = load(step, path)
        except IncompleteState as e:
            skipped.append(str(e))
            continue
        if skipped and log:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            log(f"{skipped[0]}{more}; resuming from the previous complete state, step {step}")
        return step, result
    raise CheckpointError(f"{skipped[0]}; no earlier complete training state to resume from")


def read_progress(path: str, step: int, options: TrainOptions, global_batch: int) -> dict:
    """progress.json of the state of `step` at `path`, checked against the run's options."""
    where = os.path.join(path, "progress.json")
    progress = read_side_json(path, "progress.json", required=True)
    saved = progress.get("step")
    if not isinstance(saved, int) or isinstance(saved, bool) or not 1 <= saved < options.steps:
        raise ConfigError(f"{where}: step {shown(saved)} is outside 1..{options.steps - 1} (the run has "
                          f"{options.steps} steps)")
    if saved != step:
        raise ConfigError(f"{where}: step {saved} in the state of step {step}; expected {step}")
    for key, want in (("seq_len", options.seq_len), ("global_batch", global_batch)):
        if key in progress and progress[key] != want:
            raise ConfigError(f"{where}: the state was trained with {key} {shown(progress[key])}; the run's options "
                              f"give {want} (was train_config.json edited?)")
    return progress


def resume_command(out: str) -> str:
    """The command that continues the run writing `out`: the launcher this process runs under, with as many
    processes (WORLD_SIZE, LOCAL_WORLD_SIZE), or plain `moekit train` for one process."""
    env = os.environ
    world = _count(env.get("WORLD_SIZE"))
    args = f"train --resume --out {shlex.quote(out)}"
    if world <= 1:
        return f"moekit {args}"
    local = min(_count(env.get("LOCAL_WORLD_SIZE")) or world, world)
    nodes = max(world // max(local, 1), 1)
    if "ACCELERATE_DYNAMO_BACKEND" in env or "ACCELERATE_MIXED_PRECISION" in env:  # set by `accelerate launch`
        machines = f" --num_machines {nodes}" if nodes > 1 else ""
        return f"accelerate launch --num_processes {world}{machines} -m moekit {args}"
    nnodes = f" --nnodes {nodes}" if nodes > 1 else ""
    return f"torchrun --nproc_per_node {local}{nnodes} -m moekit {args}"


def _count(value: str | None) -> int:
    return int(value) if value and value.isdigit() and len(value) < 7 else 0


def restore(run, log=None) -> bool:
    """The newest complete training state of the interrupted `run` (the loop's Run; an incomplete newer state
    skipped, said in one `log` line): model, optimizer moments and RNG states loaded, the options' settings and the
    schedule at its step, the open logging interval. False when the run saved none (it starts over)."""
    o, acc, work = run.options, run.accelerator, run.work
    states = work.states()
    if not states:
        return False
    if states[-1][0] >= o.steps:
        raise ConfigError(f"{work.path}/train_config.json: steps {o.steps} ends before the run's last saved state "
                          f"(step {states[-1][0]}); expected more steps than that")
    settings = hyperparameters(run.optimizer)

    def load(step: int, path: str) -> dict:
        progress = read_progress(path, step, o, run.sequences_per_step)
        try:
            if run.parallel is not None or sharded.is_sharded_state(path):
                sharded.load(path, run.raw, run.optimizer, acc.process_index,
                             progress.get("processes", 1) == acc.num_processes)
            else:
                acc.load_state(path)
        except Exception as e:  # safetensors, torch and accelerate each raise their own errors for a damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise IncompleteState(f"{path}: cannot load the training state ({first})") from e
        return progress

    run.start_step, progress = newest_state(states, load, log)
    set_hyperparameters(run.optimizer, settings)  # a saved state brings moments, never settings
    schedule_at(run.scheduler, run.start_step)
    where = os.path.join(work.path, "state", f"step-{run.start_step:06d}", "progress.json")
    run.interval.load(progress.get("interval"), acc.device, interval_shapes(run.raw.config), where)
    run.untimed_steps = run.interval.steps
    return True
