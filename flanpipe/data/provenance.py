"""Provenance of packed training data: which example and template sits in every packed segment.

``results/packed/<run>/provenance.parquet`` has one row per packed segment: ``row`` (packed row index),
``segment`` (its segment id in the row, 1..k as in segments.bin), ``start``/``length`` (tokens), and the
example it holds: ``mixture_row``, ``dataset``, ``template_id``, ``example_id``, ``epoch``. With the
trainer's row order (flanpipe.data.row_order.sample_rows) that answers "which examples and templates had the model
seen by step N" (``seen_by_step``), e.g. to check whether a held-out template's wording reached the model.

``epoch`` is the mixture's pass over that example (mixing draws whole epochs, then a seeded partial one).
The mixture file does not store it, so it is recovered exactly: an example drawn k times was drawn in
epochs 0..k-1, and the mixture is sorted by the order key hash(dataset, epoch, example_id) (seed + 1,
flanpipe.data.mixing._order_key), so its i-th occurrence in the file is the epoch with the i-th smallest key.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from flanpipe.data.row_order import sample_rows

_KEY = ["dataset", "example_id"]


def mixture_epochs(meta: pl.DataFrame, seed: int) -> pl.Series:
    """The epoch of every mixture row (``meta``: dataset, example_id in file order; ``seed``: the mixture's).

    Ties of the order key are broken by epoch, as the shuffle's sort does (key, dataset, epoch, example_id).
    """
    occurrences = (
        meta.select(_KEY).with_row_index("_row").with_columns(_rank=pl.int_range(pl.len()).over(_KEY).cast(pl.UInt32))
    )
    candidates = (
        occurrences.group_by(_KEY)
        .agg(epoch=pl.int_range(pl.len(), dtype=pl.Int32))
        .explode("epoch")
        # the same struct (names, order, dtypes) as flanpipe.data.mixing._order_key hashes
        .with_columns(_order=pl.struct("dataset", "epoch", "example_id").hash(seed + 1))
        .sort("_order", "epoch")
        .with_columns(_rank=pl.int_range(pl.len()).over(_KEY).cast(pl.UInt32))
    )
    joined = occurrences.join(candidates.select(*_KEY, "_rank", "epoch"), on=[*_KEY, "_rank"], how="left")
    return joined.sort("_row")["epoch"]


def provenance_frame(
    order: np.ndarray,
    out_row: np.ndarray,
    segment: np.ndarray,
    lengths: np.ndarray,
    meta: pl.DataFrame,
) -> pl.DataFrame:
    """One row per packed segment, sorted by (row, segment).

    ``order``/``out_row``/``segment`` are flanpipe.data.packing's layout (example index, output row and segment
    id per packed example, sorted by row); ``lengths`` the tokens of every example; ``meta`` one row per
    example in mixture order (dataset, template_id, example_id, epoch).
    """
    lens = lengths[order]
    csum = np.cumsum(lens) - lens
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = out_row[1:] != out_row[:-1]
    start = csum - np.maximum.accumulate(np.where(is_first, csum, 0))
    layout = pl.DataFrame(
        {
            "row": out_row.astype(np.int64),
            "segment": segment.astype(np.int32),
            "start": start.astype(np.int32),
            "length": lens.astype(np.int32),
            "mixture_row": order.astype(np.int64),
        }
    )
    return layout.join(
        meta.with_row_index("mixture_row").with_columns(pl.col("mixture_row").cast(pl.Int64)),
        on="mixture_row",
        how="left",
        maintain_order="left",
    )


def mixture_meta(mixture: str | os.PathLike[str], seed: int) -> pl.DataFrame:
    """dataset, template_id, example_id and the recovered epoch of every mixture row, in file order."""
    meta = pl.scan_parquet(mixture).select("dataset", "template_id", "example_id").collect()
    return meta.with_columns(epoch=mixture_epochs(meta, seed))


def seen_by_step(
    provenance: pl.DataFrame | str | os.PathLike[str],
    *,
    step: int,
    seed: int,
    global_batch_size: int,
    n_rows: int | None = None,
) -> pl.DataFrame:
    """The segments the model had trained on after ``step`` optimizer steps, with ``times_seen``.

    Steps 1..step consume global samples [0, step x global_batch_size) of the trainer's row stream
    (flanpipe.data.row_order.sample_rows with train.seed; resumed runs continue the same stream). ``n_rows``: rows
    in the packed dataset (default: the provenance's, which is right unless rows hold no segment).
    """

    prov = provenance if isinstance(provenance, pl.DataFrame) else pl.read_parquet(provenance)
    n = n_rows if n_rows is not None else int(prov["row"].max()) + 1
    rows = sample_rows(n, seed, 0, step * global_batch_size)
    ids, counts = np.unique(rows, return_counts=True)
    seen = pl.DataFrame({"row": ids.astype(np.int64), "times_seen": counts.astype(np.int64)})
    return prov.join(seen, on="row", how="inner").sort("row", "segment")


def seen_summary(seen: pl.DataFrame) -> pl.DataFrame:
    """Per (dataset, template_id): segments trained on (with repeats), and distinct examples."""
    return (
        seen.group_by("dataset", "template_id")
        .agg(segments=pl.col("times_seen").sum(), examples=pl.col("example_id").n_unique())
        .sort("dataset", "template_id")
    )
