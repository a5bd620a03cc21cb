"""The order training reads packed rows in: an infinite stream of per-epoch shuffles of the packed file.

A pure numpy function of (rows, seed, sample index), so the trainer (flanpipe.train.rows), a resumed run and
provenance (which examples the model had seen by step N) compute the same order without torch.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def sample_rows(n_rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Rows for global samples start .. start+count-1 of the infinite shuffled stream.

    Sample k is row perm_e[k % n_rows] of epoch e = k // n_rows, with a fresh permutation per
    epoch seeded by (seed, e): a pure function of k, so any rank can jump to any point.
    """
    k = np.arange(start, start + count, dtype=np.int64)
    epochs = k // n_rows
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two epochs per batch
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n_rows, seed, int(epoch))[k[sel] % n_rows]
    return out
