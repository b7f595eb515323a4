#!/usr/bin/env bash
# The main job on its built-in default: qgalore-train on 2 CPU ranks under the deepspeed launcher
# (tiny LLaMA, ZeRO-2, bf16, INT8 weights, INT4 projectors, 8-bit Adam, built-in English text).
# Extra arguments go to the training tool, e.g. --schedule.steps 50.  A fresh run directory each
# time (a run started again in the same directory resumes from its last checkpoint instead).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --module qgalore_dist.train \
    --run_dir "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
