#!/usr/bin/env bash
# Set up (idempotent), then run moekit's main job end to end on a small built-in model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
