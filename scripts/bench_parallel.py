#!/usr/bin/env python
"""Training memory across processes: one upcycled model trained for a few fp32 steps by 2 gloo processes (or
NCCL GPUs), replicated, with --shard-degree 2, and with --expert-parallel 2; per process the peak memory (RSS on
a CPU, allocated on a GPU) once set up (the model loaded and split) and over the run, the training state it held
(weights, gradients, AdamW moments) and the tokens/s, beside what `moekit params --gpus 2 ...` plans for that
state.

    .venv/bin/python scripts/bench_parallel.py          # SmolLM2-135M-shaped, 4 experts on every other layer: ~254M
    .venv/bin/python scripts/bench_parallel.py --layers 4 --steps 2 --json /tmp/p.json   # a quick look

The model is random (made here, then upcycled with `moekit upcycle`), the text the built-in arithmetic corpus
through a byte tokenizer. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moekit.llama.config import LlamaConfig
from moekit.llama.model import Llama
from moekit.moe.accounting import Plan, count_params, derive

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"replicated": [], "shard 2": ["--shard-degree", "2"], "expert-parallel 2": ["--expert-parallel", "2"]}


def make_model(work: Path, layers: int, experts: int) -> Path:
    """A random SmolLM2-135M-shaped dense Llama (`layers` deep), upcycled to `experts` experts on every other layer."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    Llama(config).save_pretrained(work / "dense")
    subprocess.run([sys.executable, "-m", "moekit", "upcycle", str(work / "dense"), str(work / "moe"),
                    "--num-experts", str(experts), "--moe-layers", "every-other", "--no-verify", "--no-progress"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return work / "moe"


def train(model: Path, out: Path, layout: list[str], args) -> dict:
    """One run under torchrun; its last metrics line, with the peak memory through set-up (of its first line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           "-m", "moekit", "train", str(model), "--tokenizer", "bytes", "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--log-every", "1",
           "--eval-batches", "1", "--no-progress", "--out", str(out), *layout]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.processes))})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return {**lines[-1], "setup_memory_gb": next(m["setup_memory_gb"] for m in lines if "setup_memory_gb" in m)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", default="bench_parallel.json", help="where to write the results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work, args.layers, args.experts)
        count = count_params(str(model))
        rows = []
        for i, (name, layout) in enumerate(LAYOUTS.items()):
            last = train(model, work / f"run{i}", layout, args)
            shard = args.processes if "--shard-degree" in layout else None
            ep = args.processes if "--expert-parallel" in layout else 1
            planned = derive(count, Plan(dtype="fp32", gpus=args.processes, shard_degree=shard, expert_parallel=ep))
            rows.append({"layout": name, "setup_memory_gb": last["setup_memory_gb"],
                         "peak_memory_gb": last["peak_memory_gb"],
                         "train_state_gb": last["train_state_gb"],
                         "planned_state_gb": round(planned.figure("train_memory_bytes_per_gpu").value / 1e9, 3),
                         "tokens_per_s": last["tokens_per_s"]})
    base = rows[0]["peak_memory_gb"]
    print(f"{count.total_params / 1e6:.0f}M parameters ({count.total.get('routed_experts', 0) / 1e6:.0f}M in routed "
          f"experts), {args.processes} processes, {args.steps} fp32 steps of {args.batch_size} x {args.seq_len} "
          f"tokens per process; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'layout':<20}{'set-up GB':>10}{'peak GB':>10}{'vs repl.':>10}{'state GB':>10}{'planned':>10}"
          f"{'tokens/s':>10}")
    for r in rows:
        print(f"{r['layout']:<20}{r['setup_memory_gb']:>10.2f}{r['peak_memory_gb']:>10.2f}"
              f"{r['peak_memory_gb'] / base:>10.2f}"
              f"{r['train_state_gb']:>10.3f}{r['planned_state_gb']:>10.3f}{r['tokens_per_s']:>10.0f}")
    record = {"parameters": count.total_params, "routed_expert_parameters": count.total.get("routed_experts", 0),
              "processes": args.processes, "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
