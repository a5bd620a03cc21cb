"""Mixing: cap every dataset, then mix examples-proportionally (seqio's ``mixing_rate_num_examples``).

FLAN caps each dataset at 30k training examples and gives it a mixing rate of min(n, 3000), so no large
dataset drowns the small ones. The number of examples drawn is sized to the training budget; a dataset
whose share exceeds its capped size repeats as further epochs, each in a new seeded order. Everything is
a lazy Polars plan ending in one streaming sink; the only Python loop is over datasets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import polars as pl

from flanpipe.io import atomic_path, write_json

CapMode = Literal["first", "sample"]


@dataclass(frozen=True)
class MixtureConfig:
    """The experiment facts that decide a mixture (all from config, see config/schemas)."""

    cap: int = 30_000  # max training examples per dataset (FLAN: train[:30000])
    max_rate: int = 3_000  # rate = min(n, max_rate) (FLAN: 3000)
    temperature: float = 1.0  # seqio: rate ** (1 / T); 1.0 = plain examples-proportional
    seed: int = 0
    cap_mode: CapMode = "first"  # first: source order as FLAN; sample: seeded sample of `cap`
    chars_per_token: float = 4.0  # only to size the mixture before the tokenizer exists

    def __post_init__(self) -> None:
        if self.cap < 1 or self.max_rate < 1:
            raise ValueError(f"mixture cap ({self.cap}) and max_rate ({self.max_rate}) must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"mixture temperature must be > 0, got {self.temperature}")


def mixing_rate(n: int, cfg: MixtureConfig) -> float:
    """seqio's mixing_rate_num_examples: min(n_capped, maximum) ** (1 / temperature)."""
    return float(min(n, cfg.cap, cfg.max_rate)) ** (1.0 / cfg.temperature)


def allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` draws in proportion to ``weights`` with largest-remainder rounding (sums exactly)."""
    wsum = sum(weights.values())
    exact = {k: total * w / wsum for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:left]:
        counts[k] += 1
    return counts


def _pool(shard: str | os.PathLike[str], dataset: str, cfg: MixtureConfig) -> pl.LazyFrame:
    """The capped training pool of one dataset."""
    lf = pl.scan_parquet(shard)
    if cfg.cap_mode == "sample":
        key = pl.struct(pl.lit(dataset), pl.col("example_id")).hash(cfg.seed)
        lf = lf.sort(key).head(cfg.cap).sort("example_id")
    return lf.head(cfg.cap)


def _draws(pool: pl.LazyFrame, dataset: str, n_pool: int, n_draw: int, seed: int) -> pl.LazyFrame:
    """``n_draw`` examples of the pool: whole epochs, each freshly shuffled, then a partial one."""
    epochs = max(1, math.ceil(n_draw / n_pool))
    epoch_ids = pl.LazyFrame({"epoch": pl.int_range(epochs, eager=True, dtype=pl.Int32)})
    key = pl.struct(pl.lit(dataset), pl.col("epoch"), pl.col("example_id")).hash(seed)
    return pool.join(epoch_ids, how="cross").sort(pl.col("epoch"), key).head(n_draw)


def plan_mixture(
    counts: Mapping[str, int], cfg: MixtureConfig, total_examples: int
) -> list[dict[str, float | int | str]]:
    """Per-dataset rows: available, capped, rate, proportion, draws, epochs."""
    rates = {d: mixing_rate(n, cfg) for d, n in counts.items()}
    draws = allocate(total_examples, rates)
    rsum = sum(rates.values())
    return [
        {
            "dataset": d,
            "available": counts[d],
            "capped": min(counts[d], cfg.cap),
            "rate": rates[d],
            "proportion": rates[d] / rsum,
            "draws": draws[d],
            "epochs": draws[d] / max(1, min(counts[d], cfg.cap)),
        }
        for d in counts
    ]


def estimate_tokens_per_example(
    shards: Mapping[str, str | os.PathLike[str]],
    proportions: Mapping[str, float],
    cfg: MixtureConfig,
    inputs_length: int,
    targets_length: int,
) -> float:
    """Mixture-weighted mean example length in tokens, estimated from characters and truncation."""
    cpt = cfg.chars_per_token
    per_ds = pl.concat(
        [
            _pool(p, d, cfg).select(
                pl.lit(d).alias("dataset"),
                (
                    (pl.col("inputs").str.len_chars() / cpt).ceil().clip(upper_bound=inputs_length)
                    + (pl.col("targets").str.len_chars() / cpt + 1).ceil().clip(upper_bound=targets_length)
                ).alias("tokens"),
            )
            for d, p in shards.items()
        ]
    )
    means = per_ds.group_by("dataset").agg(pl.col("tokens").mean()).collect()
    mean_by_ds = dict(zip(means["dataset"], means["tokens"], strict=True))
    return sum(proportions[d] * mean_by_ds[d] for d in shards)


def build_mixture(
    shards: Mapping[str, str | os.PathLike[str]],
    cfg: MixtureConfig,
    out_parquet: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    budget_tokens: int,
    inputs_length: int,
    targets_length: int,
) -> dict[str, object]:
    """Cap, allocate draws to fill ``budget_tokens`` and write the shuffled mixture and its stats.

    Sizing: examples = ceil(budget_tokens / estimated tokens per example). The budget is the training
    run's token count (steps x global batch x sequence length), so a run sees each draw about once.
    """
    if not shards:
        raise ValueError("a mixture needs at least one dataset")
    counts_df = pl.concat(
        [pl.scan_parquet(p).select(pl.lit(d).alias("dataset"), pl.len().alias("n")) for d, p in shards.items()]
    ).collect()
    counts = dict(zip(counts_df["dataset"], counts_df["n"], strict=True))
    empty = [d for d, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"mixture: training shard(s) of {empty} are empty")
    rates = {d: mixing_rate(n, cfg) for d, n in counts.items()}
    rsum = sum(rates.values())
    est = estimate_tokens_per_example(
        shards, {d: r / rsum for d, r in rates.items()}, cfg, inputs_length, targets_length
    )
    total = max(len(shards), math.ceil(budget_tokens / est))
    plan = plan_mixture(counts, cfg, total)
    parts = [
        _draws(
            _pool(shards[row["dataset"]], str(row["dataset"]), cfg),
            str(row["dataset"]),
            int(row["capped"]),
            int(row["draws"]),
            cfg.seed,
        )
        for row in plan
        if int(row["draws"]) > 0
    ]
    # Global order: a seeded hash of (dataset, epoch, example) interleaves datasets uniformly, so any
    # prefix of the mixture follows the mixing proportions.
    order = pl.struct("dataset", "epoch", "example_id").hash(cfg.seed + 1)
    mixture = pl.concat(parts).sort(order).drop("epoch")
    with atomic_path(out_parquet) as tmp:
        mixture.sink_parquet(tmp)
    stats = {
        "config": asdict(cfg),
        "budget_tokens": budget_tokens,
        "estimated_tokens_per_example": est,
        "examples": total,
        "datasets": plan,
    }
    write_json(out_json, stats)
    return stats
