"""`moekit bench layer` (one routed layer against transformers' Mixtral block and a dense SwiGLU) and
`moekit bench gemm` (the grouped-GEMM kernels, see kernels/bench.py)."""

from __future__ import annotations

import argparse

import torch

from llama.checkpoint import dtype_from_name


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks: a routed layer, or the grouped-GEMM kernels",
                       description="Benchmarks that print a table and write JSON.")
    which = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    layer = which.add_parser("layer", help="our MoE layer vs transformers' Mixtral block vs a dense SwiGLU",
                             description="Forward and forward+backward of one routed SwiGLU layer, side by side: "
                             "moekit, transformers' MixtralSparseMoeBlock with its eager and grouped_mm experts "
                             "implementations, and a dense SwiGLU of width k*F (the same active FLOPs).")
    layer.add_argument("--hidden", type=int, default=1024, help="H (1024)")
    layer.add_argument("--ffn", type=int, default=2816, help="expert width F (2816)")
    layer.add_argument("--experts", type=int, default=8, help="E (8)")
    layer.add_argument("--top-k", type=int, default=2, help="k (2)")
    layer.add_argument("--tokens", type=int, default=4096, help="T (4096)")
    layer.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="fp32")
    layer.add_argument("--repeats", type=int, default=5, help="timed runs of each contender, round robin (5)")
    layer.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    layer.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    layer.add_argument("--only", nargs="+", choices=["moekit", "hf-eager", "hf-grouped_mm", "dense-equivalent"],
                       help="time only these contenders")
    layer.add_argument("--json", metavar="PATH", help="write the results as JSON")
    gemm = which.add_parser("gemm", help="grouped-GEMM kernels (options: moekit bench gemm -- --help)",
                            add_help=False)
    gemm.add_argument("args", nargs=argparse.REMAINDER)
    return p


def run(args) -> int:
    if args.bench == "gemm":
        from kernels.bench import main

        return main([a for a in args.args if a != "--"])
    from moe.bench import CONTENDERS, bench_layer, format_table, write_json

    for name in ("hidden", "ffn", "experts", "top_k", "tokens", "repeats"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"moekit bench layer: --{name.replace('_', '-')} must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_layer(args.hidden, args.ffn, args.experts, args.top_k, args.tokens, dtype_from_name(args.dtype),
                         args.repeats, args.warmup, tuple(args.only or CONTENDERS))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
