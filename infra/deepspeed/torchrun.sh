#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo) with torchrun; the trainer builds DeepSpeed inside.
#   bash infra/deepspeed/torchrun.sh /data/shards /data/runs/b32 8
set -euo pipefail
SHARDS=${1:?shards dir}; OUT=${2:?run dir}; NPROC=${3:-8}; shift $(( $# >= 3 ? 3 : $# ))
exec torchrun --standalone --nproc_per_node "$NPROC" -m trainer.train \
  --shards "$SHARDS" --out "$OUT" --model ViT-B-32 --batch-size 256 --zero 2 --grad-checkpointing "$@"
