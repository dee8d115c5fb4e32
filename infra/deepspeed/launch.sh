#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host in the hostfile).
#   bash infra/deepspeed/launch.sh /data/shards /data/runs/b32
# The trainer reads RANK / LOCAL_RANK / WORLD_SIZE from the launcher; --no_local_rank keeps argv clean.
# MASTER_ADDR (default: the first host's `hostname -I`) and MASTER_PORT (29500); later trainer flags win.
# tests/test_infra.py runs this file for real with 2 "hosts" on this machine (pdsh / ssh stand-ins, gloo).
set -euo pipefail
SHARDS=${1:?shards dir}; OUT=${2:?run dir}; shift 2
HOSTFILE=${HOSTFILE:-infra/deepspeed/hostfile}
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
  ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
  --module trainer.train --shards "$SHARDS" --out "$OUT" \
  --model ViT-B-32 --batch-size 256 --zero 2 --grad-checkpointing --precision bf16 "$@"
