"""moekit end to end on a small built-in model and data, through the `moekit` command line as a user runs it:

1. pretrain a dense Llama (`mini`) on the built-in arithmetic text (`moekit train`);
2. upcycle it into an 8-expert top-2 MoE (`moekit upcycle`) and check it computes the dense function
   (`moekit verify`; and in transformers, when it is installed);
3. count total vs active parameters (`moekit params`);
4. continue training the dense model and the MoE side by side with the same options and data;
5. print a table, and what each model now writes after a prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from llama import Llama
from moe import MoEForCausalLM


def moekit(*args: str, head: int | None = None) -> str:
    """Run the moekit CLI as a user would; echo its output (the first `head` lines)."""
    print("  $ moekit " + " ".join(args))
    p = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True)
    out = (p.stdout + p.stderr).rstrip()
    print("\n".join("    " + line for line in out.splitlines()[:head]))
    if p.returncode:
        raise SystemExit(f"moekit {args[0]} failed with exit code {p.returncode}")
    return out


def params(path: str) -> dict:
    return json.loads(subprocess.run([sys.executable, "-m", "moekit", "params", path, "--json"], capture_output=True,
                                     text=True, check=True).stdout)


def complete(model, prompt: str, n: int = 24) -> str:
    """Greedy continuation of prompt, byte-level (the built-in data's tokens are bytes)."""
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    return bytes(out).decode(errors="replace").split("\n")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help="dense Llama preset (default: mini)")
    p.add_argument("--out", default="runs/demo", help="working directory, replaced on each run (default: runs/demo)")
    p.add_argument("--pretrain-steps", default="300", help="dense pretraining steps (default: 300)")
    p.add_argument("--continue-steps", default="150", help="steps of continued training of each model (150)")
    p.add_argument("--num-experts", default="8", help="experts per MoE layer (default: 8)")
    p.add_argument("--top-k", default="2", help="experts per token (default: 2)")
    args = p.parse_args()
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    d = {name: os.path.join(args.out, name) for name in ("dense", "moe", "dense-continued", "moe-continued")}

    print(f"[1] pretrain a dense Llama '{args.preset}' on the built-in arithmetic text")
    moekit("train", args.preset, "--out", d["dense"], "--steps", args.pretrain_steps, "--force", "--no-progress")

    print(f"[2] upcycle it: every FFN becomes {args.num_experts} copies of itself, {args.top_k} active per token")
    moekit("upcycle", d["dense"], d["moe"], "--num-experts", args.num_experts, "--top-k", args.top_k,
           "--recipe", "copy", "--max-shard-size", "1MB", "--force", "--no-progress")
    print("    check the MoE computes the dense function, layer by layer from disk:")
    moekit("verify", d["dense"], d["moe"], "--no-progress")
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        print("    (transformers is not installed: skipped loading the MoE there)")
    else:
        hf_logging.disable_progress_bar()
        ids = torch.tensor([list(b"417+86=")])
        hf = AutoModelForCausalLM.from_pretrained(d["moe"], dtype=torch.float32)
        with torch.no_grad():
            diff = (hf(ids).logits - Llama.from_pretrained(d["dense"])(ids).logits).abs().max().item()
        print(f"    transformers loads it as {type(hf).__name__}; max |logit - dense logit| = {diff:.2e}")

    print("[3] total vs active parameters")
    for name in ("dense", "moe"):
        moekit("params", d[name], head=1)

    print(f"[4] continue training both for {args.continue_steps} steps, same data and options")
    for name in ("dense", "moe"):
        moekit("train", d[name], "--out", d[f"{name}-continued"], "--steps", args.continue_steps, "--warmup", "0",
               "--lr", "1e-3", "--seed", "1", "--force", "--no-progress")

    print("\n[5] results")
    print(f"{'model':<16} {'total':>10} {'active':>10} {'val loss before':>16} {'after':>7} {'train s':>8}  "
          "greedy after '417+86='")
    for name, cls in (("dense", Llama), ("moe", MoEForCausalLM)):
        with open(os.path.join(d[f"{name}-continued"], "train_config.json")) as f:
            run = json.load(f)
        count = params(d[f"{name}-continued"])
        text = complete(cls.from_pretrained(d[f"{name}-continued"]), "417+86=")
        print(f"{name:<16} {count['total_params']:>10,} {count['active_params']:>10,} "
              f"{run['initial_val_loss']:>16.4f} {run['val_loss']:>7.4f} {run['seconds']:>8.1f}  {text!r}")
    print(f"done in {time.time() - t0:.1f}s; checkpoints, metrics.jsonl and train_config.json under {args.out}/")


if __name__ == "__main__":
    main()
