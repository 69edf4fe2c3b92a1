"""`moekit bench layer` (one routed layer against transformers' Mixtral block, megablocks and a dense SwiGLU, on CPU
or CUDA) and `moekit bench gemm` (the grouped-GEMM kernels, see kernels/bench.py)."""

from __future__ import annotations

import argparse

import torch

from kernels import bench as kernels_bench
from llama.checkpoint import dtype_from_name
from llama.errors import MoekitError
from moe.bench import CONTENDERS, PRESETS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks: a routed layer, or the grouped-GEMM kernels",
                       description="Benchmarks that print a table and write JSON.")
    which = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    layer = which.add_parser("layer", help="our MoE layer vs transformers' Mixtral block vs a dense SwiGLU",
                             description="Forward and forward+backward of one routed SwiGLU layer, side by side: "
                             "moekit, transformers' MixtralSparseMoeBlock with its eager and grouped_mm experts "
                             "implementations, megablocks' dropless experts (CUDA, when installed) and a dense "
                             "SwiGLU of width k*F (the same active FLOPs). One table per --tokens value. On a GPU, "
                             "issue 6's figures: moekit bench layer --preset mixtral --device cuda --json PATH.")
    layer.add_argument("--preset", choices=sorted(PRESETS), help="mixtral: Mixtral-8x7B's experts, H=4096 F=14336 "
                       "E=8 k=2, bf16, 4096 16384 65536 tokens (options given as well override it)")
    layer.add_argument("--hidden", type=int, help="H (1024)")
    layer.add_argument("--ffn", type=int, help="expert width F (2816)")
    layer.add_argument("--experts", type=int, help="E (8)")
    layer.add_argument("--top-k", type=int, help="k (2)")
    layer.add_argument("--tokens", type=int, nargs="+", metavar="T", help="token counts, one table each (4096)")
    layer.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="fp32 on CPU, bf16 on CUDA")
    layer.add_argument("--device", default="auto", help="auto (cuda if torch sees a GPU, else cpu), cpu, cuda")
    layer.add_argument("--repeats", type=int, help="timed runs of each contender, round robin (5 on CPU, 10 on CUDA)")
    layer.add_argument("--warmup", type=int, help="untimed runs first (1 on CPU, 2 on CUDA)")
    layer.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    layer.add_argument("--only", nargs="+", choices=CONTENDERS, metavar="NAME",
                       help=f"time only these contenders, of {', '.join(CONTENDERS)} (default: all but megablocks "
                       "on CPU; moekit, hf-grouped_mm, megablocks if installed and dense-equivalent on CUDA)")
    layer.add_argument("--json", metavar="PATH", help="write the results as JSON")
    gemm = kernels_bench.add_arguments(which.add_parser(
        "gemm", help="grouped-GEMM kernels vs torch's grouped_mm vs a dense matmul",
        description=kernels_bench.__doc__.split("\n")[0]))
    gemm.add_argument("after_dashes", nargs="*", help=argparse.SUPPRESS)  # `bench gemm -- OPTIONS` (older form)
    return p


def run(args) -> int:
    if args.bench == "gemm":
        return kernels_bench.report(kernels_bench.parse_args(args.after_dashes) if args.after_dashes else args)
    from moe.bench import bench_layer, format_table

    kwargs = dict(PRESETS[args.preset]) if args.preset else {}
    given = dict(hidden_size=args.hidden, intermediate_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
                 tokens=args.tokens, dtype=dtype_from_name(args.dtype), repeats=args.repeats, warmup=args.warmup)
    kwargs.update({k: v for k, v in given.items() if v is not None})
    for flag, v in (("hidden", args.hidden), ("ffn", args.ffn), ("experts", args.experts), ("top-k", args.top_k),
                    ("repeats", args.repeats), *(("tokens", t) for t in args.tokens or ())):
        if v is not None and v <= 0:
            raise MoekitError(f"--{flag} must be positive, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise MoekitError(f"--warmup must be at least 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_layer(**kwargs, contenders=args.only, device=args.device)
    print(format_table(report))
    if args.json:
        kernels_bench.write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0
