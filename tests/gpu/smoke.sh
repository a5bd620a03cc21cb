#!/usr/bin/env bash
# GPU smoke checks anyone with CUDA can run from the checkout (a few minutes):  bash tests/gpu/smoke.sh
# Covered so far: KV-cache greedy == cache-free greedy (flanpipe.inference) on one GPU.
# NOT yet covered (planned): THD packed attention vs block-diagonal mask losses, 20 bf16 training steps of
# ~100M params with tokens/s and MFU, TP=2 on two GPUs. Without CUDA it says so and exits 0, claiming nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "smoke.sh: no CUDA device: nothing checked"
    exit 0
fi
timeout 480 python tests/gpu/kv_cache_smoke.py
