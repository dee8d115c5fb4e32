#!/usr/bin/env bash
# Ray Train: training as a Ray job on a running Ray cluster (infra/ray/cluster.yaml, a KubeRay RayCluster, or a
# local `ray start --head`). trainer.ray_launch runs the same trainer.train on N Ray Train workers (one per rank).
#   RAY_API_SERVER_ADDRESS=http://HEAD_IP:8265 bash infra/ray/train_job.sh /data/shards /data/runs/b32 16
#   RAY_LAUNCH_FLAGS="--cpus-per-worker 1" bash infra/ray/train_job.sh /data/shards /data/runs/cpu 2 \
#       --model tiny --precision fp32 --batch-size 32          # CPU workers (gloo); later trainer flags win
# SHARDS and OUT: absolute paths on storage mounted at the same path on the head (the job's driver checks the shards)
# and on every worker (NFS, a shared PVC, ...). Rank 0 writes OUT exactly as under torchrun.
set -euo pipefail
SHARDS=${1:?shards dir}; OUT=${2:?run dir}; WORKERS=${3:-2}; shift $(( $# >= 3 ? 3 : $# ))
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}   # Ray >= 2.60: the job API wants the cluster's token
# one GPU per worker by default; RAY_LAUNCH_FLAGS replaces these launcher flags (see python -m trainer.ray_launch -h)
read -r -a LAUNCH <<< "${RAY_LAUNCH_FLAGS---use-gpu --cpus-per-worker 8}"
exec ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  ${SUBMISSION_ID:+--submission-id "$SUBMISSION_ID"} -- \
  python -m trainer.ray_launch --num-workers "$WORKERS" "${LAUNCH[@]}" -- \
  --shards "$SHARDS" --out "$OUT" --model ViT-B-32 --batch-size 256 --zero 2 --grad-checkpointing --precision bf16 "$@"
