#!/usr/bin/env bash
# Runs mmjax as N cooperating JAX processes on this machine (CPU): the multi-host code path
# (jax.distributed, per-process data shards, cross-process checkpoints) without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh N CONFIG WORKDIR [CONFIG_OVERRIDE...]
#   e.g. launch/local_multiprocess.sh 2 configs/mot_shapes.py:smoke /tmp/mmjax_mp --mode=model
#
#   Process i runs `python -m mmjax.main --config=CONFIG --workdir=WORKDIR [overrides]` with
#   MMJAX_COORDINATOR=127.0.0.1:PORT (a free port), MMJAX_NUM_PROCESSES=N, MMJAX_PROCESS_ID=i,
#   JAX_PLATFORMS=cpu, and writes WORKDIR/logs/process_<i>.log. Overrides may include --mode=...
#   (default: mmjax.main's default).
#   Environment: PYTHON (interpreter, [python]); DEVICES_PER_PROCESS (simulated CPU devices per
#   process via XLA_FLAGS, [1]).
#
# Exit status: 0 if every process succeeded; otherwise the first failing process's status. When
# one process fails the others are stopped (a JAX job cannot continue without a peer) and the
# tail of each failed log is printed.
set -euo pipefail

if (($# < 3)); then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
  exit 2
fi
num="$1"
config="$2"
workdir="$3"
shift 3
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: N must be a positive integer, got '$num'" >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"

logdir="$workdir/logs"
mkdir -p "$logdir"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
echo "local_multiprocess.sh: $num processes, coordinator 127.0.0.1:$port, logs in $logdir"

pids=()
for ((i = 0; i < num; i++)); do
  MMJAX_COORDINATOR="127.0.0.1:$port" MMJAX_NUM_PROCESSES="$num" MMJAX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m mmjax.main --config="$config" --workdir="$workdir" "$@" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done

stop_all() {  # Stops only the processes this script started.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

status=0
failed=()  # The process that failed first (the others were then stopped by this script).
finished=()  # finished[i]=1 once process i has been reaped.
num_finished=0
while ((num_finished < num)); do
  for ((i = 0; i < num; i++)); do
    pid="${pids[$i]}"
    if [[ -n "${finished[$i]:-}" ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    finished[$i]=1
    num_finished=$((num_finished + 1))
    if ((rc != 0 && status == 0)); then
      failed+=("$i")
      status=$rc
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  if ((num_finished < num)); then sleep 0.2; fi
done

for i in ${failed[@]+"${failed[@]}"}; do
  echo "----- $logdir/process_$i.log (tail) -----" >&2
  tail -n 20 "$logdir/process_$i.log" >&2 || true
done
if ((status == 0)); then echo "local_multiprocess.sh: all $num processes succeeded"; fi
exit "$status"
