"""Where a run lives until it finishes, and how it resumes.

A run works in ``OUT.partial/`` (locked while a process works in it), then renames it to OUT when training ends,
so OUT is only ever a finished run:

    OUT.partial/train_config.json   the options, written when the run starts (resume reads them back)
    OUT.partial/metrics.jsonl       one line per log step, growing
    OUT.partial/step-NNNNNN/        --save-every: a complete Hugging Face checkpoint (kept in OUT)
    OUT.partial/state/step-NNNNNN/  --save-every: accelerate's training state (model, optimizer, schedule, RNG
                                    states, step), written atomically, the last --keep-last kept; removed at the end

and what it writes there: complete Hugging Face directories (`save_complete`), with full weights under FSDP
(`gathered`).

A killed run leaves OUT.partial behind; `--resume` continues from its last state with the options it started
with. A new run refuses to start over an interrupted one unless --force.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

from torch import nn

from moekit.llama.checkpoint import copy_side_files
from moekit.llama.errors import CheckpointError, ConfigError
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
    read_json,
    try_lock,
    write_json,
)

from .options import TrainOptions
from .tokenizer import TOKENIZER_FILES, ByteTokenizer

STATE = re.compile(r"step-(\d{6,})")


PARTIAL = ".partial"  # OUT + PARTIAL: the work directory of a run not finished yet


def metrics_lines(path: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a last line still being written (no newline yet, or cut by a kill)
    is left out."""
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = f.read().split("\n")
    lines = []
    for i, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            m = json.loads(row)
        except json.JSONDecodeError:
            if i == len(rows):  # the run is appending this line right now
                break
            raise ConfigError(f"{path} line {i}: not valid JSON; expected one JSON object per line") from None
        if not isinstance(m, dict) or not isinstance(m.get("step"), int) or not isinstance(m.get("tokens"), int):
            raise ConfigError(f"{path} line {i}: expected a JSON object with integer 'step' and 'tokens'")
        lines.append(m)
    return lines


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
        if not os.path.isdir(self.path):
            finished = " (OUT is a finished run: nothing to resume)" if os.path.isdir(self.out) else ""
            raise CheckpointError(f"{self.path}: no interrupted run to resume{finished}")
        if not os.path.isfile(os.path.join(self.path, "train_config.json")):
            raise CheckpointError(f"{self.path}: no train_config.json; not a moekit training run")
        if self.main:
            self._take_lock()

    def _take_lock(self) -> None:
        self._lock = try_lock(self.path)
        if self._lock is None:
            raise CheckpointError(f"{self.path}: another run is working in it (its lock is held)")

    # ---- resuming ---------------------------------------------------------------------------------------------
    def resumed_options(self, given: TrainOptions, explicit: set[str] | None) -> TrainOptions:
        """The interrupted run's options, with those a resumed run may change taken from `given`. A computation
        option given with another value than the run's is an error (`explicit`: the options the user typed;
        None: those differing from their defaults)."""
        saved = read_json(os.path.join(self.path, "train_config.json"), "train_config.json").get("options")
        fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
        if not isinstance(saved, dict) or not set(saved) <= set(fields):
            raise CheckpointError(f"{self.path}/train_config.json: no options of this moekit's trainer")
        if explicit is None:
            explicit = {n for n, f in fields.items() if getattr(given, n) != f.default}
        for name in sorted(explicit - TrainOptions.RESUMABLE):
            if name in saved and getattr(given, name) != saved[name]:
                shown = f"--{name.replace('_', '-')}" if name != "model" else "MODEL"
                raise ConfigError(f"{shown} {getattr(given, name)!r} differs from the interrupted run's "
                                  f"{saved[name]!r}; a resumed run keeps its options ({self.path}/train_config.json)")
        merged = {**saved, **{n: getattr(given, n) for n in TrainOptions.RESUMABLE & explicit}, "resume": True,
                  "out": given.out}
        return TrainOptions(**merged)

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
        kept = [e for e in metrics_lines(path) if e["step"] <= step] if os.path.isfile(path) else []
        if self.main:
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in kept)
            os.replace(path + ".tmp", path)
        return kept

    # ---- during the run ---------------------------------------------------------------------------------------
    def write_options(self, options: TrainOptions, extra: dict) -> None:
        if self.main:
            write_json(os.path.join(self.path, "train_config.json"), {"options": dataclasses.asdict(options), **extra})

    def append_metrics(self, entry: dict) -> None:
        if self.main:
            with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_state(self, accelerator, step: int, keep_last: int, progress: dict) -> None:
        """accelerate's save_state (model, optimizer, RNG states; all processes take part) and `progress` (step,
        schedule, metric sums: JSON, no pickle) into state/step-N, atomically; keep the last `keep_last`."""
        final = os.path.join(self.path, "state", f"step-{step:06d}")
        tmp = final + ".tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if self.main:
            write_json(os.path.join(tmp, "progress.json"), progress)
            os.replace(tmp, final)
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

def save_complete(model: nn.Module, directory: str, dtype: str, source_dir: str | None, source_config: dict | None,
                  tokenizer) -> None:
    """A Hugging Face directory a user can load and chat with: config and weights (in `dtype`; auto: the source
    checkpoint's), every non-weight file of the source, and the tokenizer used for training when it came from
    elsewhere (None: token ids were given, no tokenizer to write). Files already in `directory` (metrics, train
    config) are kept."""
    if dtype == "auto":
        stored = (source_config or {}).get("torch_dtype") or (source_config or {}).get("dtype")
        dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
    tmp = os.path.join(directory, ".checkpoint")
    fmt = {"format": model.config.model_type} if model.config.model_type in ("mixtral", "qwen2_moe") else {}
    model.save_pretrained(tmp, force=True, dtype=dtype, **fmt)
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
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def gathered(accelerator, model) -> nn.Module:
    """The trained model with its full weights (gathered from the processes under FSDP), in eval mode."""
    from accelerate.utils import DistributedType

    raw = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if accelerator.distributed_type != DistributedType.FSDP:
        return raw.eval()
    state = accelerator.get_state_dict(model)  # every process takes part; the main one gets the tensors
    return type(raw).from_state_dict(raw.config, state) if accelerator.is_main_process else raw.eval()
