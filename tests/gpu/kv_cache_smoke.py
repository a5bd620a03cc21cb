"""GPU smoke check of flanpipe.eval.inference: KV-cache greedy == cache-free greedy on CUDA (bf16 and fp32).

Run by tests/gpu/smoke.sh. Without CUDA it says so and exits 0, claiming nothing.
"""

from __future__ import annotations

import random
import sys
import time

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("kv_cache_smoke: no CUDA device: nothing checked")
        return 0
    from flanpipe.core.model_config import ModelConfig
    from flanpipe.eval.evaluate import greedy_generate
    from flanpipe.eval.inference import ParallelLM, greedy_generate_cached
    from flanpipe.model.gpt import init_single_process, model_provider

    init_single_process()
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024, vocab_size=4096,
                      max_position_embeddings=512, init_method_std=0.3)  # fmt: skip
    torch.manual_seed(0)
    lm = ParallelLM(model_provider(cfg).cuda(), cfg)

    class CacheFree:
        logits = lm.logits

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 4096) for _ in range(rng.randint(8, 200))] for _ in range(64)]
    t0 = time.perf_counter()
    want = greedy_generate(CacheFree(), prompts, 32, eos_id=1, batch_size=32)
    t1 = time.perf_counter()
    got = greedy_generate_cached(lm, prompts, 32, eos_id=1, batch_size=32)
    t2 = time.perf_counter()
    same = sum(a == b for a, b in zip(got, want, strict=True))
    print(f"kv_cache_smoke: {same}/{len(prompts)} rows equal; cache-free {t1 - t0:.2f} s, KV cache {t2 - t1:.2f} s")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
