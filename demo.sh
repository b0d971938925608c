#!/usr/bin/env bash
# The README's first command: set up .venv from this checkout (offline-capable: only the
# package registry is needed, no model weights), then run the end-to-end demo on CPU.
#   bash demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
if ! .venv/bin/python -c "import fmir_jax, jax, flax, torch, transformers" 2>/dev/null; then
  echo "setting up .venv (first run only) ..."
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
fi
exec .venv/bin/python -m fmir_jax.demo --out "${1:-demo_out}"
