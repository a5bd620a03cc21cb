"""Provenance sidecar: every packed segment maps back to its mixture row, example, template and epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from flanpipe.data.mixing import MixtureConfig, _draws, _order_key, _pool, build_mixture
from flanpipe.data.packing import pack_to_indexed_dataset
from flanpipe.data.provenance import mixture_epochs, mixture_meta, seen_by_step, seen_summary
from flanpipe.data.tokenize import EncodedExamples
from tests.test_mixing import shard


def _mixture(tmp_path: Path, seed: int = 3) -> tuple[Path, dict[str, Path], MixtureConfig]:
    shards = {
        "small": shard(tmp_path / "small.parquet", "small", 20),
        "big": shard(tmp_path / "big.parquet", "big", 200),
    }
    cfg = MixtureConfig(cap=1000, max_rate=500, seed=seed)
    out = tmp_path / "m.parquet"
    # 13 tokens per example (see test_mixing) -> 300 draws: small's share 20/220 = 27 draws = 1 epoch + 7
    build_mixture(shards, cfg, out, tmp_path / "m.json", budget_tokens=13 * 300, inputs_length=64, targets_length=16)
    return out, shards, cfg


def test_epochs_recovered_exactly(tmp_path: Path) -> None:
    out, shards, cfg = _mixture(tmp_path)
    # the truth: the shuffle's own draws, order key and sort, with the epoch column the file drops
    draws = [_draws(_pool(shards["small"], "small", cfg), "small", 20, 27, cfg.seed)]
    draws.append(_draws(_pool(shards["big"], "big", cfg), "big", 200, 273, cfg.seed))
    truth = (
        pl.concat(draws)
        .with_columns(_order_key(cfg.seed))
        .sort("_order", "dataset", "epoch", "example_id")
        .select("dataset", "example_id", "epoch")
        .collect()
    )
    meta = mixture_meta(out, cfg.seed)
    assert meta.select("dataset", "example_id").equals(truth.select("dataset", "example_id"))
    assert meta["epoch"].to_list() == truth["epoch"].to_list()
    assert sorted(set(meta.filter(pl.col("dataset") == "small")["epoch"].to_list())) == [0, 1]
    # a wrong seed does not reproduce them (the recovery really reads the order key)
    assert mixture_epochs(meta, cfg.seed + 7).to_list() != truth["epoch"].to_list()


def _encoded(n: int, seed: int = 0) -> EncodedExamples:
    rng = np.random.default_rng(seed)
    n_in, n_tg = rng.integers(1, 20, n), rng.integers(1, 6, n)
    offsets = np.concatenate([[0], np.cumsum(n_in + n_tg)]).astype(np.int64)
    tokens = rng.integers(3, 1000, offsets[-1]).astype(np.int32)
    return EncodedExamples(tokens, offsets, n_in.astype(np.int32), 0, 0, 20, 6)


def test_sidecar_points_at_the_packed_tokens(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n = 60
    enc = _encoded(n)
    meta = pl.DataFrame(
        {
            "dataset": [f"d{i % 3}" for i in range(n)],
            "template_id": pl.Series([i % 4 for i in range(n)], dtype=pl.Int32),
            "example_id": list(range(100, 100 + n)),
            "epoch": pl.Series([0] * n, dtype=pl.Int32),
        }
    )
    stats = pack_to_indexed_dataset(enc, 32, tmp_path / "packed", order_seed=5, meta=meta)
    prov = pl.read_parquet(tmp_path / "packed" / "provenance.parquet")
    assert prov.height == n == stats["examples"] and prov["mixture_row"].sort().to_list() == list(range(n))
    tokens, segments = (IndexedDataset(str(tmp_path / "packed" / k)) for k in ("tokens", "segments"))
    for r in prov.iter_rows(named=True):  # a handful of rows: the test reads each one back
        lo, hi = r["start"], r["start"] + r["length"]
        i = r["mixture_row"]
        assert (tokens[r["row"]][lo:hi] == enc.tokens[enc.offsets[i] : enc.offsets[i + 1]]).all()
        assert (segments[r["row"]][lo:hi] == r["segment"]).all()
        assert r["example_id"] == 100 + i and r["dataset"] == f"d{i % 3}" and r["template_id"] == i % 4
    # segment ids count 1..k along every row
    ks = prov.group_by("row").agg(pl.col("segment").sort())
    assert all(s == list(range(1, len(s) + 1)) for s in ks["segment"].to_list())


def test_seen_by_step_follows_the_trainer_stream() -> None:
    # 4 rows x 2 segments; global batch 2: step 2 = samples 0..3 = one permutation = every row once
    prov = pl.DataFrame(
        {
            "row": [0, 0, 1, 1, 2, 2, 3, 3],
            "segment": [1, 2] * 4,
            "dataset": ["a", "b"] * 4,
            "template_id": pl.Series([0, 1, 0, 1, 2, 1, 0, 1], dtype=pl.Int32),
            "example_id": [0, 0, 1, 1, 2, 2, 3, 3],
        }
    )
    assert seen_by_step(prov, step=0, seed=1, global_batch_size=2).height == 0
    one = seen_by_step(prov, step=1, seed=1, global_batch_size=2)
    assert one["row"].n_unique() == 2 and one["times_seen"].to_list() == [1] * 4
    full = seen_by_step(prov, step=2, seed=1, global_batch_size=2)
    assert full["row"].unique().sort().to_list() == [0, 1, 2, 3] and set(full["times_seen"]) == {1}
    # step 3 starts epoch 2 (a fresh permutation): two rows seen twice -> 6 row visits
    three = seen_by_step(prov, step=3, seed=1, global_batch_size=2)
    assert three.unique("row")["times_seen"].sum() == 6
    summary = seen_summary(full)
    assert summary.filter(pl.col("dataset") == "a").select("template_id", "segments", "examples").rows() == [
        (0, 3, 3),
        (2, 1, 1),
    ]
