#!/usr/bin/env bash
# Idempotent set-up: .venv with CPU torch (unless CUDA is present) and moekit installed editable with its dev extra
# (pytest, transformers, ruff, triton, matplotlib for `moekit plot`, datasets, mergekit as a referee).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || python3 -m venv .venv
stamp=".venv/.moekit-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"  # re-run when either changes
[ -f "$stamp" ] && exit 0
# (this machine's pip config names local index folders that may not exist: drop pip's warning for each)
pip() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip torch
    else
        # A plain `torch` requirement would pull the multi-GB CUDA build: install the CPU build first.
        pip torch==2.13.0 || pip torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip -e ".[dev]"
rm -f .venv/.moekit-*
touch "$stamp"
echo "moekit set up in .venv"
