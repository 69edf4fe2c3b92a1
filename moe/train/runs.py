"""The runs `moekit plot` draws: each RUN's metrics.jsonl and train_config.json read and checked, its model found
for the FLOPs and the MoE layers' indices.

The train curve is the LM loss (`lm_loss`, without the router losses, as the validation loss; `loss` for dense
runs), so dense and MoE runs compare directly. Training FLOPs are tokens x FLOPs per token from moekit's own
accounting of the run's model (3 x forward: 2 per active matmul weight plus attention over --seq-len, the figure
MFU uses): the model is read from RUN's config.json (a finished run), else its latest step-N/ checkpoint, else
the preset train_config.json names as its source (a path recorded there is never followed); a run whose model
cannot be found is left off the FLOPs panel. matplotlib is imported when plotting (the `plot` extra); figures
are built without pyplot.

Every file is read from inside RUN (`llama.io.inside`: a symlink out of the run is refused), and every value the
figures draw is checked first (`check_lines`): a number where a number belongs (NaN and infinities are drawn as
gaps; `step` and `tokens` finite), and an MoE run's routing lists of one shape on every line. Anything else is one
line naming the file, line and key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import ConfigError, MoekitError, shown
from moekit.llama.io import inside, read_json, read_side_json
from moekit.moe.config import MOE_PRESETS, MoEConfig

from .metrics import train_flops_per_token
from .state import PARTIAL, metrics_lines


@dataclass
class Run:
    path: str  # the directory read (OUT or OUT.partial)
    name: str  # the legend's name of the run; file names use its slug
    lines: list[dict]  # metrics.jsonl, in order
    flops_per_token: float | None  # training FLOPs per token, or None if the model cannot be found
    layers: list[int] | None = None  # the model layer index of each MoE layer, or None if the model cannot be found

    def series(self, key: str, x: str = "tokens") -> tuple[list, list]:
        """(x values, key values) of the lines that hold `key`."""
        rows = [m for m in self.lines if m.get(key) is not None]
        return [m[x] for m in rows], [m[key] for m in rows]

    @property
    def is_moe(self) -> bool:
        return any("expert_fraction" in m for m in self.lines)

    def layer_names(self) -> tuple[str, list[int]]:
        """("layer", the model layer index of each MoE layer), or ("MoE layer", 0..L-1) when the model is unknown."""
        L = len(next(m for m in self.lines if "expert_fraction" in m)["expert_fraction"])
        return ("layer", self.layers) if self.layers and len(self.layers) == L else ("MoE layer", list(range(L)))

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.removesuffix(" (in progress)")).strip("_") or "run"


def run_directory(path: str) -> str:
    """The directory holding RUN's metrics: RUN itself, or RUN.partial while the run has not finished."""
    if not os.path.isdir(path) and os.path.isdir(path + PARTIAL):
        path += PARTIAL
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such run directory; expected a `moekit train` output (OUT or OUT.partial)")
    if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        raise ConfigError(f"{path}: no metrics.jsonl; expected a `moekit train` output (OUT or OUT.partial)")
    return path


SCALARS = ("loss", "lm_loss", "val_loss", "lr", "tokens_per_s")  # numbers drawn against tokens or steps
PER_LAYER = ("max_load", "dead_experts", "entropy")  # an MoE line's lists beside expert_fraction, one per MoE layer
MAX_SEQ_LEN = 1 << 30
MAX_LAYERS = 1 << 12  # a model of more decoder layers is not looked at for the MoE layers' indices


def read_metrics(path: str) -> list[dict]:
    """`metrics_lines(path)`, which must not be empty and must hold what the figures draw (`check_lines`)."""
    lines = metrics_lines(path)  # a regular file inside the run, one JSON object per line
    if not lines:
        raise ConfigError(f"{path}: empty; the run has not logged a step yet")
    check_lines(path, lines)
    return lines


def number(v, finite: bool = False) -> bool:
    """An int or float (not a bool) that converts to a float, and with `finite` is finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) or not finite
    except OverflowError:  # an integer beyond any float
        return False


def check_lines(path: str, lines: list[dict]) -> None:
    """Every value the figures draw is a number (see the module docstring); a ConfigError naming the file, line
    and key for the first that is not."""
    shape = None  # (MoE layers, experts) of the first line with routing fields
    for i, m in enumerate(lines):
        problem, shape = _problem(m, shape)
        if problem:
            key, want = problem
            got = f"is {shown(m[key])}" if key in m else "is missing"
            raise ConfigError(f"{path} line {_linenumber(path, i)}: '{key}' {got}; expected {want}")


def _problem(m: dict, shape: tuple[int, int] | None) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """((key, what it should be) of the first value of line `m` the figures cannot draw, or None; the routing
    shape (MoE layers, experts), set by the first line with routing fields)."""
    for key in ("step", "tokens"):
        if not number(m[key], finite=True):
            return (key, "a finite integer"), shape
    for key in SCALARS:
        if m.get(key) is not None and not number(m[key]):
            return (key, "a number"), shape
    if "expert_fraction" not in m:
        return None, shape
    f = m["expert_fraction"]
    if not (isinstance(f, list) and f and all(isinstance(row, list) and row for row in f)):
        return ("expert_fraction", "a list per MoE layer of the experts' shares"), shape
    L, E = shape = shape or (len(f), len(f[0]))
    if len(f) != L or any(len(row) != E or not all(number(x, True) for x in row) for row in f):
        return ("expert_fraction", f"{L} lists of {E} finite numbers (MoE layers x experts), as on the first "
                "routing line"), shape
    for key in PER_LAYER:
        v = m.get(key)
        if not (isinstance(v, list) and len(v) == L and all(number(x, True) for x in v)):
            return (key, f"a list of {L} finite numbers, one per MoE layer"), shape
    return None, shape


def _linenumber(path: str, index: int) -> int:
    """The line of the file holding its `index`-th object (blank lines are skipped by `metrics_lines`)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        filled = [n for n, row in enumerate(f, 1) if row.strip()]
    return filled[index] if index < len(filled) else index + 1


def run_models(directory: str) -> list:
    """The run's model, in the order tried: RUN's config.json (a finished run), its step-N/config.json (the latest
    first), the preset train_config.json names as its source (a path recorded there is never followed)."""
    config = read_side_json(directory, "train_config.json") or {}
    steps = sorted((d for d in os.listdir(directory) if re.fullmatch(r"step-\d+", d)), key=lambda d: -int(d[5:]))
    names = [name for name in ["config.json", *(f"{d}/config.json" for d in steps)]  # the latest step first
             if os.path.isfile(os.path.join(directory, name))]
    models: list = [inside(directory, name, "config.json") for name in names]
    source = config.get("source")
    preset = source.removeprefix("preset ").lower() if isinstance(source, str) else ""
    if preset in LLAMA_PRESETS or preset in MOE_PRESETS:  # a name, never a path
        models.append(LlamaConfig.from_name(preset) if preset in LLAMA_PRESETS else MoEConfig.from_name(preset))
    return models


UNREADABLE = (MoekitError, OSError, KeyError, ValueError, TypeError, ArithmeticError)  # a model tried is skipped


def flops_per_token(directory: str) -> float | None:
    """Training FLOPs per token of the run's model (see the module docstring), or None."""
    options = (read_side_json(directory, "train_config.json") or {}).get("options")
    seq_len = options.get("seq_len") if isinstance(options, dict) else None
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 <= seq_len <= MAX_SEQ_LEN:
        return None
    for model in run_models(directory):
        try:
            return train_flops_per_token(model, seq_len)
        except UNREADABLE:
            continue
    return None


def moe_layer_indices(directory: str, count: int) -> list[int] | None:
    """The model layer index of each of the run's `count` MoE layers (`MoEConfig.moe_layers` of the first of its
    models that has `count`), or None."""
    for model in run_models(directory):
        try:
            if isinstance(model, str):
                d = read_json(model, "config.json")
                moe = isinstance(d, dict) and d.get("model_type") in MoEConfig.MODEL_TYPES
                model = MoEConfig.from_dict(d, model) if moe else None
            if isinstance(model, MoEConfig) and len(model.mlp_only_layers) <= model.num_hidden_layers <= MAX_LAYERS \
                    and len(model.moe_layers) == count:
                return model.moe_layers
        except UNREADABLE:
            continue
    return None


def read_runs(paths: list[str]) -> list[Run]:
    """Every RUN read and checked (one-line errors), named by its directory (with its parent where two share a
    name)."""
    directories = [run_directory(p) for p in paths]
    names = [os.path.basename(os.path.abspath(d)).removesuffix(PARTIAL) for d in directories]
    for i, d in enumerate(directories):
        if names.count(names[i]) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(d)))
            names[i] = f"{parent}/{names[i]}" if parent else names[i]
    seen: dict[str, int] = {}
    runs = []
    for d, name in zip(directories, names):
        seen[name] = seen.get(name, 0) + 1
        name = name if seen[name] == 1 else f"{name} #{seen[name]}"
        name += " (in progress)" if d.endswith(PARTIAL) else ""
        lines = read_metrics(os.path.join(d, "metrics.jsonl"))
        L = next((len(m["expert_fraction"]) for m in lines if "expert_fraction" in m), 0)  # MoE layers
        runs.append(Run(d, name, lines, flops_per_token(d), moe_layer_indices(d, L) if L else None))
    return runs
