"""`moekit plot`: pictures of training runs, from what `moekit train` writes beside the checkpoint.

Each RUN is a `moekit train` output: OUT when finished, OUT.partial while it runs (both hold metrics.jsonl and
train_config.json; a RUN named OUT that has not finished yet is read from OUT.partial). Files written to DIR:

    loss.png            train LM loss and validation loss against training tokens, and against training FLOPs,
                        every run overlaid (colour = run; solid = train, dashed with dots = validation)
    lr_throughput.png   learning rate and tokens/s against optimizer steps, every run overlaid
    experts-NAME.png    an MoE run: per MoE layer a heatmap (experts x steps) of each expert's share of the token
                        copies in each logging interval (1/E everywhere = balanced; a dark row = a dead expert)
    load-NAME.png       an MoE run: per MoE layer, max/mean load (1 = balanced, E = one expert takes everything),
                        dead experts, and router entropy (log E = uniform router, near 0 = confident or collapsed)

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
from moekit.llama.io import AtomicDir, check_output, inside, read_side_json
from moekit.moe.config import MOE_PRESETS, MoEConfig

from .metrics import train_flops_per_token
from .options import PlotOptions
from .state import PARTIAL, metrics_lines


@dataclass
class Run:
    path: str  # the directory read (OUT or OUT.partial)
    name: str  # the legend's name of the run; file names use its slug
    lines: list[dict]  # metrics.jsonl, in order
    flops_per_token: float | None  # training FLOPs per token, or None if the model cannot be found

    def series(self, key: str, x: str = "tokens") -> tuple[list, list]:
        """(x values, key values) of the lines that hold `key`."""
        rows = [m for m in self.lines if m.get(key) is not None]
        return [m[x] for m in rows], [m[key] for m in rows]

    @property
    def is_moe(self) -> bool:
        return any("expert_fraction" in m for m in self.lines)

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


def read_metrics(path: str) -> list[dict]:
    """`metrics_lines(path)`, which must not be empty and must hold what the figures draw (`check_lines`)."""
    lines = metrics_lines(path)  # a regular file inside the run, one JSON object per line
    if not lines:
        raise ConfigError(f"{path}: empty; the run has not logged a step yet")
    check_lines(path, lines)
    return lines


def _number(v, finite: bool = False) -> bool:
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
            raise ConfigError(f"{path} line {_line_number(path, i)}: '{key}' {got}; expected {want}")


def _problem(m: dict, shape: tuple[int, int] | None) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """((key, what it should be) of the first value of line `m` the figures cannot draw, or None; the routing
    shape (MoE layers, experts), set by the first line with routing fields)."""
    for key in ("step", "tokens"):
        if not _number(m[key], finite=True):
            return (key, "a finite integer"), shape
    for key in SCALARS:
        if m.get(key) is not None and not _number(m[key]):
            return (key, "a number"), shape
    if "expert_fraction" not in m:
        return None, shape
    f = m["expert_fraction"]
    if not (isinstance(f, list) and f and all(isinstance(row, list) and row for row in f)):
        return ("expert_fraction", "a list per MoE layer of the experts' shares"), shape
    L, E = shape = shape or (len(f), len(f[0]))
    if len(f) != L or any(len(row) != E or not all(_number(x, True) for x in row) for row in f):
        return ("expert_fraction", f"{L} lists of {E} finite numbers (MoE layers x experts), as on the first "
                "routing line"), shape
    for key in PER_LAYER:
        v = m.get(key)
        if not (isinstance(v, list) and len(v) == L and all(_number(x, True) for x in v)):
            return (key, f"a list of {L} finite numbers, one per MoE layer"), shape
    return None, shape


def _line_number(path: str, index: int) -> int:
    """The line of the file holding its `index`-th object (blank lines are skipped by `metrics_lines`)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        filled = [n for n, row in enumerate(f, 1) if row.strip()]
    return filled[index] if index < len(filled) else index + 1


def flops_per_token(directory: str) -> float | None:
    """Training FLOPs per token of the run's model (see the module docstring), or None."""
    config = read_side_json(directory, "train_config.json") or {}
    options = config.get("options")
    seq_len = options.get("seq_len") if isinstance(options, dict) else None
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 <= seq_len <= MAX_SEQ_LEN:
        return None
    steps = sorted((d for d in os.listdir(directory) if re.fullmatch(r"step-\d+", d)), key=lambda d: -int(d[5:]))
    names = [name for name in ["config.json", *(f"{d}/config.json" for d in steps)]  # the latest step first
             if os.path.isfile(os.path.join(directory, name))]
    models = [inside(directory, name, "config.json") for name in names]
    source = config.get("source")
    preset = source.removeprefix("preset ").lower() if isinstance(source, str) else ""
    if preset in LLAMA_PRESETS or preset in MOE_PRESETS:  # a name, never a path
        models.append(LlamaConfig.from_name(preset) if preset in LLAMA_PRESETS else MoEConfig.from_name(preset))
    for model in models:
        try:
            return train_flops_per_token(model, seq_len)
        except (MoekitError, OSError, KeyError, ValueError, ArithmeticError):
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
        runs.append(Run(d, name, read_metrics(os.path.join(d, "metrics.jsonl")), flops_per_token(d)))
    return runs


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("moekit plot needs matplotlib, which is not installed: pip install 'moekit[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def _color(i: int) -> str:
    return f"C{i % 10}"


def loss_figure(runs: list[Run]):
    """Train LM loss (solid) and validation loss (dashed, dots) against training tokens and, for the runs whose
    model is known, against training FLOPs."""
    from matplotlib.ticker import EngFormatter

    with_flops = [r for r in runs if r.flops_per_token]
    fig = _matplotlib()(figsize=(11 if with_flops else 6.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if with_flops else 1, squeeze=False)[0]
    panels = [(axes[0], runs, False, "training tokens", "against tokens")]
    if with_flops:
        panels.append((axes[1], with_flops, True, "training FLOPs (moekit accounting)", "against compute"))
    for ax, chosen, flops, xlabel, title in panels:
        for r in chosen:
            scale, c = r.flops_per_token if flops else 1, _color(runs.index(r))
            x, y = r.series("lm_loss") if any("lm_loss" in m for m in r.lines) else r.series("loss")
            ax.plot([t * scale for t in x], y, color=c, label=f"{r.name} train")
            x, y = r.series("val_loss")
            ax.plot([t * scale for t in x], y, color=c, linestyle="--", marker="o", markersize=3,
                    label=f"{r.name} validation")
        ax.set(xlabel=xlabel, ylabel="loss (nats per token)", title=f"Loss {title}")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return fig


def lr_throughput_figure(runs: list[Run]):
    """Learning rate and training throughput against optimizer steps."""
    fig = _matplotlib()(figsize=(11, 3.8), layout="constrained")
    lr_ax, speed_ax = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        lr_ax.plot(*r.series("lr", "step"), color=_color(i), label=r.name)
        speed_ax.plot(*r.series("tokens_per_s", "step"), color=_color(i), marker=".", label=r.name)
    lr_ax.set(ylabel="learning rate", title="Learning rate schedule")
    speed_ax.set(ylabel="tokens / s (all processes)", title="Training throughput")
    speed_ax.set_ylim(bottom=0)
    for ax in (lr_ax, speed_ax):
        _step_axis(ax)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _step_axis(ax) -> None:
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)


def expert_figure(run: Run):
    """Per MoE layer a heatmap of expert_fraction [E, logged steps]."""
    rows = [m for m in run.lines if "expert_fraction" in m]
    steps = [m["step"] for m in rows]
    fractions = [m["expert_fraction"] for m in rows]  # [n, L, E]
    L, E = len(fractions[0]), len(fractions[0][0])
    cols = min(L, 4)
    fig = _matplotlib()(figsize=(3.6 * cols + 1.0, 2.6 * math.ceil(L / cols) + 0.6), layout="constrained")
    axes = fig.subplots(math.ceil(L / cols), cols, squeeze=False).ravel()
    vmax = max(max(max(layer) for layer in f) for f in fractions)
    for layer, ax in enumerate(axes):
        if layer >= L:
            ax.set_axis_off()
            continue
        grid = [[f[layer][e] for f in fractions] for e in range(E)]  # [E, n]
        # each logged value covers the interval since the previous log line (the first: since step 0)
        mesh = ax.pcolormesh([0, *steps], [e - 0.5 for e in range(E + 1)], grid, vmin=0, vmax=vmax, cmap="viridis")
        ax.set(title=f"MoE layer {layer}", ylabel="expert")
        _step_axis(ax)
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(mesh, ax=axes.tolist(), label="share of token copies")
    fig.suptitle(f"{run.name}: each expert's share of the token copies per logging interval (balanced: 1/{E})")
    return fig


def load_figure(run: Run):
    """Per MoE layer, over the steps: max/mean load, dead experts, router entropy."""
    rows = [m for m in run.lines if "expert_fraction" in m]
    steps, E = [m["step"] for m in rows], len(rows[0]["expert_fraction"][0])
    fig = _matplotlib()(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("max_load", "max / mean load", f"Max/mean load (1 = balanced, {E} = one expert)", 1.0),
              ("dead_experts", "experts with no tokens", "Dead experts", None),
              ("entropy", "nats", f"Router entropy (dashed: uniform, log {E})", math.log(E)))
    for ax, (key, ylabel, title, reference) in zip(axes, panels):
        for layer in range(len(rows[0]["expert_fraction"])):
            ax.plot(steps, [m[key][layer] for m in rows], marker=".", color=_color(layer), label=f"layer {layer}")
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
        ax.set(ylabel=ylabel, title=title)
        _step_axis(ax)
        ax.grid(alpha=0.3)
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylim(-0.25, max(max(m["dead_experts"]) for m in rows) + 0.75)
    axes[0].legend(fontsize="small", title="MoE layer")
    fig.suptitle(f"{run.name}: routing")
    return fig


def figures(runs: list[Run]) -> dict:
    """{file name: matplotlib Figure} for the runs, in a fixed order."""
    _matplotlib()  # a missing matplotlib is one line before anything is drawn
    out = {"loss.png": loss_figure(runs), "lr_throughput.png": lr_throughput_figure(runs)}
    slugs: dict[str, int] = {}
    for r in runs:
        if r.is_moe:
            slugs[r.slug] = slugs.get(r.slug, 0) + 1
            slug = r.slug if slugs[r.slug] == 1 else f"{r.slug}-{slugs[r.slug]}"
            out[f"experts-{slug}.png"] = expert_figure(r)
            out[f"load-{slug}.png"] = load_figure(r)
    return out


def plot(options: PlotOptions, log=print) -> dict:
    """`moekit plot`: read every RUN, draw the figures, write them to --out atomically; returns {file: Figure}."""
    inputs = [("RUN", run) for run in options.runs]
    out = check_output(options.out, options.force, "--out", inputs)  # before reading: fail fast
    runs = read_runs(options.runs)
    drawn = figures(runs)
    with AtomicDir(out, options.force, [("RUN", r.path) for r in runs], "--out") as tmp:
        for name, fig in drawn.items():
            fig.savefig(os.path.join(tmp, name), dpi=100, metadata={"Software": None})
    if log:
        log(f"wrote {len(drawn)} plots of {len(runs)} run(s) to {out}: {', '.join(drawn)}")
    return drawn
