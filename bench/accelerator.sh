#!/usr/bin/env bash
# The accelerator benchmark suite in one go (one GPU or one TPU host), each script under its own
# time limit so that one slow compile cannot eat the others' time.
#
#   bash bench/accelerator.sh [OUT_DIR]        # default OUT_DIR: bench/results/accelerator
#
# Writes step_time.json (MFU for the 300m and 1b configs in bf16 with remat), mot_overhead.json
# (dense / MoT-2 / MoT-3 at the base size, ragged_dot vs tiled) and decode.json (KV-cache decode
# per token at context 64 vs 1024), plus a log per script. Override the sizes with the env vars
# below, e.g. STEP_SIZES=base BATCH=16 bash bench/accelerator.sh.
set -u
OUT_DIR=${1:-bench/results/accelerator}
STEP_SIZES=${STEP_SIZES:-300m,1b}   # configs/mot_shapes.py sizes for the MFU table
BATCH=${BATCH:-16}                  # global batch (sequences of 1024 tokens)
STEPS=${STEPS:-8}                   # timed steps per benchmark
LIMIT_S=${LIMIT_S:-240}             # per-script wall-clock limit
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

run() {  # run NAME ARGS...: one benchmark under the time limit, output to NAME.log and NAME.json
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT_S" python3 -m "bench.$name" --out="$OUT_DIR/$name.json" "$@" \
    2>&1 | tee "$OUT_DIR/$name.log" | grep -v -E '^\s+[]["{}0-9.,-]' || true
}

python3 -c "import jax; print(jax.__version__, jax.devices())"
run step_time --sizes="$STEP_SIZES" --batch_size="$BATCH" --steps="$STEPS" --warmup=2
run mot_overhead --size=base --batch_size="$BATCH" --impls=ragged,tiled --steps="$STEPS" --warmup=2
run decode --size=base --steps=32
run ragged_dot_check --xla_variants   # does ragged_dot cost M x dense FLOPs here? (issue 14.6)
run attention_memory --lengths=1024,8192 --time_lengths=1024,8192 --impls=reference,chunked,pallas,cudnn
