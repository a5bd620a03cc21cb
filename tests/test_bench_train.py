"""`flanpipe bench train`: runs both models, reports their speeds and that their losses agree.

No timing asserts (a shared CI machine makes them meaningless); the loss check is the real test:
the plain-PyTorch model is only a fair yardstick if it computes what Megatron computes.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from flanpipe.bench.train import BENCH_MODEL, PlainGPT, bench_train, megatron_to_plain_state

TINY = dataclasses.replace(BENCH_MODEL, num_layers=2, hidden_size=64, ffn_hidden_size=256, vocab_size=256)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        # the LaMDA-style variant: gated GELU + RMSNorm, and learned positions for the other embedding path
        dataclasses.replace(TINY, gated_linear_unit=True, normalization="RMSNorm"),
        dataclasses.replace(TINY, position_embedding_type="learned_absolute"),
    ],
    ids=["gpt", "glu-rmsnorm", "learned-pos"],
)
def test_bench_train_same_loss_and_keys(cfg) -> None:
    r = bench_train(cfg, batch_size=2, seq_length=32, iters=1, warmup=1)
    assert {
        "model",
        "params",
        "tokens_per_iter",
        "timings",
        "ratio_plain_over_megatron",
        "ratio_plain_sdpa_over_megatron",
        "ratio_plain_over_megatron_median",
        "weights_copied",
        "loss",
        "loss_max_abs_diff_vs_megatron",
    } <= set(r)
    assert set(r["timings"]) == {"megatron", "plain", "plain_sdpa"}
    for row in r["timings"].values():
        assert row["tokens_per_s"] > 0 and row["s_per_iter_median"] > 0
    assert r["tokens_per_iter"] == 2 * 32 and r["weights_copied"]
    # same weights, same tokens, same mask: per-token losses agree to float32 rounding
    assert max(r["loss_max_abs_diff_vs_megatron"].values()) < 1e-4
    json.dumps(r)


def test_weight_mapping_covers_every_plain_parameter() -> None:
    """Every Megatron tensor lands on a PlainGPT parameter and vice versa (strict load)."""
    from flanpipe.bench.train import build_megatron

    megatron = build_megatron(TINY, seed=0)
    plain = PlainGPT(TINY)
    state = megatron_to_plain_state(megatron.state_dict())
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)


def test_cli_bench_train_json(capsys: pytest.CaptureFixture[str]) -> None:
    from flanpipe.cli import main

    main(
        [
            "bench",
            "train",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--batch-size",
            "1",
            "--seq-length",
            "16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_layers"] == 1 and out["model"]["ffn_hidden_size"] == 4 * 32
    assert "ratio_plain_over_megatron" in out


def test_peer_llama_same_shape_and_both_train() -> None:
    """``bench train --peer`` at tiny scale: equal parameter counts, both sides take real AdamW steps, each
    in its own process, and the figures come with the load average they were taken at."""
    pytest.importorskip("transformers", reason="the peer needs transformers: pip install 'flanpipe[bench]'")
    from flanpipe.bench.peer_train import LLAMA_BENCH, bench_train_peer

    tiny = dataclasses.replace(LLAMA_BENCH, num_layers=1, hidden_size=64, ffn_hidden_size=128, vocab_size=256)
    r = bench_train_peer(tiny, batch_size=4, seq_length=32, iters=2, warmup=1, max_micro_batch=2)
    assert r["params_flanpipe"] == r["params_hf"]  # same widths, biases on both sides
    assert (r["micro_batch_size"], r["accumulation"]) == (2, 2)  # the micro-batch rule, capped at 2
    for loss in r["first_step_loss"].values():  # untrained: close to ln(vocab) = ln(256) = 5.55
        assert abs(loss - 5.55) < 0.3
    assert set(r["timings"]) == {"flanpipe", "hf_llama"} and r["ratio_flanpipe_over_hf"] > 0
    for row in r["timings"].values():
        assert row["cpu_s_per_step_median"] > 0 and row["minor_faults_per_step_median"] >= 0
    assert r["ratio_paired_median"] > 0 and len(r["ratio_paired_quartiles"]) >= 1
    assert set(r["loadavg_1m"]) == {"start", "mean", "max", "end"}
    json.dumps(r)
