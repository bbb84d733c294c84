#!/usr/bin/env bash
# Train mmjax on a Cloud TPU VM pod slice: create the slice, install the repo on every worker,
# run the same command on all workers, optionally delete the slice.
#
# Usage:
#   launch/tpu_pod.sh [--create] [--install] [--teardown] [-- CONFIG_OVERRIDE...]
#
#   Environment (defaults in brackets):
#     TPU_NAME        name of the TPU VM                 [mmjax-pod]
#     ZONE            GCP zone                           [us-east5-a]
#     ACCELERATOR     accelerator type                   [v5p-32]
#     RUNTIME         TPU software version               [v2-alpha-tpuv5]
#     PROJECT         GCP project                        [gcloud's default project]
#     CONFIG          config file[:arg]                  [configs/mot_shapes.py:base]
#     WORKDIR         gs:// (or shared) output directory (required)
#     MODE            mmjax.main --mode                  [pipeline]
#     REPO_URL        git URL cloned on the workers; empty -> copy this checkout with scp  []
#     REPO_REF        branch / tag / commit to check out when REPO_URL is set              [main]
#     REMOTE_DIR      repo directory on the workers, relative to the remote home          [mmjax]
#     SPOT            1 -> create a spot slice                                             [0]
#
#   Flags:
#     --create    create the slice first (gcloud compute tpus tpu-vm create)
#     --install   copy/clone the repo and `pip install -e .[tpu]` on all workers
#     --teardown  delete the slice when the run ends (also when it fails)
#     -- ...      everything after `--` is passed to mmjax.main, e.g. --config.train.steps=100
#
# Example (fresh slice, run, delete):
#   WORKDIR=gs://my-bucket/mmjax/run1 PROJECT=my-proj \
#     launch/tpu_pod.sh --create --install --teardown -- --config.train.steps=2000
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
SPOT="${SPOT:-0}"

do_create=0
do_install=0
do_teardown=0
overrides=()
while (($#)); do
  case "$1" in
    --create) do_create=1 ;;
    --install) do_install=1 ;;
    --teardown) do_teardown=1 ;;
    --) shift; overrides=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (config overrides go after --)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$WORKDIR" ]]; then
  echo "tpu_pod.sh: set WORKDIR (e.g. gs://bucket/mmjax/run1)" >&2
  exit 2
fi

gcloud_args=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_args+=(--project="$PROJECT"); fi

# Runs a command on every worker of the slice.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command="$1"
}

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

# Quote every argument for the remote shell.
remote_cmd="cd $REMOTE_DIR && MMJAX_DISTRIBUTED_AUTO=1 python3 -m mmjax.main"
for arg in --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" ${overrides[@]+"${overrides[@]}"}; do
  remote_cmd+=" $(printf '%q' "$arg")"
done
echo "tpu_pod.sh: running on all workers of $TPU_NAME: $remote_cmd"
on_all_workers "$remote_cmd"
