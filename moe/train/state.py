"""Where a run lives until it finishes, and how it resumes.

A run works in ``OUT.partial/`` (locked while a process works in it), then renames it to OUT when training ends,
so OUT is only ever a finished run:

    OUT.partial/train_config.json   the options, written when the run starts (resume reads them back)
    OUT.partial/metrics.jsonl       one line per log step, growing
    OUT.partial/step-NNNNNN/        --save-every: a complete Hugging Face checkpoint (kept in OUT)
    OUT.partial/state/step-NNNNNN/  --save-every: accelerate's training state (model, optimizer, schedule, RNG
                                    states, step), or a sharded run's shards (`sharded`), written atomically, the
                                    last --keep-last kept; removed at the end

and what it writes there: complete Hugging Face directories (`save_complete`; one decoder layer at a time for a
sharded run, `write_units`).

A killed run leaves OUT.partial behind; `--resume` continues from its last complete state with the options it
started with (see `resume`). A new run refuses to start over an interrupted one unless --force.

Files of the run are read through `moekit.llama.io.inside` (a link out of OUT.partial is refused); JSON is written
without NaN (never `NaN` in a .json file); a write that fails (a full disk) is one line naming the user's path, and
leaves no temporary behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat

from torch import nn

from moekit.llama.checkpoint import INDEX_NAME, copy_side_files, dtype_from_name
from moekit.llama.errors import CheckpointError, ConfigError, MoekitError
from moekit.llama.io import (
    check_output,
    check_parents,
    check_path,
    check_replaceable,
    inside,
    locked_dir,
    make_parents,
    mark,
    publish,
    try_lock,
    write_json_atomic,
)

from .options import TrainOptions
from .tokenizer import TOKENIZER_FILES, ByteTokenizer

STATE = re.compile(r"step-(\d{6,})")


PARTIAL = ".partial"  # OUT + PARTIAL: the work directory of a run not finished yet


def metrics_lines(path: str) -> list[dict]:
    """The JSON objects of a run's metrics.jsonl (a regular file inside the run); a last line still being written
    (no newline yet, or cut by a kill) is left out."""
    directory, name = os.path.split(path)
    real = inside(directory or ".", name, "metrics file")
    if not stat.S_ISREG(os.stat(real).st_mode):  # a FIFO would block
        raise ConfigError(f"{path}: not a regular file; expected the run's metrics.jsonl")
    with open(real, "rb") as f:
        rows = f.read().split(b"\n")
    lines = []
    for i, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            m = json.loads(row.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # not JSON, nested too deeply, an integer of thousands of digits
            if i == len(rows):  # the run is appending this line right now
                break
            raise ConfigError(f"{path} line {i}: not valid JSON; expected one JSON object per line") from None
        if not isinstance(m, dict) or not isinstance(m.get("step"), int) or not isinstance(m.get("tokens"), int):
            raise ConfigError(f"{path} line {i}: expected a JSON object with integer 'step' and 'tokens'")
        lines.append(m)
    return lines


def write_json(path: str, obj) -> None:
    """JSON into a file of the run, atomically (`moekit.llama.io.write_json_atomic`), never with NaN or infinity
    (which JSON has not): a one-line error instead."""
    try:
        write_json_atomic(path, obj, force=True, what=os.path.basename(path))
    except ConfigError:
        raise
    except ValueError:  # json's allow_nan=False
        raise ConfigError(f"{path}: a value to write is not a finite number; nothing written") from None


class WorkDir:
    """OUT.partial of one run (the main process holds its lock; other processes only read and write in it)."""

    def __init__(self, out: str, main: bool):
        self.out = check_path(out, "--out")
        self.path = self.out + PARTIAL
        self.main, self._lock = main, None

    # ---- opening ----------------------------------------------------------------------------------------------
    def check_new(self, force: bool) -> None:
        """Before any work: refuse an existing OUT or an interrupted run unless `force`."""
        check_parents(self.out)
        check_output(self.out, force, "--out")
        if os.path.lexists(self.path) and not force:
            last = self.last_state()
            where = f" (last saved state: step {last[0]})" if last else ""
            raise CheckpointError(f"{self.path} holds an interrupted run{where}; pass --resume to continue it or "
                                  "--force to start over")
        if os.path.lexists(self.path):
            check_replaceable(self.path, "--out")

    def create(self) -> None:
        """Make a fresh, locked OUT.partial (replacing an interrupted run's, which `check_new` allowed)."""
        if not self.main:
            return
        if os.path.lexists(self.path):
            self._take_lock()
            shutil.rmtree(self.path)
            os.close(self._lock)
        make_parents(self.out)
        self._lock = locked_dir(self.path)
        mark(self.path)

    def reopen(self) -> None:
        """Take over an interrupted run's OUT.partial for --resume."""
        if os.path.islink(self.path):
            raise CheckpointError(f"{self.path} is a symbolic link; a run resumes only in its own OUT.partial")
        if not os.path.isdir(self.path):
            finished = " (OUT is a finished run: nothing to resume)" if os.path.isdir(self.out) else ""
            raise CheckpointError(f"{self.path}: no interrupted run to resume{finished}")
        if not os.path.lexists(os.path.join(self.path, "train_config.json")):
            raise CheckpointError(f"{self.path}: no train_config.json; not a moekit training run")
        if self.main:
            self._take_lock()

    def _take_lock(self) -> None:
        self._lock = try_lock(self.path)
        if self._lock is None:
            raise CheckpointError(f"{self.path}: another run is working in it (its lock is held)")

    # ---- resuming ---------------------------------------------------------------------------------------------
    def states(self) -> list[tuple[int, str]]:
        """(step, directory) of every complete training state, oldest first (by step, not by name)."""
        root = os.path.join(self.path, "state")
        return sorted((int(m[1]), os.path.join(root, name)) for name in (os.listdir(root) if os.path.isdir(root)
                      else ()) if (m := STATE.fullmatch(name)))

    def last_state(self) -> tuple[int, str] | None:
        """(step, directory) of the newest complete training state, or None."""
        steps = self.states()
        return steps[-1] if steps else None

    def truncate_metrics(self, step: int) -> list[dict]:
        """Drop metric lines after `step` (logged after the state the run resumes from); return those kept."""
        path = os.path.join(self.path, "metrics.jsonl")
        kept = [e for e in metrics_lines(path) if e["step"] <= step] if os.path.lexists(path) else []
        if self.main:
            try:
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(e) + "\n" for e in kept)
                os.replace(path + ".tmp", path)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot rewrite the run's metrics ({e.strerror or e})") from None
            finally:
                if os.path.lexists(path + ".tmp"):
                    os.remove(path + ".tmp")
        return kept

    # ---- during the run ---------------------------------------------------------------------------------------
    def write_options(self, options: TrainOptions, extra: dict) -> None:
        if self.main:
            write_json(os.path.join(self.path, "train_config.json"), {"options": dataclasses.asdict(options), **extra})

    def append_metrics(self, entry: dict) -> None:
        if self.main:
            with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_state(self, accelerator, step: int, keep_last: int, progress: dict, write=None) -> None:
        """`write(directory)` (default accelerate's save_state: model, optimizer, RNG states; all processes take
        part) and `progress` (step, metric sums: JSON, no pickle) into state/step-N, atomically; keep the last
        `keep_last`. A failed write (a full disk) is one line naming state/step-N, and leaves no temporary."""
        final = os.path.join(self.path, "state", f"step-{step:06d}")
        tmp = final + ".tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            (write or accelerator.save_state)(tmp)
            accelerator.wait_for_everyone()
            if self.main:
                write_json(os.path.join(tmp, "progress.json"), progress)
                if os.path.lexists(final):  # a damaged state a resume skipped: superseded by this one
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except Exception as e:  # OSError, or the safetensors / torch writers' own errors of a full disk
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{final}: cannot save the training state ({_reason(e)})") from e
        if self.main:
            for _, old in self.states()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self, force: bool) -> None:
        """Publish OUT.partial as OUT, then remove the training states from it."""
        if not self.main:
            return
        publish(self.path, self.out, force)  # on failure OUT.partial stays, with its states
        self.release()
        shutil.rmtree(os.path.join(self.out, "state"), ignore_errors=True)

    def abandon(self) -> bool:
        """After a failure: keep OUT.partial when it holds a state to resume from (True), else remove it."""
        if not self.main or self._lock is None:
            return False
        keep = self.last_state() is not None
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()
        return keep

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


# ---- what a run writes ------------------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    """What went wrong in a failed write, in a few words (an OSError's strerror: not its temporary path)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def saved_dtype(dtype: str, source_config: dict | None) -> str:
    """The dtype --save-dtype writes (auto: the source checkpoint's, float32 for presets), by its torch name."""
    if dtype == "auto":
        stored = (source_config or {}).get("torch_dtype") or (source_config or {}).get("dtype")
        return stored if stored in ("float32", "bfloat16", "float16") else "float32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def save_complete(model: nn.Module, directory: str, dtype: str, source_dir: str | None, source_config: dict | None,
                  tokenizer, units=None) -> None:
    """A Hugging Face directory a user can load and chat with: config and weights (in `dtype`; auto: the source
    checkpoint's), every non-weight file of the source, and the tokenizer used for training when it came from
    elsewhere (None: token ids were given, no tokenizer to write). Files already in `directory` (metrics, train
    config) are kept. `units`: the weights come from these dicts of full tensors (see `write_units`), `model`
    then only gives the config."""
    dtype = saved_dtype(dtype, source_config)
    tmp = os.path.join(directory, ".checkpoint")
    try:
        _write_checkpoint(model, tmp, dtype, source_dir, tokenizer, units)
    except Exception as e:  # OSError, or the safetensors / tokenizers writers' own errors of a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, MoekitError) and e.__cause__ is None:
            raise  # a refusal (a side file linked from outside the source), not a failed write
        raise CheckpointError(f"{directory}: cannot write the checkpoint ({_reason(e.__cause__ or e)})") from e
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def _write_checkpoint(model: nn.Module, tmp: str, dtype: str, source_dir: str | None, tokenizer, units) -> None:
    """`save_complete`'s files, in the directory `tmp`."""
    fmt = model.config.model_type if model.config.model_type in ("mixtral", "qwen2_moe") else "auto"
    if units is None:
        model.save_pretrained(tmp, force=True, dtype=dtype, format=fmt)
    else:
        os.makedirs(tmp)
        write_units(tmp, model, units, dtype, fmt)
    if source_dir is not None:
        copy_side_files(source_dir, tmp, skip=("train_config.json", "metrics.jsonl", "upcycling.json"))
    if getattr(tokenizer, "directory", None) not in (None, source_dir):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer.directory, name)):
                shutil.copyfile(inside(tokenizer.directory, name, "tokenizer file"), os.path.join(tmp, name))
    elif isinstance(tokenizer, ByteTokenizer) and not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
        tokenizer.save(tmp)
    if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
        cfg = model.config
        write_json(os.path.join(tmp, "generation_config.json"),
                   {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id})


def write_units(directory: str, model: nn.Module, units, dtype: str, format: str) -> None:
    """config.json and one safetensors shard per unit of `units` (dicts {in-memory name: full tensor}, in the
    model's order), with the index: a sharded model written without ever holding more than one unit. A failed
    write still takes every unit, so that the processes gathering them with this one finish too."""
    from safetensors.torch import save_file

    units = iter(units)
    try:
        cast = dtype_from_name(dtype)
        n = len(model.model.layers) + 2 + (not model.config.tie_word_embeddings)
        weight_map, total = {}, 0
        for i, unit in enumerate(units):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {name: (t.to(cast) if t.is_floating_point() else t).contiguous()
                       for name, t in model.disk_pairs(unit, format)}
            save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(os.path.join(directory, "config.json"), model.checkpoint_config(cast, format))
    except BaseException:
        for _ in units:
            pass
        raise


def gathered(accelerator, model) -> nn.Module:
    """The trained model of a replicated run, unwrapped from data parallelism, in eval mode."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
