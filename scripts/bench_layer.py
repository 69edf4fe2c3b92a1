#!/usr/bin/env python
"""The MoE layer benchmark (same as `moekit bench layer`): ours vs transformers' Mixtral block (eager and
grouped_mm experts) vs a dense SwiGLU of the same active FLOPs. Default shapes: H=1024, F=2816, E=8, k=2,
4096 tokens, fp32.
    .venv/bin/python scripts/bench_layer.py --repeats 5 --json bench-layer.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))
