"""Capping and examples-proportional mixing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

from flanpipe.mixing import MixtureConfig, allocate, build_mixture, mixing_rate


def shard(path: Path, dataset: str, n: int) -> Path:
    pl.DataFrame(
        {
            "dataset": [dataset] * n,
            "cluster": ["c"] * n,
            "split": ["train"] * n,
            "example_id": list(range(n)),
            "template_id": [0] * n,
            "turned_around": [False] * n,
            "inputs": ["x" * 40] * n,
            "targets": ["y" * 8] * n,
            "options": [[]] * n,
        },
        schema_overrides={"options": pl.List(pl.Utf8), "template_id": pl.Int32},
    ).write_parquet(path)
    return path


def test_rate_is_min_of_capped_size_and_max_rate() -> None:
    cfg = MixtureConfig(cap=30_000, max_rate=3_000)
    assert mixing_rate(100, cfg) == 100
    assert mixing_rate(50_000, cfg) == 3_000
    assert mixing_rate(400, MixtureConfig(cap=300, max_rate=3000)) == 300
    assert mixing_rate(100, MixtureConfig(temperature=2.0)) == pytest.approx(10.0)


def test_allocate_sums_exactly() -> None:
    got = allocate(10, {"a": 1, "b": 1, "c": 1})
    assert sum(got.values()) == 10 and sorted(got.values()) == [3, 3, 4]


@pytest.fixture
def shards(tmp_path: Path) -> dict[str, Path]:
    return {
        "small": shard(tmp_path / "small.parquet", "small", 50),
        "mid": shard(tmp_path / "mid.parquet", "mid", 400),
        "big": shard(tmp_path / "big.parquet", "big", 2000),
    }


def test_mixture_proportions_caps_and_epochs(shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = MixtureConfig(cap=1000, max_rate=500, seed=3)
    # 40 + 8 chars at 4 chars/token -> 10 + 3 = 13 tokens per example; 13 * 2000 tokens -> 2000 draws.
    stats = build_mixture(
        shards, cfg, tmp_path / "m.parquet", tmp_path / "m.json", budget_tokens=13 * 2000,
        inputs_length=64, targets_length=16,
    )
    df = pl.read_parquet(tmp_path / "m.parquet")
    assert df.height == stats["examples"] == 2000
    counts = dict(df.group_by("dataset").len().iter_rows())
    # rates 50, 400, min(1000, 500) = 500 -> shares 50/950, 400/950, 500/950 of 2000.
    assert counts == {"small": round(2000 * 50 / 950), "mid": round(2000 * 400 / 950), "big": round(2000 * 500 / 950)}
    # The cap: only the first 1000 examples of "big" are ever drawn (FLAN: train[:30000]).
    assert df.filter(pl.col("dataset") == "big")["example_id"].max() < 1000
    # "small" repeats as epochs (105 draws of 50 examples): each example 2 or 3 times.
    reps = df.filter(pl.col("dataset") == "small").group_by("example_id").len()["len"]
    assert set(reps.to_list()) <= {2, 3}
    # Any prefix follows the proportions (uniform interleaving), within sampling tolerance.
    head = dict(df.head(500).group_by("dataset").len().iter_rows())
    assert abs(head["big"] / 500 - 500 / 950) < 0.08


def test_mixture_is_byte_identical_across_runs_and_seed_sensitive(shards: dict[str, Path], tmp_path: Path) -> None:
    def run(seed: int, name: str) -> str:
        build_mixture(shards, MixtureConfig(seed=seed), tmp_path / f"{name}.parquet", tmp_path / f"{name}.json",
                      budget_tokens=5000, inputs_length=64, targets_length=16)
        return hashlib.sha256((tmp_path / f"{name}.parquet").read_bytes()).hexdigest()

    assert run(0, "a") == run(0, "b")
    assert run(0, "a") != run(1, "c")
