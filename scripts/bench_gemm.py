#!/usr/bin/env python
"""Grouped-GEMM benchmark (same as `moekit bench gemm`): ours vs torch.nn.functional.grouped_mm vs a dense matmul
with the same FLOPs, at Mixtral-8x7B expert shapes by default. CPU smoke run:
    .venv/bin/python scripts/bench_gemm.py --tokens 256 --hidden 256 --ffn 512 --iters 2 --json /tmp/gemm.json
"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gemm", *sys.argv[1:]]))
