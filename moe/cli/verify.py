"""`moekit verify DENSE MOE`: compare two checkpoints' logits on the same tokens; non-zero exit above --atol."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check an upcycled checkpoint computes its dense source's function",
                       description="Run two checkpoint directories (dense Llama, Mixtral or Qwen2-MoE) layer by "
                       "layer from disk in fp32 on the same random tokens and print the max absolute and relative "
                       "logit difference. Exit code 1 when it is above --atol.")
    p.add_argument("dense", metavar="DENSE", help="reference checkpoint directory (the dense source)")
    p.add_argument("moe", metavar="MOE", help="checkpoint directory to check (the upcycled model)")
    p.add_argument("--tokens", metavar="N", type=int, default=32, help="number of random tokens (32)")
    p.add_argument("--atol", metavar="ATOL", type=float, default=1e-4, help="largest accepted max |logit difference| (1e-4)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the random tokens (0)")
    p.add_argument("--dense-dtype", choices=("bf16", "fp16"),
                   help="round DENSE's weights to this dtype first (for an MoE written with upcycle --dtype)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from llama.checkpoint import dtype_from_name
    from upcycle.verify import verify_checkpoints

    result = verify_checkpoints(args.dense, args.moe, tokens=args.tokens, atol=args.atol, seed=args.seed,
                                progress=not args.no_progress, dense_dtype=dtype_from_name(args.dense_dtype))
    print(json.dumps(result.to_dict()) if args.json else f"{args.moe} vs {args.dense}: {result.line()}")
    return 0 if result.ok else 1
