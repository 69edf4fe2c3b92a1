"""Experts from several dense models (mergekit-moe's workflow), streamed and verified.

    moekit upcycle out/ --donors base/ coder/ math/ --router-init hidden \\
        --positive-prompts "0:Hello, how are you?" "1:def fib(n):" "2:12 * 7 ="

D donors, fine-tunes of one base: expert j of every MoE layer is donor j // c's FFN (c = E / D copies, made with
the single-model recipes: copy, or noise / drop to break the copies' symmetry); attention, norms, embeddings, LM
head and side files (tokenizer, chat template) come from `base` (default: the first donor); `shared_donor`'s whole
FFN may become a shared expert (qwen2_moe). Routers are random or set from prompts (`upcycle.routers`).

The converter's plan streams as for one source (`upcycle.convert`): one tensor at a time, each expert's matrices
read from its donor as they are written, so memory does not grow with the number or size of the donors. Every
source is checked first: the same architecture, vocab_size and FFN shapes as the base, and a tokenizer.json that
gives every token id the base's meaning (`tokenizer_source: base` accepts another tokenizer.json of the same
vocab_size: the base's tokenizer and embeddings serve every expert), with one-line errors naming the donor and the
field. `upcycling.json` records the recipe (and the recipe file's text), the base's `source_final_lr`, and the
sha256 of every source file, computed in a background thread while the MoE is written. Before publishing, every
expert is checked against its donor's FFN and the routing of each donor's prompts is measured
(`upcycle.verify.check_merged`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from moekit.llama.checkpoint import CheckpointReader
from moekit.llama.config import LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import check_output, check_path, file_sha256, inside, package_version, read_side_json
from moekit.moe import formats

from .convert import Layout, UpcyclePlan, plan_record, plan_upcycle, write_checkpoint
from .options import PROMPT_INITS, UpcycleOptions
from .recipe_file import describe
from .record import source_final_lr
from .routers import prompt_routers
from .verify import ExpertsResult, VerifyError, check_merged

SHARED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act", "mlp_bias")


def open_source(path: str, what: str) -> CheckpointReader:
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} {path}: checkpoint directory not found (donors are local checkpoint "
                              "directories: download hub models first)")
    return CheckpointReader(path)


def check_donor(donor: CheckpointReader, base: CheckpointReader, b: LlamaConfig, layers: list[int],
                tokenizer_source: str | None = None) -> None:
    """The donor has the base's (config `b`) architecture, vocab_size and FFN shapes (one-line errors naming the
    donor and what differs)."""
    name = os.path.join(donor.path, "config.json")
    got, want = donor.config.get("model_type"), base.config.get("model_type")
    if got != want:
        raise ConfigError(f"{name}: model_type {shown(got)} differs from the base's {shown(want)} ({base.path}); "
                          "donors must share the base's architecture")
    a = LlamaConfig.from_dict(donor.config, source=name)
    for f in SHARED_FIELDS:
        if getattr(a, f) != getattr(b, f):
            raise ConfigError(f"{name}: {f} {shown(getattr(a, f))} differs from the base's {shown(getattr(b, f))} "
                              f"({base.path}); donors must share the base's architecture and shapes")
    if a.vocab_size != b.vocab_size:
        why = ("tokenizer_source base with donors of another vocab_size is not supported yet" if tokenizer_source
               else "donors must share the base's tokenizer")
        raise ConfigError(f"{name}: vocab_size {a.vocab_size} differs from the base's {b.vocab_size} ({base.path}); "
                          f"{why}")
    for i in layers:
        for t in formats.dense_mlp_names(i).values():
            if t not in donor:
                raise CheckpointError(f"{donor.path}: tensor '{t}' is missing (a donor gives its FFN weights)")
            if donor.shape(t) != base.shape(t) or not donor.dtype(t).is_floating_point:
                raise CheckpointError(f"{donor.path}: tensor '{t}' is {list(donor.shape(t))} {donor.dtype(t)}; "
                                      f"expected the base's {list(base.shape(t))}, floating point")


def vocabulary(directory: str) -> dict | None:
    """What fixes the meaning of each token id in a checkpoint's tokenizer.json (read through `read_side_json`):
    its model type, vocabulary, merges and added tokens; None without a tokenizer.json. Formatting, and settings
    that do not change what an id means (padding, truncation, normaliser, post-processor), are left out."""
    tok = read_side_json(directory, "tokenizer.json")
    if tok is None:
        return None
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = [v[0] if isinstance(v, list) and v else v for v in vocab]
    if isinstance(merges, list):  # "a b", or ["a", "b"] since tokenizers 0.20
        merges = [" ".join(map(str, m)) if isinstance(m, list) else m for m in merges]
    added = tok.get("added_tokens") if isinstance(tok.get("added_tokens"), list) else []
    return {"model type": model.get("type"), "vocabulary": vocab, "merges": merges,
            "added tokens": sorted((str(t.get("id")), str(t.get("content"))) for t in added if isinstance(t, dict))}


def check_tokenizers(readers: list[CheckpointReader], tokenizer_source: str | None) -> None:
    """Every donor's tokenizer.json means by each token id what the base's does (readers[0]), unless
    `tokenizer_source` is base (the base's tokenizer and embeddings serve every expert; vocab sizes checked equal by
    `check_donor`). A checkpoint without tokenizer.json is compared by vocab_size only."""
    if tokenizer_source == "base":
        return
    want = vocabulary(readers[0].path)
    for r in readers[1:]:
        got = vocabulary(r.path) if want is not None else None
        if got is not None and got != want:
            part = next(k for k in want if got[k] != want[k])
            raise ConfigError(f"{r.path}/tokenizer.json differs from the base's ({readers[0].path}/tokenizer.json: "
                              f"its {part}); donors must share the base's tokenizer, or say to use the base's "
                              "(tokenizer_source: base in a recipe, or --tokenizer-source base)")


def checksums(readers: list[CheckpointReader], stop: threading.Event | None = None) -> dict[str, dict[str, str]]:
    """{source path: {file: sha256}} of each source's config.json and weight files (until `stop` is set)."""
    return {r.path: {"config.json": file_sha256(inside(r.path, "config.json", "config.json")),
                     **{f: file_sha256(real, stop) for f, real in sorted(r.files.items())}} for r in readers}


def open_checked(sources: list[str], options: UpcycleOptions, readers: list) -> tuple[LlamaConfig, list[int]]:
    """Open every source into `readers` (0: the base; the caller closes them) and check each against the base:
    architecture, vocab_size, FFN shapes, tokenizer. Returns the base's config and the MoE layers."""
    for p in sources:
        what = "--base" if p == options.base else "--shared-donor" if p == options.shared_donor else "donor"
        readers.append(open_source(p, what))
    dense = LlamaConfig.from_dict(readers[0].config, source=os.path.join(options.base, "config.json"))
    layers = options.layers(dense.num_hidden_layers)
    for r in readers[1:]:
        check_donor(r, readers[0], dense, layers, options.tokenizer_source)
    check_tokenizers(readers, options.tokenizer_source)
    return dense, layers


def by_expert(options: UpcycleOptions, per_donor: dict) -> dict:
    """{donor position or 'shared': value} -> {expert j or 'shared': value} (expert j holds donor j // c)."""
    return {j: per_donor[j // options.copies] for j in range(options.num_experts) if j // options.copies in per_donor
            } | ({"shared": per_donor["shared"]} if "shared" in per_donor else {})


def merge_donors(dst: str | os.PathLike, options: UpcycleOptions, progress: bool = True,
                 log: Callable[[str], None] | None = print) -> dict:
    """Merge `options.donors` into the MoE directory `dst` (see the module docstring); return the record written to
    `dst/upcycling.json`. Nothing appears at `dst` unless written completely and, for copy, every expert equals its
    donor's FFN."""
    start = time.perf_counter()
    if not options.donors:
        raise ConfigError("merge_donors needs options.donors (--donors A B ...)")
    paths = [check_path(p, "donor") for p in options.donors]
    options = dataclasses.replace(options, donors=paths, base=check_path(options.base or paths[0], "--base"),
                                  shared_donor=options.shared_donor and check_path(options.shared_donor, "shared"))
    sources = list(dict.fromkeys([options.base, *paths, *filter(None, [options.shared_donor])]))  # 0: the base
    dst = check_output(dst, options.force, "DST", [*(("source", p) for p in sources), ("--config", options.config)])
    readers: list[CheckpointReader] = []
    try:
        dense, layers = open_checked(sources, options, readers)
        layout = Layout([sources.index(paths[j // options.copies]) for j in range(options.num_experts)],
                        sources.index(options.shared_donor) if options.shared_donor else None,
                        residual=by_expert(options, options.per_donor("residual_scale")),
                        noise=by_expert(options, options.per_donor("expert_noise")))
        if options.router_init in PROMPT_INITS:
            layout.routers, layout.shared_gates = prompt_routers(options.base, options, layers, dense.vocab_size,
                                                                 progress)
        plan = plan_upcycle(readers[0], options, layout)
        hashing, stop = ThreadPoolExecutor(1), threading.Event()
        digests = hashing.submit(checksums, readers, stop)
        record = {"moekit_version": package_version("moekit"), "base": options.base, "donors": paths,
                  "shared_donor": options.shared_donor, "experts": [paths[j // options.copies]
                                                                    for j in range(options.num_experts)],
                  "router_init": options.router_init, "source_final_lr": source_final_lr(options.base),
                  **plan_record(plan, options), "function_preserving": False}
        if options.config:
            record["recipe_file"] = describe(options.config)

        def check(tmp: str, record: dict) -> None:
            record["sha256"] = digests.result()
            if not options.verify:
                return
            result = check_merged(tmp, options, options.verify_tokens, options.verify_atol, options.seed, progress)
            record["verify"] = result.to_dict()
            if options.exact_copies and not result.ok:
                raise VerifyError(f"recipe '{options.recipe}' should copy each donor's FFN but {result.line()}; "
                                  f"nothing written to {dst}")

        try:
            write_checkpoint(plan, readers, dst, options, record, check, start, progress)
        finally:
            stop.set()  # a failed run does not wait for the hashes
            hashing.shutdown()
    finally:
        for r in readers:
            r.close()
    if log:
        log(summary_line(dst, plan, options, record))
        for line in routing_warnings(layout, options, record):
            print(f"warning: {line}", file=sys.stderr)
    return record


def routing_warnings(layout: Layout, options: UpcycleOptions, record: dict) -> list[str]:
    """What a user should hear about the routers: layers whose donors' rows are nearly dependent (condition number
    above 5: mergekit's `warn_degenerate_gates`, mergekit/moe/router.py), and donors whose own prompts never pick
    one of their experts first (the routing shares of the check)."""
    out = []
    if layout.routers and options.router_init in PROMPT_INITS and len(options.donors) > 1:
        layers = [i for i, rows in layout.routers.items()
                  if torch.linalg.cond(rows[::options.copies].double()) > 5]  # one row per donor
        if layers:
            out.append(f"the routers of {len(layers)} layer(s) ({', '.join(map(str, layers[:8]))}"
                       f"{', ...' if len(layers) > 8 else ''}) are nearly degenerate: the prompts may be too similar, "
                       "and some experts will be underused")
    routing = (record.get("verify") or {}).get("routing") or {}
    never = [d for d, share in routing.items() if share == 0]
    if never:
        out.append(f"donor(s) {', '.join(never)} never get the first choice on their own prompts (shares "
                   f"{', '.join(f'{d}: {v:.0%}' for d, v in routing.items())}): their experts may go unused")
    return out


def summary_line(dst: str, plan: UpcyclePlan, options: UpcycleOptions, record: dict) -> str:
    c, gb, secs = plan.config, record["output_bytes"] / 1e9, record["seconds"]
    shared = f" + shared expert {c.shared_expert_intermediate_size}" if c.has_shared_expert else ""
    D = len(options.donors)
    line = (f"merged {D} donor{'s' * (D > 1)} -> {dst}: base {options.base}, {c.num_local_experts} experts of "
            f"{c.moe_intermediate_size}{shared} ({options.copies} per donor, recipe {options.recipe}), "
            f"top-{c.num_experts_per_tok}, router {options.router_init}, {len(plan.moe_layers)}/"
            f"{c.num_hidden_layers} MoE layers, {plan.format}, {gb:.3f} GB in {record['shards']} shard(s), "
            f"{secs:.1f} s")
    v = record["verify"]
    if v is not None:
        line += f"; verify: {ExpertsResult(**v).line()}"
    return line
