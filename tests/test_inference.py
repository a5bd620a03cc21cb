"""KV-cache decoding and shared-prefix option scoring (flanpipe.eval.inference) against the cache-free paths.

A tiny Megatron GPTModel with a large init (logits far from ties) in one process. The cache-free
references are flanpipe.eval.evaluate's, which tests/test_evaluate.py checks against brute force.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from flanpipe.core.model_config import ModelConfig
from flanpipe.eval.evaluate import greedy_generate, option_logprobs, option_logprobs_packed, rank_classification
from flanpipe.eval.inference import ParallelLM, greedy_generate_cached, option_logprobs_shared

VOCAB = 64
MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "gated_linear_unit": False,
    "activation": "gelu",
    "normalization": "LayerNorm",
    "init_method_std": 0.3,
}


class CacheFree:
    """The same model seen only through ``logits``: evaluate's cache-free code paths."""

    def __init__(self, lm: ParallelLM) -> None:
        self.logits = lm.logits


@pytest.fixture(scope="module", params=["rope", "learned_absolute"])
def lm(request: pytest.FixtureRequest) -> ParallelLM:
    from flanpipe.model.gpt import init_single_process, model_provider

    init_single_process()
    cfg = ModelConfig(**MODEL, position_embedding_type=request.param)
    torch.manual_seed(0)
    return ParallelLM(model_provider(cfg), cfg)


def ragged(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_kv_cache_greedy_equals_cache_free_greedy(lm: ParallelLM) -> None:
    rng = random.Random(0)
    inputs = ragged(rng, 11, 1, 12)  # ragged lengths 1..12 in batches of 4: prefill + teacher forcing
    free = greedy_generate(CacheFree(lm), inputs, 6, eos_id=-1, batch_size=4)
    assert all(len(g) == 6 for g in free)
    eos = free[0][2]  # a token the model emits mid-continuation: some rows stop early
    want = greedy_generate(CacheFree(lm), inputs, 6, eos, batch_size=4)
    assert any(len(g) < 6 for g in want) and any(len(g) == 6 for g in want)
    for batch_size in (1, 4, 64):
        assert greedy_generate_cached(lm, inputs, 6, eos, batch_size) == want
    assert greedy_generate_cached(lm, inputs, 6, -1, 3) == free


def test_shared_prefix_option_scores_equal_cache_free_scores(lm: ParallelLM) -> None:
    rng = random.Random(1)
    inputs = ragged(rng, 9, 1, 12)
    options = [ragged(rng, rng.randint(2, 4), 1, 4) for _ in inputs]
    want = option_logprobs(CacheFree(lm), inputs, options, batch_size=8)
    for batch_size in (1, 8, 64):  # 1: one example per batch however many options it has
        total, last = option_logprobs_shared(lm, inputs, options, batch_size)
        for a, b in zip(total + last, want.total + want.last, strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
    best = [max(range(len(s)), key=s.__getitem__) for s in want.total]
    assert len(set(best)) > 1
    with pytest.raises(ValueError, match="at least one token"):
        option_logprobs_shared(lm, [[4]], [[[5], []]], batch_size=2)


def test_packed_option_scores_equal_one_row_per_option(lm: ParallelLM) -> None:
    """One row per example (input + all options, block mask) scores every option as its own row does."""
    rng = random.Random(2)
    inputs = ragged(rng, 9, 1, 12)
    options = [ragged(rng, rng.randint(1, 4), 1, 4) for _ in inputs]
    want = option_logprobs(CacheFree(lm), inputs, options, batch_size=8)
    assert lm.takes_mask
    for batch_size in (1, 4, 64):
        got = option_logprobs_packed(lm, inputs, options, batch_size)
        for a, b in zip(got.total + got.last, want.total + want.last, strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
    best = [max(range(len(s)), key=s.__getitem__) for s in want.total]
    assert rank_classification(lm, inputs, options, 4) == best  # the default path for a ParallelLM
    with pytest.raises(ValueError, match="at least one token"):
        option_logprobs_packed(lm, [[4]], [[[5], []]], batch_size=2)


def test_logits_at_positions_equal_the_full_logits_there(lm: ParallelLM) -> None:
    """``masked_logits(at=...)`` runs the output layer on the picked positions only: the same values as
    the full [b, s, V] logits indexed there, in the [P, J, V] layout of the picks."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, VOCAB, (3, 10), generator=gen)
    positions = torch.arange(10).expand(3, 10)
    mask = torch.ones(10, 10, dtype=torch.bool).triu(1).expand(3, 1, 10, 10)
    rows = torch.tensor([[2], [0], [2], [1]])
    cols = torch.tensor([[9, 0, 4], [1, 1, 7], [3, 8, 2], [5, 6, 0]])
    full = lm.masked_logits(tokens, positions, mask)
    got = lm.masked_logits(tokens, positions, mask, at=(rows, cols))
    assert got.shape == (4, 3, VOCAB)
    torch.testing.assert_close(got, full[rows, cols], rtol=1e-6, atol=1e-5)


def test_cache_rejects_sequences_past_the_position_table(lm: ParallelLM) -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        greedy_generate_cached(lm, [[5] * 60], 8, eos_id=1, batch_size=1)


def test_gpu_smoke_scripts_run_on_cpu() -> None:
    """tests/gpu/smoke.sh claims nothing without CUDA; its training check runs for real with --dry-run
    (tiny fp32 and bf16 model, local spec: packed mask == each segment alone, 2 optimizer steps)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    sh = subprocess.run(["bash", "tests/gpu/smoke.sh"], cwd=root, env=env, capture_output=True, text=True)
    assert sh.returncode == 0 and "no CUDA device: nothing checked" in sh.stdout
    cmd = [sys.executable, "tests/gpu/train_smoke.py", "--dry-run", "--steps", "2"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("mask vs alone") == 2 and "OK" in run.stdout and "DIFFER" not in run.stdout
    assert "2 fp32 CPU steps" in run.stdout
