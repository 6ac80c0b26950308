#!/usr/bin/env bash
# The GPU check: one call on a machine with an NVIDIA GPU measures what no
# CPU test can, and writes logs and JSON into OUT_DIR.
#
#   bash experiments/gpu_check.sh OUT_DIR            # on the GPU (cuda)
#   bash experiments/gpu_check.sh --dry-run OUT_DIR  # list the parts only
#
# Parts, each under `timeout` (seconds below: at most ~10 minutes in all,
# less when parts finish early):
# the environment and device; the accelerator-marked tests on the GPU (not
# its CPU); benchmark.py sections attacks, loop, runs (R = 1, 8, 24; vmap
# vs unroll) and autoattack; the main job; a kill -9 and resume of a short
# run against the uninterrupted run, with XLA's deterministic-ops flag off
# and on. Every part runs even if an earlier one failed; OUT_DIR/parts.jsonl
# records each part's exit code and seconds (124: it ran out of time).
# On a bare GPU machine without a package index, pack what it lacks here
# first (../shared/tools/pack-accelerator-run, carried as .accel/): the
# script sources .accel/env.sh when it exists. PYTHON names the interpreter
# (default python3).
# GPU_CHECK_PARTS="tests resume" runs only the parts named (a rerun of one);
# GPU_CHECK_TIMEOUT_SCALE=N multiplies every part's timeout (a loaded CPU);
# GPU_CHECK_PLATFORM=cpu runs them on the CPU (a check of the script
# itself; the numbers are then CPU numbers).
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out=${1:?usage: bash experiments/gpu_check.sh [--dry-run] OUT_DIR}
platform=${GPU_CHECK_PLATFORM:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Several JAX processes (and PyTorch) share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_PLATFORMS=$platform
# shellcheck disable=SC1091
[ -f .accel/env.sh ] && . .accel/env.sh
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: its output in OUT_DIR/NAME.log
  local name=$1 limit=$(( $2 * ${GPU_CHECK_TIMEOUT_SCALE:-1} ))
  shift 2
  if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]
  then
    return
  fi
  if [ "$dry_run" = 1 ]; then
    echo "$name (timeout ${limit} s): $*"
    return
  fi
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '{"part": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" \
    $((SECONDS - start)) >> "$out/parts.jsonl"
  tail -n 3 "$out/$name.log"
}

[ "$dry_run" = 1 ] || : > "$out/parts.jsonl"
part environment 30 "$py" -c "
import json, platform, jax, flax, optax
devices = jax.devices()
print(json.dumps({'python': platform.python_version(), 'jax': jax.__version__,
                  'flax': flax.__version__, 'optax': optax.__version__,
                  'backend': jax.default_backend(),
                  'devices': [str(d) for d in devices],
                  'device_kind': devices[0].device_kind}))"
part tests 120 "$py" -m pytest -m accelerator -n 2 -q -p no:cacheprovider \
  --durations=15
part benchmark_attacks 75 "$py" experiments/benchmark.py \
  --sections=attacks --models=lenet,svhn_lenet,resnet18 --reps=3 \
  --output="$out/benchmark_gpu_attacks.json"
part benchmark_loop 75 "$py" experiments/benchmark.py --sections=loop \
  --loop_bare_seconds=2 --output="$out/benchmark_gpu_loop.json"
part benchmark_runs 75 "$py" experiments/benchmark.py --sections=runs \
  --run_counts=1,8,24 --reps=3 --e2e_runs=0 \
  --output="$out/benchmark_gpu_runs.json"
part benchmark_autoattack 60 "$py" experiments/benchmark.py \
  --sections=autoattack --models=mlp --aa_examples=500 \
  --aa_runs_examples=500 --aa_train_steps=100 \
  --output="$out/benchmark_gpu_autoattack.json"
part main_job 60 "$py" experiments/train.py --workdir="$out/main_job" \
  --compilation_cache_dir="$out/jax_cache"
part resume 45 "$py" experiments/resume_check.py \
  --output="$out/resume.json"
part resume_deterministic 45 env \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  "$py" experiments/resume_check.py --output="$out/resume_deterministic.json"
[ "$dry_run" = 1 ] || echo "parts: $out/parts.jsonl"
