#!/usr/bin/env bash
# The main job on its built-in default: a short Q-GaLore training of a tiny LLaMA.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m qgalore_dist.demo "$@"
