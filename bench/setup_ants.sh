#!/usr/bin/env bash
# Creates .venv-ants: the interpreter bench/register_bench.py runs ANTs SyN in
# (bench/ants_worker.py). antspyx needs numpy<2.4 / scipy<1.16, which conflict with the
# project's pins, so it lives in its own venv and runs as a subprocess.
#
#   bash bench/setup_ants.sh            # from anywhere; creates <repo>/.venv-ants
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-ants
.venv-ants/bin/pip install antspyx==0.6.3 nibabel==5.4.2
.venv-ants/bin/python -c "import ants, nibabel; print('antspyx', ants.__version__, 'nibabel', nibabel.__version__, 'ready in .venv-ants')"
