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
the FLOPs come from (`moe.train.runs`); a run whose model cannot be found names them by MoE layer (0, 1, 2, ...).
`routing_heatmaps` draws the layers x experts share of several token sets side by side, for routing analyses.

The runs are read and checked by `moe.train.runs` (what the curves show, where the FLOPs come from, what is
refused).
"""

from __future__ import annotations

import math
import os
import uuid

from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import (
    AtomicDir,
    check_output,
    check_output_file,
    fsync,
    make_parents,
)

from .options import PlotOptions
from .runs import Run, number, read_runs


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
    if not (isinstance(layers, list) and layers and all(number(i) and isinstance(i, int) for i in layers)):
        raise ConfigError(f"routing heatmaps: layers is {shown(layers)}; expected the model layer index of each "
                          "MoE layer (a non-empty list of integers)")
    L, E = len(layers), None
    for label, grid in fractions.items():
        if isinstance(grid, list) and grid and isinstance(grid[0], list) and E is None:
            E = len(grid[0]) or None
        if not (isinstance(grid, list) and len(grid) == L and E and all(
                isinstance(row, list) and len(row) == E and all(number(x, True) and x >= 0 for x in row)
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
