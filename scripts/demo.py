"""moekit end to end on a small built-in model: build a dense Llama, save it as a Hugging Face checkpoint, load it
back, generate, count its parameters."""

from __future__ import annotations

import argparse
import os
import time

import torch

from llama import Llama, LlamaConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="mini", help="dense Llama preset (default: mini)")
    p.add_argument("--out", default="runs/demo", help="working directory (default: runs/demo)")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    dense_dir = os.path.join(args.out, "dense")

    config = LlamaConfig.from_name(args.preset)
    model = Llama(config)
    model.save_pretrained(dense_dir, max_shard_size="1MB", force=True)
    print(f"[1] built Llama '{args.preset}' ({model.num_parameters():,} parameters) and saved it to {dense_dir}")

    loaded = Llama.from_pretrained(dense_dir)
    prompt = torch.tensor([[config.bos_token_id, 17, 42, 99]])
    same = torch.equal(loaded(prompt).logits, model(prompt).logits)
    tokens = loaded.generate(prompt, max_new_tokens=12)
    print(f"[2] loaded it back (logits identical: {same}); greedy continuation: {tokens[0, 4:].tolist()}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
