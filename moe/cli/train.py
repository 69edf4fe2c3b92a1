"""`moekit train MODEL --out DIR`: train a dense Llama or an MoE model with accelerate (also
`accelerate launch -m moe.train`, same arguments)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from moe.train import MIXED_PRECISION, TrainConfig

    d = {f.name: f.default for f in TrainConfig.__dataclass_fields__.values()}
    p = sub.add_parser("train", help="train a dense or MoE model (accelerate), write a checkpoint and metrics",
                       description="Train a dense Llama or MoE causal LM with accelerate (one CPU, or many GPUs under "
                       "`accelerate launch -m moe.train`): AdamW, warmup + cosine, gradient accumulation, router "
                       "losses and the once-per-step router bias update for MoE. Writes OUT (HF checkpoint, "
                       "metrics.jsonl, train_config.json) atomically at the end.")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (llama, mixtral, qwen2_moe) or preset "
                   "(e.g. mini, tiny, tiny-moe; random init, seeded)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --force)")
    p.add_argument("--data", default=d["data"], metavar="SRC", help="builtin:arith | UTF-8 text file or directory "
                   "of .txt (as bytes, vocab >= 256) | .npy of token ids (builtin:arith)")
    for name, meta, kind, text in [
        ("steps", "N", int, "optimizer steps"), ("batch_size", "B", int, "sequences per micro-batch per process"),
        ("seq_len", "S", int, "tokens per sequence"), ("grad_accum", "A", int, "micro-batches per optimizer step"),
        ("lr", "LR", float, "peak learning rate"), ("min_lr_ratio", "R", float, "cosine floor as a fraction of lr"),
        ("warmup", "N", int, "linear warmup steps"), ("weight_decay", "WD", float, "AdamW decay on >= 2-D weights"),
        ("grad_clip", "NORM", float, "max grad norm, 0 = off"), ("seed", "N", int, "seed for init, data and noise"),
        ("log_every", "N", int, "steps between metric lines"),
        ("eval_every", "N", int, "steps between validation losses, 0 = end only"),
        ("eval_batches", "N", int, "validation batches per evaluation"),
        ("save_every", "N", int, "intermediate checkpoints OUT/step-N every N steps, 0 = none"),
    ]:
        p.add_argument("--" + name.replace("_", "-"), metavar=meta, type=kind, default=d[name],
                       help=f"{text} ({d[name]})")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d["mixed_precision"],
                   help="autocast dtype (no)")
    p.add_argument("--router-bias-rate", metavar="RATE", type=float,
                   help="MoE: auxiliary-loss-free bias step per optimizer step (default: the config's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from moe.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, out=args.out, data=args.data, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        mixed_precision=args.mixed_precision, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, router_bias_rate=args.router_bias_rate,
        force=args.force, progress=not args.no_progress)
    train(cfg)
    return 0
