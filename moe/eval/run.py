"""`moekit eval`: every model on every data spec (`moe.eval.score`), where their tokens go (`moe.eval.routing`),
lm-eval tasks (`moe.eval.harness`); a table, JSON, and with --out a results.json and routing heatmaps.

Everything that can be checked is checked before the first model runs: every model directory with its config.json
and tokenizer.json, an MoE for --routing, every data spec present."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re

import torch

from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import AtomicDir, read_config_json, write_json
from moekit.moe.config import MoEConfig
from moekit.moe.train.data import Documents
from moekit.moe.train.source import MOE_TYPES, load_model
from moekit.moe.train.tokenizer import load_tokenizer

from .options import EvalOptions
from .routing import RoutingCounts
from .score import DataSpec, Scorer, paired_difference, parse_data

MAX_WINDOW = 2048  # the default window: the model's context, at most this


def check_model(path: str, routing: bool) -> dict:
    """The checkpoint's config.json, checked to be scorable (one-line errors)."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: checkpoint directory not found; moekit eval scores checkpoint directories")
    config = read_config_json(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ConfigError(f"{path}: no tokenizer.json; moekit eval reads the text through each model's own "
                          "tokenizer")
    if routing and config.get("model_type") not in MOE_TYPES:
        raise ConfigError(f"{path}: --routing needs an MoE checkpoint; model_type {shown(config.get('model_type'))} "
                          "has no routed experts")
    return config


def evaluate(options: EvalOptions) -> dict:
    """{"rows": [one per (model, data)], "gaps": [each model after the first against the first, per data: bits per
    byte with a paired interval], "routing": [one per model] (with --routing), "tasks": {model: lm-eval results}
    (with --tasks)}; written to OUT/results.json with --out."""
    specs = parse_data(options.data or [])
    for m in options.models:
        check_model(m, options.routing)
    for s in specs:
        Documents(s.spec, options.text_field)  # present and readable, before any model runs
    if options.tasks:  # lm-eval installed: checked before the first model runs
        from .harness import require_lm_eval

        require_lm_eval()
    with AtomicDir(options.out, options.force, [("MODEL", m) for m in options.models], "--out") if options.out \
            else contextlib.nullcontext() as out:
        result = {"rows": [], "gaps": [], "routing": [], "tasks": {}}
        names, first = _file_names(options.models), None
        for model_dir in options.models:
            rows, routing, scores = score_model(model_dir, specs, options, out, names[model_dir])
            result["rows"] += rows
            if first is None:
                first = (model_dir, scores)
            else:
                result["gaps"] += [{"model": model_dir, "baseline": first[0], "data": s.label,
                                    **paired_difference(first[1][s.label], scores[s.label], options.seed)}
                                   for s in specs]
            if routing:
                result["routing"].append(routing)
            if options.tasks:
                result["tasks"][model_dir] = _tasks(model_dir, options)
        if out:
            write_json(os.path.join(out, "results.json"), result)
    return result


def _file_names(models: list[str]) -> dict[str, str]:
    """A distinct file-name stem per model directory (its base name, numbered when two share one)."""
    out: dict[str, str] = {}
    for m in models:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(m))) or "model"
        out[m] = stem if stem not in out.values() else f"{stem}-{len(out)}"
    return out


def score_model(model_dir: str, specs: list[DataSpec], options: EvalOptions, out: str | None,
                name: str) -> tuple[list[dict], dict | None, dict]:
    """One model on every spec: its rows, its routing (with --routing) and its DocumentScores per label."""
    if not specs:
        return [], None, {}
    source = load_model(model_dir)
    tokenizer = load_tokenizer(None, source.directory, source.config)
    model = source.model.eval().to(torch.bfloat16 if options.dtype == "bf16" else torch.float32)
    max_length = options.max_length or min(model.config.max_position_embeddings, MAX_WINDOW)
    stride = options.stride or max(1, max_length // 2)
    counts, label = None, [None]
    if options.routing:
        cfg: MoEConfig = model.config
        counts = RoutingCounts(len(cfg.moe_layers), cfg.num_local_experts)
    scorer = Scorer(model, tokenizer, max_length, stride, options.batch_size,
                    (lambda layer, ids: counts.add(label[0], layer, ids)) if counts else None)
    rows, per_label = [], {}
    for s in specs:
        label[0] = s.label
        texts = itertools.islice(Documents(s.spec, options.text_field).texts(), options.max_documents)
        scores = scorer.score(texts, options.progress, f"{name} on {s.label}")
        if sum(scores.tokens) == 0 or sum(scores.bytes) == 0:
            raise ConfigError(f"--data {shown(s.spec)}: holds no text to score")
        per_label[s.label] = scores
        rows.append({"model": model_dir, "data": s.label, **scores.summary(options.seed),
                     "max_length": max_length, "stride": stride, "dtype": options.dtype})
    routing = None
    if counts:
        mi, h_label = counts.mutual_information()
        routing = {"model": model_dir, "layers": list(model.config.moe_layers), "fractions": counts.fractions(),
                   "mutual_information_bits": mi, "max_bits": h_label}
        if out:
            from moekit.moe.train.plot import routing_heatmaps

            path = os.path.join(out, f"routing-{name}.png")
            routing_heatmaps(routing["fractions"], routing["layers"], path, title=f"{model_dir}: token copies per "
                             "layer and expert")
            routing["heatmap"] = os.path.join(options.out, os.path.basename(path))
    del model, source
    return rows, routing, per_label


def _tasks(model_dir: str, options: EvalOptions) -> dict:
    from .harness import run_tasks

    done = run_tasks(model_dir, options.tasks, options.limit, options.num_fewshot, options.include_path,
                     options.batch_size, "bfloat16" if options.dtype == "bf16" else "float32")
    return {k: done[k] for k in ("results", "n-samples", "versions") if k in done}  # the figures, not the set-up


# ---- printing ------------------------------------------------------------------------------------------------

def _interval(row: dict, key: str, digits: int) -> str:
    lo, hi = row.get(f"{key}_low"), row.get(f"{key}_high")
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "(one document)"


def table(result: dict) -> str:
    """The rows as a text table, then each model's routing specialisation."""
    lines = []
    if result["rows"]:
        lines.append(f"{'model':<28} {'data':<16} {'tokens':>10} {'bytes':>11} {'loss':>7} {'95% interval':>18} "
                     f"{'ppl':>8} {'bits/byte':>9} {'95% interval':>18}")
        for r in result["rows"]:
            lines.append(f"{_short(r['model'], 28):<28} {_short(r['data'], 16):<16} {r['tokens']:>10,} "
                         f"{r['bytes']:>11,} {r['loss']:>7.4f} {_interval(r, 'loss', 4):>18} {r['perplexity']:>8.3f} "
                         f"{r['bits_per_byte']:>9.4f} {_interval(r, 'bits_per_byte', 4):>18}")
        lines.append("intervals: 95% percentile bootstrap over documents")
    for g in result["gaps"]:
        lo, hi = g["bits_per_byte_diff_low"], g["bits_per_byte_diff_high"]
        verdict = ("" if lo is None else "; lower" if hi < 0 else "; higher" if lo > 0 else
                   "; the interval holds 0: no clear difference")
        lines.append(f"{_short(g['model'], 28)} - {_short(g['baseline'], 28)} on {g['data']}: "
                     f"{g['bits_per_byte_diff']:+.4f} bits/byte{'' if lo is None else f' [{lo:+.4f}, {hi:+.4f}]'}"
                     f"{verdict}")
    for r in result["routing"]:
        labels = list(r["fractions"])
        lines.append(f"\nrouting of {r['model']}: mutual information between data label and expert, in bits (at "
                     f"most {r['max_bits']:.3f} for these labels: {', '.join(labels)})")
        lines.append("  layer " + " ".join(f"{i:>6}" for i in r["layers"]))
        lines.append("  bits  " + " ".join(f"{v:>6.3f}" for v in r["mutual_information_bits"]))
        if r.get("heatmap"):
            lines.append(f"  heatmap: {r['heatmap']}")
    for model, results in result["tasks"].items():
        lines.append(f"\nlm-eval tasks on {model}:")
        for task, metrics in (results.get("results") or {}).items():
            shown_metrics = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                                      if isinstance(v, float) and "stderr" not in k)
            lines.append(f"  {task}: {shown_metrics}")
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=str)
