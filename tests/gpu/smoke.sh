#!/usr/bin/env bash
# GPU smoke checks anyone with CUDA can run from the checkout (well under 8 minutes):  bash tests/gpu/smoke.sh
#  1. KV-cache greedy == cache-free greedy (flanpipe.eval.inference), bf16 and fp32      tests/gpu/kv_cache_smoke.py
#  2. TE THD packed attention == block-diagonal mask path == each segment alone,     tests/gpu/train_smoke.py
#     fp32 and bf16, on the same weights and rows; then 20 bf16 steps of a ~110M-parameter model: tokens/s, MFU
#  3. with 2+ GPUs: the same 20 steps at TP=2 (torchrun)                              train_smoke.py --tp 2
# Without CUDA it says so and exits 0, claiming nothing. CI does not run it (tests/test_inference.py runs
# train_smoke.py --dry-run on CPU so that the script stays right).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "smoke.sh: no CUDA device: nothing checked"
    exit 0
fi
status=0
timeout 150 python tests/gpu/kv_cache_smoke.py || status=1
timeout 150 python tests/gpu/train_smoke.py --steps 20 || status=1
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    timeout 150 torchrun --standalone --nproc_per_node 2 tests/gpu/train_smoke.py --steps 20 --tp 2 --skip-attention || status=1
else
    echo "smoke.sh: $gpus GPU: TP=2 not checked"
fi
[ "$status" -eq 0 ] && echo "smoke.sh: all checks passed" || echo "smoke.sh: SOME CHECKS FAILED"
exit "$status"
