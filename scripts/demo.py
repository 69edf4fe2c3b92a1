"""moekit end to end on a small built-in model: build a dense Llama and save it as a Hugging Face checkpoint,
upcycle it into an 8-expert top-2 MoE with `moekit upcycle`, check the MoE computes the dense function with
`moekit verify` (and in transformers, when it is installed), count total vs active parameters with
`moekit params`, and generate with both models."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from llama import Llama, LlamaConfig
from moe import MoEForCausalLM


def moekit(*args: str, head: int | None = None) -> str:
    """Run the moekit CLI as a user would; echo its output (the first `head` lines)."""
    cmd = [sys.executable, "-m", "moe", *args]
    print("  $ moekit " + " ".join(args))
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = (p.stdout + p.stderr).rstrip()
    print("\n".join("    " + line for line in out.splitlines()[:head]))
    if p.returncode:
        raise SystemExit(f"moekit {args[0]} failed with exit code {p.returncode}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="mini", help="dense Llama preset (default: mini)")
    p.add_argument("--out", default="runs/demo", help="working directory, replaced on each run (default: runs/demo)")
    p.add_argument("--num-experts", default="8", help="experts per MoE layer (default: 8)")
    p.add_argument("--top-k", default="2", help="experts per token (default: 2)")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    dense_dir, moe_dir = os.path.join(args.out, "dense"), os.path.join(args.out, "moe")

    config = LlamaConfig.from_name(args.preset)
    dense = Llama(config)
    dense.save_pretrained(dense_dir, max_shard_size="1MB", force=True)
    print(f"[1] built Llama '{args.preset}' ({dense.num_parameters():,} parameters), saved to {dense_dir}")

    loaded = Llama.from_pretrained(dense_dir)
    prompt = torch.tensor([[config.bos_token_id, 17, 42, 99]])
    same = torch.equal(loaded(prompt).logits, dense(prompt).logits)
    dense_tokens = loaded.generate(prompt, max_new_tokens=12)
    print(f"[2] loaded it back (logits identical: {same}); greedy continuation: {dense_tokens[0, 4:].tolist()}")

    print(f"[3] upcycle it: every FFN becomes {args.num_experts} copies of itself, {args.top_k} active per token")
    moekit("upcycle", dense_dir, moe_dir, "--num-experts", args.num_experts, "--top-k", args.top_k,
           "--recipe", "copy", "--max-shard-size", "1MB", "--force", "--no-progress")

    print("[4] check the MoE computes the dense function, layer by layer from disk")
    moekit("verify", dense_dir, moe_dir, "--no-progress")

    print("[5] total vs active parameters, before and after")
    for d in (dense_dir, moe_dir):
        moekit("params", d, head=1)

    moe = MoEForCausalLM.from_pretrained(moe_dir)
    moe_tokens = moe.generate(prompt, max_new_tokens=12)
    print(f"[6] the MoE's greedy continuation: {moe_tokens[0, 4:].tolist()} "
          f"(same as the dense model's: {torch.equal(moe_tokens, dense_tokens)})")

    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        print("[7] transformers is not installed: skipped loading the MoE there")
    else:
        hf_logging.disable_progress_bar()
        hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
        with torch.no_grad():
            diff = (hf(prompt).logits - dense(prompt).logits).abs().max().item()
        print(f"[7] transformers loads it as {type(hf).__name__}; max |logit - dense logit| = {diff:.2e}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
