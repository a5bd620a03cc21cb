"""Shared fixtures for the Megatron-backed tests (data, model, training).

They build packed data directly with Megatron's IndexedDatasetBuilder, independent of
flanpipe.data.packing, so the training side is tested against the ARCH.md format itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

EOS = 1


def write_packed(directory: Path, tokens: np.ndarray, segments: np.ndarray, loss_mask: np.ndarray) -> Path:
    """Write three equal-shape [rows, L] arrays as the tokens/segments/loss_mask IndexedDatasets."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    for name, array, dtype in (
        ("tokens", tokens, np.int32),
        ("segments", segments, np.int32),
        ("loss_mask", loss_mask, np.uint8),
    ):
        builder = IndexedDatasetBuilder(str(directory / f"{name}.bin"), dtype=dtype)
        for row in array:
            builder.add_item(torch.from_numpy(np.ascontiguousarray(row, dtype=dtype)))
            builder.end_document()
        builder.finalize(str(directory / f"{name}.idx"))
    return directory


def pack_examples(examples: list[tuple[list[int], list[int]]], length: int) -> tuple[np.ndarray, ...]:
    """Greedy in-order packing of (input_ids, target_ids_with_eos) into rows of ``length``."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for inputs, targets in examples:
        n = len(inputs) + len(targets)
        assert n <= length
        if len(cur[0]) + n > length:
            rows.append(cur)
            cur = ([], [], [])
        seg = (max(cur[1]) if cur[1] else 0) + 1
        cur[0].extend(inputs + targets)
        cur[1].extend([seg] * n)
        cur[2].extend([0] * len(inputs) + [1] * len(targets))
    rows.append(cur)
    out = np.zeros((3, len(rows), length), dtype=np.int64)
    for r, (tok, seg, mask) in enumerate(rows):
        out[0, r, : len(tok)] = tok
        out[1, r, : len(seg)] = seg
        out[2, r, : len(mask)] = mask
    return out[0], out[1], out[2]


def counting_examples(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """A trivially learnable task: inputs a, a+1, .., targets continue the count, then EOS.

    Ids start at 3 (0 pad, 1 EOS, 2 unk). Lengths vary so rows hold several segments.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n_in, n_tgt = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        a = int(rng.integers(3, vocab - n_in - n_tgt))
        seq = list(range(a, a + n_in + n_tgt))
        out.append((seq[:n_in], seq[n_in:] + [EOS]))
    return out


@pytest.fixture(scope="session")
def megatron_packed_factory(tmp_path_factory) -> Callable[..., Path]:
    """Build a packed counting-task directory: factory(n_examples, length, vocab, seed)."""

    def make(n_examples: int = 256, length: int = 32, vocab: int = 64, seed: int = 0) -> Path:
        directory = tmp_path_factory.mktemp("packed")
        tokens, segments, loss_mask = pack_examples(counting_examples(n_examples, vocab, seed), length)
        return write_packed(directory, tokens, segments, loss_mask)

    return make


@pytest.fixture(scope="session")
def megatron_packed_dir(megatron_packed_factory) -> Path:
    """The default tiny packed dataset (counting task, rows of 32 tokens, vocab 64)."""
    return megatron_packed_factory()
