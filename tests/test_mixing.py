"""Capping and examples-proportional mixing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

from flanpipe.data.mixing import MixtureConfig, allocate, build_mixture, mixing_rate


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
        shards,
        cfg,
        tmp_path / "m.parquet",
        tmp_path / "m.json",
        budget_tokens=13 * 2000,
        inputs_length=64,
        targets_length=16,
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
        build_mixture(
            shards,
            MixtureConfig(seed=seed),
            tmp_path / f"{name}.parquet",
            tmp_path / f"{name}.json",
            budget_tokens=5000,
            inputs_length=64,
            targets_length=16,
        )
        return hashlib.sha256((tmp_path / f"{name}.parquet").read_bytes()).hexdigest()

    assert run(0, "a") == run(0, "b")
    assert run(0, "a") != run(1, "c")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_of_core_shuffle_writes_the_same_bytes_for_any_bucket_count(
    shards: dict[str, Path], tmp_path: Path
) -> None:
    """Range buckets of the order key, sorted one at a time, are the global sort: the bucket count
    (i.e. the memory bound) must not change a byte. Small row groups make several per bucket."""
    cfg = MixtureConfig(cap=1000, max_rate=500, seed=5)
    digests, buckets = set(), []
    for name, bucket_bytes in [("one", 1 << 30), ("many", 4096), ("tiny", 512)]:
        stats = build_mixture(
            shards,
            cfg,
            tmp_path / f"{name}.parquet",
            tmp_path / f"{name}.json",
            budget_tokens=13 * 3000,
            inputs_length=64,
            targets_length=16,
            bucket_bytes=bucket_bytes,
            row_group_rows=100,
        )
        digests.add(_sha(tmp_path / f"{name}.parquet"))
        buckets.append(stats["shuffle_buckets"])
    assert buckets[0] == 1 and buckets[1] > 8 and buckets[2] > buckets[1]
    assert len(digests) == 1
    df = pl.read_parquet(tmp_path / "tiny.parquet")
    assert df.height == 3000 and "epoch" not in df.columns and "_order" not in df.columns
    assert not list(tmp_path.glob(".shuffle-*")), "the scatter directory must be removed"


def test_shuffle_buckets_is_a_power_of_two_covering_the_bytes() -> None:
    from flanpipe.data.mixing import shuffle_buckets

    assert shuffle_buckets(10, 100) == 1
    assert shuffle_buckets(100, 100) == 1
    assert shuffle_buckets(101, 100) == 2
    assert shuffle_buckets(1000, 100) == 16  # 10 -> next power of two


_MIX_IN_SUBPROCESS = """
import sys
from pathlib import Path
from flanpipe.data.mixing import MixtureConfig, build_mixture
d = Path(sys.argv[1])
shards = {p.stem: p for p in sorted(d.glob("*.parquet"))}
build_mixture(shards, MixtureConfig(cap=1000, max_rate=500, seed=7, cap_mode=sys.argv[3]), sys.argv[2],
              sys.argv[2] + ".json", budget_tokens=13 * 4000, inputs_length=64, targets_length=16,
              bucket_bytes=int(sys.argv[4]), row_group_rows=500)
"""


@pytest.mark.parametrize("cap_mode", ["first", "sample"])
def test_mixture_is_byte_identical_whatever_the_thread_count(tmp_path: Path, cap_mode: str) -> None:
    """POLARS_MAX_THREADS is read once at import, so each thread count runs in its own interpreter."""
    import os
    import subprocess
    import sys

    src = tmp_path / "shards"
    src.mkdir()
    for name, n in [("small", 50), ("mid", 400), ("big", 2000)]:
        shard(src / f"{name}.parquet", name, n)
    digests = set()
    for threads, bucket_bytes in [(1, 1 << 30), (2, 1 << 30), (4, 8192), (1, 8192)]:
        out = tmp_path / f"t{threads}-{bucket_bytes}.parquet"
        env = {**os.environ, "POLARS_MAX_THREADS": str(threads)}
        subprocess.run(
            [sys.executable, "-c", _MIX_IN_SUBPROCESS, str(src), str(out), cap_mode, str(bucket_bytes)],
            env=env,
            check=True,
        )
        digests.add(_sha(out))
    assert len(digests) == 1


def test_seeded_sample_cap_takes_cap_examples_spread_over_the_shard(shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = MixtureConfig(cap=300, max_rate=3000, seed=1, cap_mode="sample")
    for name in ("s", "t"):  # twice: the sample is seeded
        build_mixture({"big": shards["big"]}, cfg, tmp_path / f"{name}.parquet", tmp_path / f"{name}.json",
                      budget_tokens=13 * 300, inputs_length=64, targets_length=16)  # fmt: skip
    ids = pl.read_parquet(tmp_path / "s.parquet")["example_id"]
    # 300 draws of a 300-example pool = exactly one epoch of the sampled pool
    assert ids.n_unique() == 300 == ids.len()
    assert ids.max() > 1000, "a seeded sample, not the first 300"
    assert _sha(tmp_path / "s.parquet") == _sha(tmp_path / "t.parquet")


def test_bucket_size_follows_the_jobs_memory() -> None:
    from flanpipe.data.mixing import bucket_bytes_for

    assert bucket_bytes_for(None) == 128 << 20
    assert bucket_bytes_for(4_000) == 500 << 20  # the SLURM profile's default job: 500 MiB buckets
    assert bucket_bytes_for(32_000) == 1 << 30  # its mix job: capped at 1 GiB (sorting larger buys nothing)
    assert bucket_bytes_for(100) == 32 << 20
    assert bucket_bytes_for(10**6) == 1 << 30
