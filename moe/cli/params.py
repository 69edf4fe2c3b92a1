"""`moekit params TARGET`: total vs active parameters, FLOPs, memory, training time and cost."""

from __future__ import annotations

import argparse
import json

from moe.accounting import count_params, parse_number
from moe.accounting_cost import DTYPE_BYTES, Plan, as_json, derive, render_table


def _number(text: str) -> float:
    try:
        return parse_number(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("params", help="count total vs active parameters; FLOPs, memory, time and cost",
                       description="Exact parameter counts (total vs active per token, by component) from a "
                       "preset, a config.json, a checkpoint directory (safetensors headers only) or a bare count "
                       "such as 7B, and the FLOPs, memory, training time and cost they imply.")
    p.add_argument("target", help="preset name, config.json, checkpoint directory, or a count (7B, 175e9)")
    p.add_argument("--json", action="store_true", help="print JSON (total_params, active_params, components, ...)")
    p.add_argument("--explain", action="store_true", help="show each derived figure's formula and inputs")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="weight / KV precision (bf16)")
    p.add_argument("--seq-len", type=int, default=2048, help="context for attention FLOPs and KV cache (2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (1)")
    work = p.add_mutually_exclusive_group()
    work.add_argument("--tokens", type=_number, help="training tokens (e.g. 300B): training FLOPs = 3 x forward")
    work.add_argument("--train-flops", type=_number, help="training FLOPs, given (e.g. 3.14e23)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for memory per GPU and training time (1)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO stage: 1 shards optimizer states, 2 + gradients, 3 (FSDP) + weights (0)")
    p.add_argument("--shard-degree", type=int, help="GPUs the states are sharded over (default: --gpus)")
    peak = p.add_mutually_exclusive_group()
    peak.add_argument("--peak-flops", type=_number, help="peak FLOP/s per GPU (e.g. 60e12)")
    peak.add_argument("--peak-flops-per-day", type=_number, help="peak FLOPs per GPU-day (e.g. the seed's 5.2e18)")
    p.add_argument("--mfu", type=float, default=1.0, help="model FLOPs utilisation, 0-1 (1.0)")
    p.add_argument("--price-per-gpu-hour", type=float, help="USD per GPU-hour, for the cost")
    p.add_argument("--round-days", action="store_true",
                   help="round the time at peak to whole days before dividing by MFU (the seed's arithmetic)")
    return p


def run(args: argparse.Namespace) -> int:
    count = count_params(args.target)
    plan = Plan(dtype=args.dtype, seq_len=args.seq_len, batch=args.batch, tokens=args.tokens,
                train_flops=args.train_flops, gpus=args.gpus, zero=args.zero, shard_degree=args.shard_degree,
                peak_flops=args.peak_flops, peak_flops_per_day=args.peak_flops_per_day, mfu=args.mfu,
                price_per_gpu_hour=args.price_per_gpu_hour, round_days=args.round_days)
    report = derive(count, plan)
    if args.json:
        print(json.dumps(as_json(report, args.explain), indent=2))
    else:
        print(render_table(report, args.explain))
    return 0
