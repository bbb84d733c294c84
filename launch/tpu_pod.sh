#!/usr/bin/env bash
# Train mmjax on a Cloud TPU VM pod slice: create the slice, install the repo on every worker,
# start the same command detached on all workers (per-worker logs), watch, stop, fetch the logs.
#
# Usage:
#   launch/tpu_pod.sh [run] [--create] [--install] [--wait] [--teardown] [-- CONFIG_OVERRIDE...]
#   launch/tpu_pod.sh status          # per worker: running (pid) or exited (status)
#   launch/tpu_pod.sh logs [LINES]    # the last LINES [50] lines of every worker's log
#   launch/tpu_pod.sh fetch [DIR]     # copy every worker's log into DIR [./tpu_logs/TPU_NAME]
#   launch/tpu_pod.sh stop            # SIGTERM on every worker: all checkpoint one step, exit 143
#
#   Environment (defaults in brackets):
#     TPU_NAME        name of the TPU VM                 [mmjax-pod]
#     ZONE            GCP zone                           [us-east5-a]
#     ACCELERATOR     accelerator type                   [v5p-32]
#     RUNTIME         TPU software version               [v2-alpha-tpuv5]
#     PROJECT         GCP project                        [gcloud's default project]
#     CONFIG          config file[:arg]                  [configs/mot_shapes.py:base]
#     WORKDIR         gs:// (or shared) output directory (required by run)
#     MODE            mmjax.main --mode                  [pipeline]
#     REPO_URL        git URL cloned on the workers; empty -> copy this checkout with scp  []
#     REPO_REF        branch / tag / commit to check out when REPO_URL is set              [main]
#     REMOTE_DIR      repo directory on the workers, relative to the remote home          [mmjax]
#     LOG_DIR         log directory on the workers, relative to the remote home     [mmjax_logs]
#     SPOT            1 -> create a spot slice                                             [0]
#     POLL            seconds between status checks of --wait                             [60]
#
#   run (the default verb) flags:
#     --create    create the slice first (gcloud compute tpus tpu-vm create)
#     --install   copy/clone the repo and `pip install -e .[tpu]` on all workers
#     --wait      poll until every worker's process has exited; exit with the first non-zero
#                 status (143: preempted, rerun the same command to resume)
#     --teardown  delete the slice when the run ends (needs --wait; also when it fails)
#     -- ...      everything after `--` is passed to mmjax.main, e.g. --config.train.steps=100
#
# Example (fresh slice, run, wait, delete):
#   WORKDIR=gs://my-bucket/mmjax/run1 PROJECT=my-proj \
#     launch/tpu_pod.sh --create --install --wait --teardown -- --config.train.steps=2000
#
# Detached: `run` starts `python3 -m mmjax.main` under nohup on every worker and returns; an ssh
# disconnect does not stop it. Worker W writes LOG_DIR/worker_W.log (W from the TPU metadata
# server's agent-worker-number), its pid to LOG_DIR/worker_W.pid and, when it ends, its exit
# status to LOG_DIR/worker_W.status. `run` refuses to start while a previous run is alive.
# Rerunning the same `run` after a preemption or `stop` resumes: every stage is idempotent and
# training restarts from the newest checkpoint in WORKDIR (a gs:// bucket all workers see).
#
# No --coordinator_address is passed: MMJAX_DISTRIBUTED_AUTO=1 makes mmjax call
# jax.distributed.initialize() without arguments, which on a TPU pod reads the worker topology
# from the TPU metadata server, so every worker runs the identical command.
set -euo pipefail

TPU_NAME="${TPU_NAME:-mmjax-pod}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-32}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/mot_shapes.py:base}"
WORKDIR="${WORKDIR:-}"
MODE="${MODE:-pipeline}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-mmjax}"
LOG_DIR="${LOG_DIR:-mmjax_logs}"
SPOT="${SPOT:-0}"
POLL="${POLL:-60}"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d'; }

verb=run
case "${1:-}" in
  run|status|logs|fetch|stop) verb="$1"; shift ;;
esac

gcloud_args=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_args+=(--project="$PROJECT"); fi

# Runs a command on every worker of the slice.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command="$1"
}

# Remote shell prelude: the worker's index (MMJAX_WORKER_ID, else the TPU metadata server's
# agent-worker-number, else the hostname) and its log/pid/status files.
worker_files="w=\${MMJAX_WORKER_ID:-\$(curl -sf --max-time 5 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
|| hostname)}; mkdir -p $LOG_DIR; log=$LOG_DIR/worker_\$w.log; pidf=$LOG_DIR/worker_\$w.pid; \
statf=$LOG_DIR/worker_\$w.status"
# Prints "worker W: running (pid P)" / "worker W: exited (status S)" / "worker W: never started".
status_cmd="$worker_files; if [ -f \$pidf ] && kill -0 \$(cat \$pidf) 2>/dev/null; then \
echo \"worker \$w: running (pid \$(cat \$pidf))\"; elif [ -f \$statf ]; then \
echo \"worker \$w: exited (status \$(cat \$statf))\"; elif [ -f \$pidf ]; then \
echo \"worker \$w: exited (status unknown)\"; else echo \"worker \$w: never started\"; fi"

case "$verb" in
  status)
    on_all_workers "$status_cmd"
    exit 0 ;;
  logs)
    lines="${1:-50}"
    if ! [[ "$lines" =~ ^[0-9]+$ ]]; then echo "tpu_pod.sh: logs LINES must be a number" >&2; exit 2; fi
    on_all_workers "$worker_files; echo \"===== worker \$w: \$log\"; tail -n $lines \$log"
    exit 0 ;;
  fetch)
    dest="${1:-tpu_logs/$TPU_NAME}"
    mkdir -p "$dest"
    gcloud compute tpus tpu-vm scp "$TPU_NAME:$LOG_DIR/*" "$dest/" "${gcloud_args[@]}" \
      --worker=all --recurse
    echo "tpu_pod.sh: logs of $TPU_NAME in $dest"
    exit 0 ;;
  stop)
    on_all_workers "$worker_files; if [ -f \$pidf ] && kill -0 \$(cat \$pidf) 2>/dev/null; then \
kill -TERM \$(cat \$pidf) && echo \"worker \$w: SIGTERM sent\"; else echo \"worker \$w: not running\"; fi"
    echo "tpu_pod.sh: sent SIGTERM; the workers checkpoint one agreed step and exit 143 (see status)"
    exit 0 ;;
esac

do_create=0
do_install=0
do_wait=0
do_teardown=0
overrides=()
while (($#)); do
  case "$1" in
    --create) do_create=1 ;;
    --install) do_install=1 ;;
    --wait) do_wait=1 ;;
    --teardown) do_teardown=1 ;;
    --) shift; overrides=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (config overrides go after --)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$WORKDIR" ]]; then
  echo "tpu_pod.sh: set WORKDIR (e.g. gs://bucket/mmjax/run1)" >&2
  exit 2
fi
if ((do_teardown && !do_wait)); then
  echo "tpu_pod.sh: --teardown needs --wait (the run is detached; deleting the slice at once would kill it)" >&2
  exit 2
fi

teardown() {
  echo "tpu_pod.sh: deleting $TPU_NAME"
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_args[@]}" --quiet
}
if ((do_teardown)); then trap teardown EXIT; fi

if ((do_create)); then
  create_args=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then create_args+=(--spot); fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}" "${create_args[@]}"
fi

if ((do_install)); then
  if [[ -n "$REPO_URL" ]]; then
    on_all_workers "rm -rf $REMOTE_DIR && git clone $REPO_URL $REMOTE_DIR && \
      cd $REMOTE_DIR && git checkout $REPO_REF"
  else
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="$(mktemp -t mmjax-XXXXXX.tar.gz)"
    git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
      | tar -C "$repo_root" --null -T - -czf "$archive"
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/mmjax.tar.gz" \
      "${gcloud_args[@]}" --worker=all
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && \
      tar -C $REMOTE_DIR -xzf /tmp/mmjax.tar.gz"
    rm -f "$archive"
  fi
  on_all_workers "cd $REMOTE_DIR && python3 -m pip install -q --upgrade pip && \
    python3 -m pip install -q -e '.[tpu]'"
fi

# The mmjax command, every argument quoted for the remote shell.
mmjax_cmd="MMJAX_DISTRIBUTED_AUTO=1 python3 -m mmjax.main"
for arg in --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" ${overrides[@]+"${overrides[@]}"}; do
  mmjax_cmd+=" $(printf '%q' "$arg")"
done
# Detached under nohup: the pid file holds mmjax's pid (for stop), the status file its exit code.
# A simple command sent to the background is exec'd by the forked shell, so $! is mmjax's pid.
# shellcheck disable=SC2016  # $! and $? are for the remote wrapper shell
wrapper="cd $REMOTE_DIR || exit 1; $mmjax_cmd & echo \$! > \"\$1\"; wait \$!; echo \$? > \"\$2\""
remote_cmd="$worker_files; if [ -f \$pidf ] && kill -0 \$(cat \$pidf) 2>/dev/null; then \
echo \"worker \$w: a run is still alive (pid \$(cat \$pidf)); stop it first\" >&2; exit 3; fi; \
rm -f \$statf; nohup bash -c $(printf '%q' "$wrapper") mmjax-run \$PWD/\$pidf \$PWD/\$statf \
> \$log 2>&1 < /dev/null & echo \"worker \$w: started, log ~/\$log\""
echo "tpu_pod.sh: starting on all workers of $TPU_NAME (detached): $mmjax_cmd"
on_all_workers "$remote_cmd"
echo "tpu_pod.sh: follow with '$0 status', '$0 logs', '$0 fetch'; '$0 stop' checkpoints and stops"

if ((do_wait)); then
  while true; do
    sleep "$POLL"
    report="$(on_all_workers "$status_cmd")"
    echo "$report"
    if ! grep -q ": running" <<<"$report"; then break; fi
  done
  first_bad="$(grep -o 'exited (status [0-9]*)' <<<"$report" | grep -v 'status 0)' | head -n 1 \
    | grep -o '[0-9]*' || true)"
  if [[ -n "$first_bad" ]]; then
    echo "tpu_pod.sh: a worker exited with status $first_bad ('$0 logs' shows why)" >&2
    exit "$first_bad"
  fi
  echo "tpu_pod.sh: every worker finished"
fi
