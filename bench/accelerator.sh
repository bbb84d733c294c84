#!/usr/bin/env bash
# The accelerator benchmark suite in one go (one GPU or one TPU host), each script under its own
# time limit so that one slow compile cannot eat the others' time (a lent GPU may come with only
# minutes of device time: the defaults fit in about 8.5 minutes on one H200, where compiling
# the 1b step takes 75 s and a 300m variant 45 s).
#
#   bash bench/accelerator.sh [OUT_DIR]        # default OUT_DIR: bench/results/accelerator
#
# In order, each writing NAME.json and NAME.log into OUT_DIR:
#   attention.json      the fused attention paths against the einsum reference at the big
#                       configs' head shape: values and gradients on this hardware (equivalence),
#                       compiled temp memory at 1024 and 8192 tokens, time at 1024
#   ragged_dot.json     does jax.lax.ragged_dot cost M x a dense matmul here? (HLO, FLOPs, time)
#   step_buckets.json   MFU on real tokens for BIG_SIZE with mot_impl=buckets (the attention
#                       path is the fastest one that passed the check above); with RAGGED=1
#   step_ragged.json    also with mot_impl=ragged
#   mot_overhead.json   dense vs MoT-2 at MID_SIZE, equal active FLOPs, timed round-robin
#   decode.json         KV-cache decode at context 64 vs 1024, batch DECODE_BATCH
# Override with the env vars below, e.g. BIG_SIZE=300m BATCH=16 bash bench/accelerator.sh.
set -u
OUT_DIR=${1:-bench/results/accelerator}
BIG_SIZE=${BIG_SIZE:-1b}            # configs/mot_shapes.py size of the MFU figure
MID_SIZE=${MID_SIZE:-base}          # size of the MoT / dense ratio
BATCH=${BATCH:-32}                  # global batch of BIG_SIZE (sequences of 1024 tokens)
MID_BATCH=${MID_BATCH:-16}
STEPS=${STEPS:-6}                   # timed steps per benchmark
HEADS=${HEADS:-16}                  # attention benchmark: heads x head_dim of BIG_SIZE
HEAD_DIM=${HEAD_DIM:-128}
ATT_BATCH=${ATT_BATCH:-4}
DECODE_SIZE=${DECODE_SIZE:-base}
DECODE_BATCH=${DECODE_BATCH:-64}
SCALE=${SCALE:-1}                   # multiplies every time limit (a slower machine)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

run() {  # run NAME LIMIT_S MODULE ARGS...: one benchmark under its limit -> NAME.json, NAME.log
  local name=$1 limit=$2 module=$3; shift 3
  echo "== $name ($module, limit ${limit}x${SCALE} s): $*"
  local start=$SECONDS
  # Its own session, so that whatever a timed-out run leaves behind (ragged_dot's re-run of
  # itself) is killed with it, and nothing outside this suite is.
  setsid timeout "$((limit * SCALE))" python3 -m "bench.$module" --out="$OUT_DIR/$name.json" "$@" \
    > "$OUT_DIR/$name.log" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  pkill -KILL -s "$pid" 2>/dev/null
  grep -v -E '^\s+[]["{}0-9.,-]|^[IW][0-9]{4} ' "$OUT_DIR/$name.log" | tail -n 25
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
run attention 70 attention_memory --heads="$HEADS" --head_dim="$HEAD_DIM" --batch="$ATT_BATCH" \
  --lengths=1024,8192 --time_lengths=1024 --impls=reference,chunked,pallas,cudnn --block=128
# The fastest path at 1024 tokens whose gradients match the reference to bf16 rounding.
ATT=$(python3 - "$OUT_DIR/attention.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception:
    rows = []
ok = [r for r in rows if "step_s" in r and (r["impl"] == "reference" or max(
      r.get(f"grad_{n}_rel_err", 1.0) for n in "qkv") < 0.05)]
print(min(ok, key=lambda r: r["step_s"])["impl"] if ok else "reference")
EOF
)
echo "== attention path for the training steps: $ATT"
run ragged_dot 40 ragged_dot_check --shapes=32768x2048x5632x2 --xla_variants --repeats=5
run step_buckets 170 step_time --sizes="$BIG_SIZE" --batch_size="$BATCH" \
  --steps="$STEPS" --warmup=1 --mot_impl=buckets --attention_impl="$ATT"
run mot_overhead 110 mot_overhead --size="$MID_SIZE" --batch_size="$MID_BATCH" \
  --variants=dense,mot2 --impls=buckets --steps="$STEPS" --warmup=1 --attention_impl="$ATT"
run decode 90 decode --size="$DECODE_SIZE" --batch_size="$DECODE_BATCH" --steps=32
if [[ "${RAGGED:-0}" == 1 ]]; then  # the same BIG_SIZE step with ragged_dot (another 170 s)
  run step_ragged 170 step_time --sizes="$BIG_SIZE" --batch_size="$BATCH" \
    --steps="$STEPS" --warmup=1 --mot_impl=ragged --attention_impl="$ATT"
fi
echo "== done in $SECONDS s"
