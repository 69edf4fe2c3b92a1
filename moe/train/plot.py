"""`moekit plot`: pictures of training runs, from what `moekit train` writes beside the checkpoint.

Each RUN is a `moekit train` output: OUT when finished, OUT.partial while it runs (both hold metrics.jsonl and
train_config.json; a RUN named OUT that has not finished yet is read from OUT.partial). Files written to DIR:

    loss.png            train LM loss and validation loss against training tokens, and against training FLOPs,
                        every run overlaid (colour = run; solid = train, dashed with dots = validation)
    lr_throughput.png   learning rate and tokens/s against optimizer steps, every run overlaid
    experts-NAME.png    an MoE run: each expert's share of the token copies in each logging interval (1/E
                        everywhere = balanced; a dark cell = a dead expert): up to 8 MoE layers, a heatmap (experts x
                        steps) per layer; more, one heatmap (layers x experts) of the last interval beside the
                        heatmaps over the steps of four layers spread over the depth
    load-NAME.png       an MoE run: per MoE layer, max/mean load (1 = balanced, E = one expert takes everything),
                        dead experts, and router entropy (log E = uniform router, near 0 = confident or collapsed);
                        up to 8 layers, one colour each and a legend beside the panels; more, viridis over the depth
                        and a colour bar

Layers are named by their index in the model (an MoE layer every other layer: 1, 3, 5, ...), from the same model
the FLOPs come from (below); a run whose model cannot be found names them by MoE layer (0, 1, 2, ...).
`routing_heatmaps` draws the layers x experts share of several token sets side by side, for routing analyses.

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
import uuid
from dataclasses import dataclass

from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import ConfigError, MoekitError, shown
from moekit.llama.io import (
    AtomicDir,
    check_output,
    check_output_file,
    fsync,
    inside,
    make_parents,
    read_json,
    read_side_json,
)
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


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("moekit plot needs matplotlib, which is not installed: pip install 'moekit[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def save(fig, target: str) -> None:
    """`fig` as a PNG at `target`, 100 dpi: the whole figure, grown to hold anything drawn outside it (as
    bbox_inches="tight" does, so that no label is cut, but never cropped: a figure keeps its size)."""
    from matplotlib.transforms import Bbox

    fig.draw_without_rendering()  # the layout done, as savefig does it
    whole = Bbox.from_bounds(0, 0, *fig.get_size_inches())
    fig.savefig(target, format="png", dpi=100, bbox_inches=Bbox.union([whole, fig.get_tightbbox()]),
                pad_inches=0, metadata={"Software": None})


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


LEGEND_MAX = 8  # MoE layers a legend names; more get viridis over the depth and a colour bar
SHARE = "share of token copies"


def _ticks(n: int, most: int) -> list[int]:
    """Positions 0..n-1 to label: all, or every k-th so that at most `most` are."""
    return list(range(0, n, math.ceil(n / most)))


def layer_colors(n: int) -> list:
    """A distinct colour per MoE layer: the default cycle for a legend's few, viridis sampled over many."""
    from matplotlib import colormaps

    return [f"C{i}" for i in range(n)] if n <= LEGEND_MAX else [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _colorbar(fig, mappable, axes, **kw):
    """A colour bar at the right of `axes`, as thin as a tall figure allows."""
    return fig.colorbar(mappable, ax=axes, aspect=min(max(20, 4.5 * fig.get_figheight()), 40), **kw)


def _layer_colorbar(fig, axes, colors: list, layers: list[int], word: str) -> None:
    """A colour bar outside `axes`, one band per layer in `colors`, ticked with the layer indices."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    n, ticks = len(colors), _ticks(len(colors), 64)
    bands = ScalarMappable(BoundaryNorm([i - 0.5 for i in range(n + 1)], n), ListedColormap(colors))
    bar = _colorbar(fig, bands, axes, ticks=ticks, label=word)
    bar.set_ticklabels([str(layers[i]) for i in ticks])


def _layer_expert_image(ax, grid: list[list[float]], layers: list[int], word: str, vmax: float):
    """A heatmap of grid [layers, experts] on `ax`, the first layer at the bottom, ticked with `layers`."""
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", vmin=0, vmax=vmax,
                      cmap="viridis")
    ticks = _ticks(len(layers), 64)
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_xticks(_ticks(len(grid[0]), 16))
    ax.set(xlabel="expert", ylabel=word)
    return image


def _over_steps(ax, steps: list, fractions: list, layer: int, vmax: float):
    """A heatmap [experts, logged steps] of one MoE layer's shares; each logged value covers the interval since
    the previous log line (the first: since step 0)."""
    E = len(fractions[0][0])
    grid = [[f[layer][e] for f in fractions] for e in range(E)]  # [E, n]
    mesh = ax.pcolormesh([0, *steps], [e - 0.5 for e in range(E + 1)], grid, vmin=0, vmax=vmax, cmap="viridis")
    ax.set_ylabel("expert")
    _step_axis(ax)
    ax.yaxis.get_major_locator().set_params(integer=True)
    return mesh


def expert_figure(run: Run):
    """Each expert's share of the token copies: per MoE layer over the steps (up to LEGEND_MAX layers), else the
    last interval of every layer [layers, experts] beside four layers over the steps."""
    rows = [m for m in run.lines if "expert_fraction" in m]
    steps = [m["step"] for m in rows]
    fractions = [m["expert_fraction"] for m in rows]  # [n, L, E]
    (word, layers), L, E = run.layer_names(), len(fractions[0]), len(fractions[0][0])
    vmax = max(max(max(layer) for layer in f) for f in fractions) or 1.0
    if L <= LEGEND_MAX:
        cols, picked = min(L, 4), list(range(L))
        fig = _matplotlib()(figsize=(3.6 * cols + 1.0, 2.6 * math.ceil(L / cols) + 0.6), layout="constrained")
        axes = fig.subplots(math.ceil(L / cols), cols, squeeze=False).ravel()
        for ax in axes[L:]:
            ax.set_axis_off()
        drawn = list(axes[:L])
    else:
        picked = sorted({round(i * (L - 1) / 3) for i in range(4)})  # four layers spread over the depth
        width = min(max(2.6, 0.4 * E), 8.0)
        fig = _matplotlib()(figsize=(width + 8.0, max(0.22 * L + 1.6, 2.0 * len(picked) + 1.0)),
                            layout="constrained")
        grid = fig.add_gridspec(len(picked), 2, width_ratios=[width, 6.5])
        last = fig.add_subplot(grid[:, 0])
        _layer_expert_image(last, fractions[-1], layers, word, vmax)
        last.set_title(f"every layer, the last interval (to step {steps[-1]})")
        drawn = [fig.add_subplot(grid[i, 1]) for i in range(len(picked))]
        for ax in drawn[1:]:
            ax.sharex(drawn[0])
    for layer, ax in zip(picked, drawn):
        mesh = _over_steps(ax, steps, fractions, layer, vmax)
        ax.set_title(f"{word} {layers[layer]}")
    if L > LEGEND_MAX:
        for ax in drawn[:-1]:
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
    _colorbar(fig, mesh, fig.axes, label=SHARE)
    fig.suptitle(f"{run.name}: each expert's share of the token copies per logging interval (balanced: 1/{E})")
    return fig


def load_figure(run: Run):
    """Per MoE layer, over the steps: max/mean load, dead experts, router entropy; up to LEGEND_MAX layers side by
    side with a legend at the right, more stacked with a colour bar of the layers."""
    rows = [m for m in run.lines if "expert_fraction" in m]
    steps, E = [m["step"] for m in rows], len(rows[0]["expert_fraction"][0])
    word, layers = run.layer_names()
    colors, many = layer_colors(len(layers)), len(layers) > LEGEND_MAX
    fig = _matplotlib()(figsize=(11, 7.8) if many else (14, 3.8), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True) if many else fig.subplots(1, 3)
    panels = (("max_load", "max / mean load", f"Max/mean load (1 = balanced, {E} = one expert)", 1.0),
              ("dead_experts", "experts with no tokens", "Dead experts", None),
              ("entropy", "nats", f"Router entropy (dashed: uniform, log {E})", math.log(E)))
    for ax, (key, ylabel, title, reference) in zip(axes, panels):
        for layer, c in enumerate(colors):
            ax.plot(steps, [m[key][layer] for m in rows], marker=None if many else ".", color=c,
                    linewidth=1.0 if many else 1.5, label=f"{word} {layers[layer]}")
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
        ax.set(ylabel=ylabel, title=title)
        _step_axis(ax)
        ax.grid(alpha=0.3)
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylim(-0.25, max(max(m["dead_experts"]) for m in rows) + 0.75)
    if many:
        for ax in axes[:-1]:
            ax.set_xlabel("")
        _layer_colorbar(fig, axes.tolist(), colors, layers, word)
    else:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle(f"{run.name}: routing")
    return fig


def routing_figure(fractions: dict[str, list[list[float]]], layers: list[int], title: str = ""):
    """The figure `routing_heatmaps` writes."""
    L, E = _check_fractions(fractions, layers)
    n = len(fractions)
    width = min(max(2.4, 0.35 * E), 8.0)
    fig = _matplotlib()(figsize=(width * n + 1.4, max(0.22 * L + 1.6, 3.0)), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    vmax = max(max(max(row) for row in grid) for grid in fractions.values()) or 1.0
    for ax, (label, grid) in zip(axes, fractions.items()):
        image = _layer_expert_image(ax, grid, layers, "layer" if ax is axes[0] else "", vmax)
        ax.set_title(str(label))
    _colorbar(fig, image, axes.tolist(), label=SHARE)
    if title:
        fig.suptitle(title)
    return fig


def _check_fractions(fractions, layers) -> tuple[int, int]:
    """(layers, experts) of `routing_heatmaps`' input; a one-line ConfigError for empty or ragged input."""
    if not isinstance(fractions, dict) or not fractions:
        raise ConfigError(f"routing heatmaps: fractions is {shown(fractions)}; expected {{label: a list per MoE "
                          "layer of the experts' shares}, at least one label")
    if not (isinstance(layers, list) and layers and all(_number(i) and isinstance(i, int) for i in layers)):
        raise ConfigError(f"routing heatmaps: layers is {shown(layers)}; expected the model layer index of each "
                          "MoE layer (a non-empty list of integers)")
    L, E = len(layers), None
    for label, grid in fractions.items():
        if isinstance(grid, list) and grid and isinstance(grid[0], list) and E is None:
            E = len(grid[0]) or None
        if not (isinstance(grid, list) and len(grid) == L and E and all(
                isinstance(row, list) and len(row) == E and all(_number(x, True) and x >= 0 for x in row)
                for row in grid)):
            raise ConfigError(f"routing heatmaps: fractions[{shown(label)}] is {shown(grid)}; expected {L} lists "
                              f"(one per MoE layer, as layers) of {E or 'the same number of'} finite shares >= 0 "
                              "(one per expert), as every label")
    return L, E


def routing_heatmaps(fractions: dict[str, list[list[float]]], layers: list[int], path: str, title: str = "") -> None:
    """One PNG at `path`: per label of `fractions` (fractions[label][l][e] = the share of the label's token copies
    that go to expert e at the l-th MoE layer, model layer layers[l]) a heatmap, layers (y, ticked with `layers`)
    x experts, side by side on one colour scale (0 to the largest share) with its colour bar outside; the labels
    are the panels' titles. Written atomically: a temporary file beside `path`, fsynced, renamed over it (an
    existing regular file is replaced: the caller decides on --force, as `check_output_file` does; anything else
    is refused). Empty or ragged input is a one-line ConfigError."""
    fig = routing_figure(fractions, layers, title)
    path = check_output_file(path, True, "routing heatmap")
    make_parents(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        save(fig, tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


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
            save(fig, os.path.join(tmp, name))
    if log:
        log(f"wrote {len(drawn)} plots of {len(runs)} run(s) to {out}: {', '.join(drawn)}")
    return drawn
