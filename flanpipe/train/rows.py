"""Reading side of the packed training data: rows -> model-ready micro-batches.

A packed row holds several whole examples back to back (segments 1..k, then padding = 0).
Training must behave as if each example were alone in its row, so a batch carries
per-segment position ids and a block-diagonal causal attention mask, and the loss only counts
next-token predictions that stay inside one example's target span.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from flanpipe.data.row_order import sample_rows

PREFIXES = ("tokens", "segments", "loss_mask")


class PackedDataset:
    """The three IndexedDatasets of a packed directory (tokens/segments/loss_mask), mmapped."""

    def __init__(self, directory: str | os.PathLike[str]):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.directory = Path(directory)
        self.parts = {name: IndexedDataset(str(self.directory / name), mmap=True) for name in PREFIXES}
        lengths = {name: len(ds) for name, ds in self.parts.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{directory}: row counts differ between prefixes: {lengths}")
        if len(self) == 0:
            raise ValueError(f"{directory}: no rows")
        self.seq_length = int(self.parts["tokens"].sequence_lengths[0])
        for name, ds in self.parts.items():
            if not np.all(ds.sequence_lengths == self.seq_length):
                raise ValueError(f"{directory}/{name}: rows are not all {self.seq_length} long")

    def __len__(self) -> int:
        return len(self.parts["tokens"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {name: ds[int(i)] for name, ds in self.parts.items()}

    def rows(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Stack rows ``indices`` into LongTensors [b, seq_length] (a loop over rows, not tokens)."""
        return {
            name: torch.from_numpy(np.stack([ds[int(i)] for i in indices]).astype(np.int64))
            for name, ds in self.parts.items()
        }


def position_ids(segments: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every segment start: [b, s] -> [b, s].

    A segment starts at column 0 and wherever the segment id changes. Writing each start's column
    index at the start and 0 elsewhere, a running max gives every token the column of its
    segment's start; position = column - start column.
    """
    b, s = segments.shape
    col = torch.arange(s, device=segments.device).expand(b, s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_col = torch.where(starts, col, torch.zeros_like(col)).cummax(dim=1).values
    return col - start_col


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask, Megatron convention: bool [b, 1, s, s], True = masked.

    Token i may attend j iff seg[i] == seg[j] != 0 and j <= i. A pad (seg 0) attends only to
    itself, so no softmax row is empty and pads never see (or are seen by) real tokens.
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    real = (segments != 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=segments.device)
    allowed = (same & real & causal) | eye
    return (~allowed).unsqueeze(1)


def plain_causal(mask: torch.Tensor) -> bool:
    """Whether ``attention_mask`` is the plain causal mask in every row (one document per row, no pads).

    Such a batch needs no dense mask: the model's default causal attention is the same thing, and torch's
    fused kernel runs ``is_causal`` without reading and adding a [b, s, s] mask in every layer (forward +
    backward of one bench layer, 8 x 4 heads x 256 x 64: 24.4 vs 27.5 ms CPU, 1 thread, 36 rounds
    interleaved, load 9). Cost: one comparison over b x s x s booleans per micro-batch.
    """
    s = mask.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(mask, causal.expand_as(mask)))


def label_mask(segments: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Float [b, s]: 1 where predicting labels[i] = tokens[i+1] is trained.

    label_mask[i] = loss_mask[i+1] & (seg[i+1] == seg[i] != 0); the last column is 0 because its
    next token is in another row.
    """
    out = torch.zeros_like(loss_mask, dtype=torch.float32)
    keep = (loss_mask[:, 1:] != 0) & (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
    out[:, :-1] = keep.float()
    return out


def training_batch(tokens: torch.Tensor, segments: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows [b, s]: tokens, labels, loss_mask, position_ids, attention_mask."""
    tokens = tokens.long()
    segments = segments.long()
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": label_mask(segments, loss_mask),
        "position_ids": position_ids(segments),
        "attention_mask": attention_mask(segments),
    }


def packed_seq_params(segments: torch.Tensor):
    """THD packing metadata for the Transformer Engine path (GPU only).

    TE's fused attention takes packed rows as one flattened sequence [1, b*s] with cumulative
    segment boundaries instead of a dense mask. Each row's pad run is its own sequence.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = segments.shape
    flat = segments.reshape(-1)
    starts = torch.zeros_like(flat, dtype=torch.bool)
    starts[::s] = True  # every row starts a sequence
    starts[1:] |= flat[1:] != flat[:-1]
    bounds = torch.nonzero(starts).flatten()
    cu = torch.cat([bounds, bounds.new_tensor([b * s])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def microbatch_rows(
    n_rows: int,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
) -> Iterator[np.ndarray]:
    """Row indices of this DP rank's micro-batches, step after step, forever.

    Batch arithmetic: global_batch = micro_batch x dp_size x accumulation. Step t covers global
    samples [c + t*G, c + (t+1)*G) with c = consumed_samples; DP rank r takes the contiguous
    slice of G/dp_size samples starting at r*G/dp_size and cuts it into micro-batches in order.
    """
    per_rank, rem = divmod(global_batch_size, dp_size)
    accumulation, rem2 = divmod(per_rank, micro_batch_size)
    if rem or rem2 or accumulation < 1:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be micro_batch_size={micro_batch_size}"
            f" x dp_size={dp_size} x accumulation steps"
        )
    if consumed_samples % global_batch_size:
        raise ValueError(f"consumed_samples={consumed_samples} is not a whole number of global batches")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside dp_size={dp_size}")
    step_start = consumed_samples
    while True:
        rank_rows = sample_rows(n_rows, seed, step_start + dp_rank * per_rank, per_rank)
        yield from rank_rows.reshape(accumulation, micro_batch_size)
        step_start += global_batch_size


def batch_iterator(
    dataset: PackedDataset,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Training micro-batches for one DP rank, deterministic and resumable.

    Each is a ``training_batch`` dict plus the raw ``segments`` (the THD path builds cu_seqlens from them).
    """
    for rows in microbatch_rows(
        len(dataset),
        seed=seed,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed_samples,
    ):
        batch = dataset.rows(rows)
        out = training_batch(batch["tokens"], batch["segments"], batch["loss_mask"])
        out["segments"] = batch["segments"]
        yield out
