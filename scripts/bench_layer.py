#!/usr/bin/env python
"""The MoE layer benchmark (same as `moekit bench layer`): ours vs transformers' Mixtral block (eager and
grouped_mm experts), megablocks' dropless experts (CUDA, when installed) and a dense SwiGLU of the same active
FLOPs. Defaults: H=1024, F=2816, E=8, k=2, 4096 tokens; fp32 on CPU, bf16 on CUDA. See moe/bench/layer.py.
    .venv/bin/python scripts/bench_layer.py --repeats 5 --json runs/bench/layer.json
On a GPU (Mixtral-8x7B experts; 4k, 16k and 64k tokens; bf16):
    python scripts/bench_layer.py --preset mixtral --device cuda --json runs/bench/layer_gpu.json
"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))
