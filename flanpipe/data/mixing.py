"""Mixing: cap every dataset, then mix examples-proportionally (seqio's ``mixing_rate_num_examples``).

FLAN caps each dataset at 30k training examples and gives it a mixing rate of min(n, 3000), so no large
dataset drowns the small ones. The number of examples drawn is sized to the training budget; a dataset
whose share exceeds its capped size repeats as further epochs, each in a new seeded order. Everything is
a lazy Polars plan ending in one streaming sink; the only Python loop is over datasets.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow.parquet as pq

from flanpipe.core.io import atomic_path, write_json
from flanpipe.core.rerun import version_record

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
    # T0: a dataset with k prompts keeps at most prompt_budget / k examples (500k / #prompts); null = off
    prompt_budget: int | None = None

    def __post_init__(self) -> None:
        if self.cap < 1 or self.max_rate < 1:
            raise ValueError(f"mixture cap ({self.cap}) and max_rate ({self.max_rate}) must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"mixture temperature must be > 0, got {self.temperature}")
        if self.prompt_budget is not None and self.prompt_budget < 1:
            raise ValueError(f"mixture prompt_budget must be >= 1, got {self.prompt_budget}")


def dataset_cap(cfg: MixtureConfig, n_templates: int) -> int:
    """The cap of one dataset: ``cap``, and with T0's rule also prompt_budget // its number of prompts
    (T0 caps each dataset at 500k / #prompts examples, so datasets with many prompts are not upweighted)."""
    if cfg.prompt_budget is None:
        return cfg.cap
    return max(1, min(cfg.cap, cfg.prompt_budget // max(1, n_templates)))


def shard_cap(shard: str | os.PathLike[str], cfg: MixtureConfig) -> int:
    """``dataset_cap`` with the number of prompts read off the shard (its distinct template ids)."""
    if cfg.prompt_budget is None:
        return cfg.cap
    n = pl.scan_parquet(shard).select(pl.col("template_id").n_unique()).collect().item()
    return dataset_cap(cfg, int(n))


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
    """The capped training pool of one dataset.

    ``sample`` keeps a seeded subset of ``cap`` examples (``_seeded_subset``) instead of the first ones.
    """
    lf = pl.scan_parquet(shard)
    if cfg.cap_mode == "sample":
        lf = _seeded_subset(lf, pl.struct(pl.lit(dataset), pl.col("example_id")).hash(cfg.seed), cfg.cap)
    return lf.head(cfg.cap)


def _seeded_subset(lf: pl.LazyFrame, key: pl.Expr, n: int) -> pl.LazyFrame:
    """The ``n`` rows with the smallest ``key`` (ties: example_id), in source order. Chosen on the ids
    alone (16 bytes a row) and semi-joined back, so the text is never sorted."""
    ids = lf.select("example_id").sort(key, "example_id").head(n)
    return lf.join(ids, on="example_id", how="semi", maintain_order="left")


def _draws(pool: pl.LazyFrame, dataset: str, n_pool: int, n_draw: int, seed: int) -> pl.LazyFrame:
    """``n_draw`` examples of the pool: whole epochs, then a seeded subset for the partial last epoch.

    Order within a dataset is irrelevant (the global shuffle orders every draw), so whole epochs are a
    plain cross join and only the partial epoch's choice is seeded: the ``rest`` examples with the
    smallest hash of (dataset, epoch, example_id).
    """
    full, rest = divmod(n_draw, n_pool)
    parts = []
    if full:
        epochs = pl.LazyFrame({"epoch": pl.int_range(full, eager=True, dtype=pl.Int32)})
        parts.append(pool.join(epochs, how="cross"))
    if rest:
        key = pl.struct(pl.lit(dataset).alias("d"), pl.lit(full, pl.Int32).alias("e"), "example_id").hash(seed)
        parts.append(_seeded_subset(pool, key, rest).with_columns(pl.lit(full, pl.Int32).alias("epoch")))
    return pl.concat(parts)


def shuffle_buckets(estimated_bytes: float, bucket_bytes: int) -> int:
    """Power-of-two bucket count so one bucket's rows hold about ``bucket_bytes`` of text at most."""
    need = max(1, math.ceil(estimated_bytes / max(1, bucket_bytes)))
    return 1 << (need - 1).bit_length()


def bucket_bytes_for(mem_mb: int | None) -> int:
    """Shuffle bucket size for a job's memory limit: an eighth of it (peak ~ 4 x bucket + 0.3 GB, so about
    half the limit), within [32 MiB, 1 GiB]; 128 MiB when no limit is known."""
    if not mem_mb:
        return 128 << 20
    return min(1 << 30, max(32 << 20, (int(mem_mb) << 20) // 8))


def _order_key(seed: int) -> pl.Expr:
    """The global order: a seeded 64-bit hash of (dataset, epoch, example_id)."""
    return pl.struct("dataset", "epoch", "example_id").hash(seed + 1).alias("_order")


def _bucket(n_buckets: int) -> pl.Expr:
    """Range-partition the order key: bucket b holds keys in [b, b+1) x 2^64 / n_buckets, so the buckets
    sorted one by one and written in turn are exactly the globally sorted mixture."""
    if n_buckets == 1:
        return pl.lit(0, dtype=pl.Int64).alias("_bucket")
    width = 1 << (64 - (n_buckets.bit_length() - 1))  # 2^64 / n_buckets; n_buckets is a power of two
    return (pl.col("_order") // pl.lit(width, dtype=pl.UInt64)).cast(pl.Int64).alias("_bucket")


class _RowGroupWriter:
    """Appends frames to one Parquet file in row groups of exactly ``rows_per_group`` (the last one
    shorter), whatever sizes the frames come in, so the file's bytes do not depend on the bucketing."""

    def __init__(self, path: str | os.PathLike[str], rows_per_group: int) -> None:
        self.path, self.rows_per_group = path, rows_per_group
        self.pending: pl.DataFrame | None = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def __enter__(self) -> _RowGroupWriter:
        return self

    def _emit(self, frame: pl.DataFrame) -> None:
        table = frame.rechunk().to_arrow()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=self.rows_per_group)
        self.rows += frame.height

    def write(self, frame: pl.DataFrame) -> None:
        if self.pending is not None:  # top the carry-over up to one group; only that group is copied
            need = self.rows_per_group - self.pending.height
            head = pl.concat([self.pending, frame.head(need)])
            frame = frame.slice(need)
            if head.height < self.rows_per_group:
                self.pending = head
                return
            self._emit(head)
        full = frame.height - frame.height % self.rows_per_group
        if full:
            self._emit(frame.head(full))
        self.pending = frame.slice(full) if full < frame.height else None

    def __exit__(self, *exc: object) -> None:
        try:
            if self.pending is not None and exc[0] is None:
                self._emit(self.pending)
        finally:
            if self.writer is not None:
                self.writer.close()


def shuffle_to_parquet(
    draws: Sequence[pl.LazyFrame],
    out_parquet: str | os.PathLike[str],
    *,
    seed: int,
    n_buckets: int,
    row_group_rows: int,
) -> int:
    """External shuffle of the concatenated ``draws``: scatter rows to ``n_buckets`` range buckets of the
    order key, then sort and append each bucket. Peak memory follows one bucket, not the mixture; the
    bytes written depend neither on ``n_buckets`` nor on the thread count (ties on the hash break on the
    key's own columns). Returns the rows written.
    """
    sort_by = ["_order", "dataset", "epoch", "example_id"]
    Path(out_parquet).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".shuffle-", dir=Path(out_parquet).parent) as tmp:
        for i, part in enumerate(draws):  # one source at a time: see pool_stats
            keyed = part.with_columns(_order_key(seed)).with_columns(_bucket(n_buckets))
            keyed.sink_parquet(pl.PartitionBy(Path(tmp, str(i)), key="_bucket", include_key=False), mkdir=True)
        with atomic_path(out_parquet) as dst:
            with _RowGroupWriter(dst, row_group_rows) as writer:
                for b in range(n_buckets):
                    files = sorted(Path(tmp).glob(f"*/_bucket={b}/*.parquet"))
                    if files:
                        writer.write(pl.scan_parquet(files).sort(sort_by).drop("_order", "epoch").collect())
            if writer.rows == 0:
                raise ValueError(f"mixture {out_parquet}: no rows to write")
    return writer.rows


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


_ROW_OVERHEAD_BYTES = 64  # ids, flags and offsets of one mixture row besides its text


@dataclass(frozen=True)
class PoolStats:
    """What sizing a mixture needs to know about one dataset's capped pool."""

    rows: int  # training rows in the shard, before the cap
    tokens: float  # mean estimated tokens of a capped example: chars / chars_per_token, truncated, + EOS
    row_bytes: float  # mean in-memory bytes of a capped row: sizes the shuffle's buckets


def pool_stats(
    shard: str | os.PathLike[str], dataset: str, cfg: MixtureConfig, inputs_length: int, targets_length: int
) -> PoolStats:
    """One streaming pass over one dataset's pool. Called per dataset on purpose: a concat of 62 scans
    runs them all at once and peaked at ~1 GB on the FLAN-sized workload, one at a time at ~0.1 GB."""
    cpt = cfg.chars_per_token
    tokens = (pl.col("inputs").str.len_chars() / cpt).ceil().clip(upper_bound=inputs_length) + (
        pl.col("targets").str.len_chars() / cpt + 1
    ).ceil().clip(upper_bound=targets_length)
    text = pl.col("inputs").str.len_bytes() + pl.col("targets").str.len_bytes()
    opts = pl.col("options").list.eval(pl.element().str.len_bytes() + 8).list.sum()
    rows = pl.scan_parquet(shard).select(pl.len()).collect().item()
    if rows == 0:
        return PoolStats(0, 0.0, 0.0)
    means = (
        _pool(shard, dataset, cfg).select(tokens.mean(), (text + opts).mean().alias("b")).collect(engine="streaming")
    )
    return PoolStats(int(rows), float(means.item(0, 0)), float(means.item(0, 1)) + _ROW_OVERHEAD_BYTES)


def estimate_tokens_per_example(
    shards: Mapping[str, str | os.PathLike[str]],
    proportions: Mapping[str, float],
    cfg: MixtureConfig,
    inputs_length: int,
    targets_length: int,
) -> float:
    """Mixture-weighted mean example length in tokens, estimated from characters and truncation."""
    return sum(proportions[d] * pool_stats(p, d, cfg, inputs_length, targets_length).tokens for d, p in shards.items())


def build_mixture(
    shards: Mapping[str, str | os.PathLike[str]],
    cfg: MixtureConfig,
    out_parquet: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    budget_tokens: int,
    inputs_length: int,
    targets_length: int,
    bucket_bytes: int = 128 << 20,
    row_group_rows: int = 65_536,
) -> dict[str, object]:
    """Cap, allocate draws to fill ``budget_tokens`` and write the shuffled mixture and its stats.

    Sizing: examples = ceil(budget_tokens / estimated tokens per example). The budget is the training
    run's token count (steps x global batch x sequence length), so a run sees each draw about once.
    ``bucket_bytes`` bounds the shuffle's memory. Measured peak RSS on a 3.7M-example, 2.7 GB mixture:
    0.58 GB at 64 MiB, 0.65 GB at the default 128 MiB (0.65 GB for 0.9M examples), 2.6 GB at 1 GiB: the
    bucket as read, sorted and viewed as Arrow, about 4 x a bucket's bytes + 0.3 GB.
    It changes neither the rows nor the bytes written.
    """
    if not shards:
        raise ValueError("a mixture needs at least one dataset")
    cfgs = {d: replace(cfg, cap=shard_cap(p, cfg)) for d, p in shards.items()}  # per-dataset cap (T0's rule)
    pools = {d: pool_stats(p, d, cfgs[d], inputs_length, targets_length) for d, p in shards.items()}
    empty = [d for d, st in pools.items() if st.rows == 0]
    if empty:
        raise ValueError(f"mixture: training shard(s) of {empty} are empty")
    counts = {d: min(st.rows, cfgs[d].cap) for d, st in pools.items()}  # capped: cfg.cap caps them no further
    rates = {d: mixing_rate(n, cfg) for d, n in counts.items()}
    rsum = sum(rates.values())
    est = sum(rates[d] / rsum * pools[d].tokens for d in shards)
    total = max(len(shards), math.ceil(budget_tokens / est))
    plan = plan_mixture(counts, cfg, total)
    for row in plan:
        row["available"] = pools[str(row["dataset"])].rows
    parts = [
        _draws(
            _pool(shards[row["dataset"]], str(row["dataset"]), cfgs[str(row["dataset"])]),
            str(row["dataset"]),
            int(row["capped"]),
            int(row["draws"]),
            cfg.seed,
        )
        for row in plan
        if int(row["draws"]) > 0
    ]
    # Global order: a seeded hash of (dataset, epoch, example) interleaves datasets uniformly, so any
    # prefix of the mixture follows the mixing proportions. Sorted out of core, one bucket at a time.
    est_bytes = sum(int(row["draws"]) * pools[str(row["dataset"])].row_bytes for row in plan)
    n_buckets = shuffle_buckets(est_bytes, bucket_bytes)
    shuffle_to_parquet(parts, out_parquet, seed=cfg.seed, n_buckets=n_buckets, row_group_rows=row_group_rows)
    stats = {
        "config": asdict(cfg),
        "budget_tokens": budget_tokens,
        "estimated_tokens_per_example": est,
        "examples": total,
        "estimated_bytes": round(est_bytes),
        "shuffle_buckets": n_buckets,
        "datasets": plan,
        **version_record("mix"),
    }
    write_json(out_json, stats)
    return stats
