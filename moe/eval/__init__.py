"""Evaluation: what a checkpoint is worth on text (`score`: loss and bits per byte with intervals, sliding
windows), where its tokens go (`routing`: per-label expert shares and specialisation), and standard tasks through
lm-evaluation-harness (`harness`, the `eval` extra)."""
