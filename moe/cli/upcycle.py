"""`moekit upcycle SRC DST`: turn a dense Llama checkpoint directory into an MoE checkpoint directory."""

from __future__ import annotations

import argparse

from upcycle.options import FORMAT_CHOICES, RECIPES, ROUTER_INITS, WEIGHT_SCALINGS, UpcycleOptions


def add_parser(sub) -> argparse.ArgumentParser:
    d = UpcycleOptions.__dataclass_fields__
    p = sub.add_parser("upcycle", help="upcycle a dense Llama checkpoint into an MoE checkpoint",
                       description="Upcycle a dense Hugging Face Llama checkpoint directory into a Mixtral or "
                       "Qwen2-MoE checkpoint directory, streaming tensor by tensor (memory stays near one tensor), "
                       "then check the MoE computes the dense function (copy, granular, shared experts).")
    p.add_argument("src", metavar="SRC", help="dense Llama checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--num-experts", metavar="E", type=int, default=d["num_experts"].default, help="experts E (8)")
    p.add_argument("--top-k", metavar="K", type=int, default=d["top_k"].default, help="experts per token k (2)")
    p.add_argument("--recipe", choices=RECIPES, default="copy",
                   help="copy (Komatsuzaki et al. 2022) | noise | drop (Nakamura et al. 2025) | granular "
                   "(He et al. 2024) (copy)")
    p.add_argument("--moe-layers", metavar="LAYERS", default="all", help="all | every-other | a list like 0,2,5 (all)")
    p.add_argument("--shared-experts", metavar="S", type=int, default=0,
                   help="dense shards fused into a shared expert (qwen2_moe format) (0)")
    p.add_argument("--granularity", metavar="G", type=int, help="granular: shards G of the dense FFN; E*G experts, top-k*G (2)")
    p.add_argument("--weight-scaling", choices=WEIGHT_SCALINGS, default="down",
                   help="granular: down (down_proj x R, exact) | cube-root (He et al.) | none (down)")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="normal", help="router init (normal)")
    p.add_argument("--router-std", metavar="STD", type=float, default=d["router_std"].default, help="router init std (0.02)")
    p.add_argument("--noise-scale", metavar="ALPHA", type=float, default=d["noise_scale"].default,
                   help="noise: noise std relative to each weight's std (0.01)")
    p.add_argument("--drop-ratio", metavar="R", type=float, default=d["drop_ratio"].default,
                   help="drop: fraction of neurons re-initialised per expert (0.5)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="random seed for router, noise, drop and verify tokens (0)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="output dtype (default: the source's)")
    p.add_argument("--max-shard-size", metavar="SIZE", default="5GB", help="largest safetensors shard (5GB)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help="auto: mixtral when it can express the layout, else qwen2_moe (auto)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the logit check against SRC at the end")
    p.add_argument("--verify-tokens", metavar="N", type=int, default=d["verify_tokens"].default,
                   help="tokens for the final check (32)")
    p.add_argument("--atol", metavar="ATOL", type=float, default=d["verify_atol"].default,
                   help="max |logit difference| a function-preserving recipe may show (1e-4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from upcycle.convert import upcycle

    options = UpcycleOptions(
        num_experts=args.num_experts, top_k=args.top_k, recipe=args.recipe, moe_layers=args.moe_layers,
        shared_experts=args.shared_experts, granularity=args.granularity, weight_scaling=args.weight_scaling,
        router_init=args.router_init, router_std=args.router_std, noise_scale=args.noise_scale,
        drop_ratio=args.drop_ratio, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size,
        format=args.format, force=args.force, verify=not args.no_verify, verify_tokens=args.verify_tokens,
        verify_atol=args.atol)
    upcycle(args.src, args.dst, options, progress=not args.no_progress)
    return 0
