#!/usr/bin/env bash
# The accelerator check: one script for a machine with one NVIDIA GPU and no network.
#
#   bash bench/gpu_check.sh --prepare     # here, with the package registry: wheels -> .whl/
#   bash bench/gpu_check.sh               # there (the tree copied, .whl/ carried along)
#
# There, it installs what the machine's Python lacks from .whl/ (no network), installs this
# project without touching its jax/torch, then writes under $OUT (default bench_results/gpu):
#   env.txt        nvidia-smi, jax devices, versions
#   tests.txt      the engine tests on the GPU (model, warp, losses, train, features, conv)
#   bench.txt      python bench/run.py --suite gpu (+ gpu.json)
#   train.txt      a 200-step training of the demo config on the GPU, with nvidia-smi
#                  memory samples (train_memory.csv) and the steps/s TensorBoard recorded
# Each stage has its own time limit; a failing stage is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
PKGS=(nibabel==5.4.2 ml-collections==1.1.0 grain==0.2.18 tensorboardX==2.6.5 array-record
      cloudpickle portpicker etils importlib-resources pytest-xdist==3.8.0 execnet)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHL"
  for py in 3.10 3.11 3.12 3.13; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
      -d "$WHL" "${PKGS[@]}" || echo "gpu_check: some wheels for Python $py missing"
  done
  ls "$WHL"
  exit 0
fi

OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
stage() {  # stage NAME SECONDS COMMAND...: runs it, logs to $OUT/NAME.txt, never aborts
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/stages.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
  tail -n 5 "$OUT/$name.txt"
}

stage install 240 bash -c "$PY -m pip install -q --no-index --no-deps --find-links $WHL \
  ${PKGS[*]} && $PY -m pip install -q --no-deps --no-build-isolation -e ."
stage env 60 bash -c "nvidia-smi; $PY -c 'import jax, torch, flax; print(jax.__version__, \
  jax.devices(), torch.__version__, torch.cuda.is_available(), flax.__version__)'"
stage tests 300 "$PY" -m pytest -x -q -n 0 -p no:cacheprovider tests/test_model.py \
  tests/test_warp.py tests/test_losses.py tests/test_features.py tests/test_conv.py \
  tests/test_train.py
stage bench 420 "$PY" bench/run.py --suite gpu --json "$OUT/gpu.json"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 1 \
  > "$OUT/train_memory.csv" 2>/dev/null &
SMI=$!
stage train 300 "$PY" -m fmir_jax.demo --out "$OUT/demo" --steps 200 --no-register
kill "$SMI" 2>/dev/null
echo "gpu_check: results in $OUT"
