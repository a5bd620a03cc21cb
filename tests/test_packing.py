"""Packing invariants: BFD quality and the on-disk rows read back through Megatron's IndexedDataset."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flanpipe.data import packing
from flanpipe.data.packing import best_fit_decreasing, next_fit, pack_to_indexed_dataset, packing_efficiency, padded
from flanpipe.data.tokenize import EncodedExamples


def _loads(lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.bincount(rows, weights=lengths).astype(np.int64)


def _assert_valid(lengths: np.ndarray, rows: np.ndarray, pack_length: int) -> None:
    assert rows.shape == lengths.shape and rows.dtype == np.int64
    if len(rows):
        n_rows = rows.max() + 1
        assert set(np.unique(rows).tolist()) == set(range(n_rows))  # row ids are 0..n-1, none empty
        assert _loads(lengths, rows).max() <= pack_length


def _naive_best_fit_decreasing(lengths: list[int], pack_length: int) -> list[int]:
    """O(n x rows) textbook BFD, the behaviour the bucketed version must reproduce."""
    loads: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [(pack_length - load, r) for r, load in enumerate(loads) if load + n <= pack_length]
        if fits:
            loads[min(fits)[1]] += n
        else:
            loads.append(n)
    return sorted(loads)


def _optimal_rows(lengths: list[int], pack_length: int) -> int:
    """Exact bin packing by DP over subsets: best (rows, fill of the last row) for each set packed."""
    n = len(lengths)
    best = [(math.inf, 0)] * (1 << n)
    best[0] = (1, 0)
    for mask in range(1 << n):
        rows, fill = best[mask]
        for i in range(n):
            if not mask >> i & 1:
                cand = (rows, fill + lengths[i]) if fill + lengths[i] <= pack_length else (rows + 1, lengths[i])
                best[mask | 1 << i] = min(best[mask | 1 << i], cand)
    return best[-1][0]


def _flan_like(n: int, rng: np.random.Generator, cap_in: int = 1024, cap_tg: int = 256) -> np.ndarray:
    """Lognormal input/target lengths capped like FLAN's 1024 + 256 (target cap includes EOS)."""
    inp = np.minimum(np.ceil(rng.lognormal(5.0, 0.9, n)), cap_in)
    tgt = np.minimum(np.ceil(rng.lognormal(2.0, 1.2, n)), cap_tg - 1) + 1
    return (inp + tgt).astype(np.int64)


@pytest.mark.parametrize("seed", range(5))
def test_bfd_valid_and_matches_textbook(seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 65, size=int(rng.integers(0, 400)))
    rows = best_fit_decreasing(lengths, 64)
    _assert_valid(lengths, rows, 64)
    # equal-capacity rows are interchangeable, so the loads must equal the textbook algorithm's
    assert sorted(_loads(lengths, rows).tolist()) == _naive_best_fit_decreasing(lengths.tolist(), 64)
    assert np.array_equal(rows, best_fit_decreasing(lengths, 64))  # deterministic


@pytest.mark.parametrize("seed", range(40))
def test_bfd_within_bound_of_optimal(seed: int):
    # tight bound for FFD/BFD (Dosa 2007): rows <= 11/9 OPT + 6/9
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 21, size=int(rng.integers(1, 11)))
    bfd = int(best_fit_decreasing(lengths, 20).max()) + 1
    opt = _optimal_rows(lengths.tolist(), 20)
    assert opt <= bfd <= 11 / 9 * opt + 6 / 9


def test_bfd_optimal_where_next_fit_is_not():
    # 6 | 5 5 | 4 in order wastes a row; BFD puts 4 into the 6-row's gap: {6, 4}, {5, 5}
    lengths = np.array([6, 5, 5, 4])
    assert _optimal_rows(lengths.tolist(), 10) == 2
    assert best_fit_decreasing(lengths, 10).tolist() == [0, 1, 1, 0]
    assert int(next_fit(lengths, 10).max()) + 1 == 3


@pytest.mark.parametrize("seed", range(5))
def test_bfd_beats_next_fit_on_random_lengths(seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 513, size=5_000)
    bfd = packing_efficiency(lengths, best_fit_decreasing(lengths, 512), 512)
    nf = packing_efficiency(lengths, next_fit(lengths, 512), 512)
    assert bfd >= nf
    assert packing_efficiency(lengths, padded(lengths), 512) < nf


def test_bfd_flan_like_padding_below_one_percent():
    lengths = _flan_like(30_000, np.random.default_rng(0))
    eff = packing_efficiency(lengths, best_fit_decreasing(lengths, 2048), 2048)
    assert eff > 0.99


def test_next_fit_and_padded():
    lengths = np.array([3, 3, 5, 2, 4])
    assert next_fit(lengths, 6).tolist() == [0, 0, 1, 2, 2]
    assert padded(lengths).tolist() == [0, 1, 2, 3, 4]
    assert packing_efficiency(lengths, next_fit(lengths, 6), 6) == pytest.approx(17 / 18)
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        best_fit_decreasing(lengths, 4)


# ---- writing IndexedDatasets ------------------------------------------------------------------------


def _random_encoded(n: int, inputs_length: int, targets_length: int, seed: int) -> EncodedExamples:
    """Examples already obeying the encode rule: inputs <= limit, targets end in EOS (1), no pad (0)."""
    rng = np.random.default_rng(seed)
    n_in = rng.integers(0, inputs_length + 1, n)
    n_tg = rng.integers(1, targets_length + 1, n)
    offsets = np.concatenate([[0], np.cumsum(n_in + n_tg)]).astype(np.int64)
    tokens = rng.integers(3, 1000, offsets[-1]).astype(np.int32)
    tokens[offsets[1:] - 1] = 1
    return EncodedExamples(tokens, offsets, n_in.astype(np.int32), 2, 1, inputs_length, targets_length)


def _read(out: Path) -> dict[str, np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    arrays = {}
    for name in ("tokens", "segments", "loss_mask"):
        ds = IndexedDataset(str(out / name))
        arrays[name] = np.stack([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros((0, 0))
    return arrays


def _examples_in_rows(arrays: dict[str, np.ndarray]) -> Counter:
    """(input ids, target ids) of every packed segment, checking the row invariants on the way."""
    found: Counter = Counter()
    for tok, seg, mask in zip(arrays["tokens"], arrays["segments"], arrays["loss_mask"], strict=True):
        k = int(seg.max())
        n_real = int((seg > 0).sum())
        # segments 1..k as contiguous runs from the row start, then padding (0) to the end
        assert np.all(seg[:n_real] > 0) and np.all(np.diff(seg[:n_real]) >= 0)
        assert np.array_equal(np.unique(seg[:n_real]), np.arange(1, k + 1))
        assert np.all(tok[n_real:] == 0) and np.all(mask[n_real:] == 0)
        for s in range(1, k + 1):
            t, m = tok[seg == s], mask[seg == s]
            n_in = int((m == 0).sum())
            # loss mask = exactly the target part: zeros then ones, and the target ends in EOS
            assert np.all(m[:n_in] == 0) and np.all(m[n_in:] == 1) and t[-1] == 1
            found[(tuple(t[:n_in].tolist()), tuple(t[n_in:].tolist()))] += 1
    return found


def _expected(enc: EncodedExamples) -> Counter:
    return Counter(tuple(map(tuple, (a.tolist(), b.tolist()))) for a, b in map(enc.example, range(len(enc))))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_indexed_rows_writer_writes_megatrons_bytes(tmp_path: Path, dtype) -> None:
    """flanpipe's writer (no Megatron import in a pack job) writes exactly the .bin/.idx that Megatron's
    IndexedDatasetBuilder writes for one document per row, in two chunks as pack_to_indexed_dataset does."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from flanpipe.data.packing import IndexedRowsWriter

    rows = np.random.default_rng(0).integers(0, 200, (7, 5)).astype(dtype)
    ours = IndexedRowsWriter(tmp_path / "ours", dtype, 5)
    ours.add_rows(rows[:3])
    ours.add_rows(rows[3:])
    ours.finalize()
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for row in rows:
        builder.add_document(row, [5])
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    with pytest.raises(ValueError, match="expected"):
        IndexedRowsWriter(tmp_path / "bad", dtype, 5).add_rows(rows[:, :4])


def test_pack_round_trip(tmp_path: Path):
    enc = _random_encoded(500, inputs_length=40, targets_length=12, seed=0)
    out = tmp_path / "packed"
    stats = pack_to_indexed_dataset(enc, 64, out, order_seed=7)
    arrays = _read(out)
    assert arrays["tokens"].shape == (stats["rows"], 64)
    assert arrays["tokens"].dtype == np.int32 and arrays["segments"].dtype == np.int32
    assert arrays["loss_mask"].dtype == np.uint8
    # every example exactly once, byte for byte, within its length limits
    assert _examples_in_rows(arrays) == _expected(enc)
    assert all(len(i) <= 40 and len(t) <= 12 for i, t in _expected(enc))

    on_disk = json.loads((out / "packing.json").read_text())
    assert on_disk == stats
    assert stats["examples"] == 500 and stats["real_tokens"] == int(enc.lengths.sum())
    assert stats["total_tokens"] == stats["rows"] * 64
    assert stats["packing_efficiency"] == pytest.approx(stats["real_tokens"] / stats["total_tokens"])
    assert stats["packing_efficiency"] >= stats["next_fit_efficiency"] > stats["padded_efficiency"]
    assert (stats["truncated_inputs"], stats["truncated_targets"]) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no temp dir left behind


def test_pack_rows_are_shuffled_deterministically(tmp_path: Path):
    enc = _random_encoded(400, 40, 12, seed=1)
    pack_to_indexed_dataset(enc, 64, tmp_path / "a", order_seed=3)
    pack_to_indexed_dataset(enc, 64, tmp_path / "b", order_seed=3)
    pack_to_indexed_dataset(enc, 64, tmp_path / "c", order_seed=4)
    for name in ("tokens.bin", "tokens.idx", "segments.bin", "loss_mask.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, c = _read(tmp_path / "a"), _read(tmp_path / "c")
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert _examples_in_rows(a) == _examples_in_rows(c)
    # BFD opens rows longest-first; after the shuffle the per-row real-token counts are not sorted
    first_len = (a["segments"] == 1).sum(axis=1)
    assert np.any(np.diff(first_len) > 0) and np.any(np.diff(first_len) < 0)


def test_pack_in_write_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    enc = _random_encoded(300, 20, 8, seed=2)
    pack_to_indexed_dataset(enc, 32, tmp_path / "whole")
    monkeypatch.setattr(packing, "_WRITE_CHUNK_ROWS", 5)
    pack_to_indexed_dataset(enc, 32, tmp_path / "chunked")
    for name in ("tokens.bin", "segments.bin", "loss_mask.bin", "tokens.idx"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "chunked" / name).read_bytes()


def test_pack_max_rows(tmp_path: Path):
    enc = _random_encoded(300, 20, 8, seed=3)
    stats = pack_to_indexed_dataset(enc, 32, tmp_path / "p", max_rows=10)
    arrays = _read(tmp_path / "p")
    assert stats["rows"] == 10 < stats["rows_available"] and arrays["tokens"].shape == (10, 32)
    found = _examples_in_rows(arrays)
    assert sum(found.values()) == stats["examples"] and not found - _expected(enc)
    assert stats["real_tokens"] == int((arrays["segments"] > 0).sum())


def test_pack_length_too_small(tmp_path: Path):
    enc = _random_encoded(10, 20, 8, seed=4)
    with pytest.raises(ValueError, match=r"pack_length 27 < inputs_length 20 \+ targets_length 8 = 28"):
        pack_to_indexed_dataset(enc, 27, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_pack_killed_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    enc = _random_encoded(100, 20, 8, seed=5)
    out = tmp_path / "p"
    stats = pack_to_indexed_dataset(enc, 32, out)  # an earlier good result ...

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(packing, "_fill_rows", boom)
    with pytest.raises(RuntimeError, match="killed"):
        pack_to_indexed_dataset(enc, 32, out)
    # ... is untouched, and no temp dir is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert json.loads((out / "packing.json").read_text()) == stats


def test_pack_empty(tmp_path: Path):
    enc = _random_encoded(0, 4, 4, seed=6)
    stats = pack_to_indexed_dataset(enc, 8, tmp_path / "p")
    assert stats["rows"] == 0 and stats["examples"] == 0
    assert (tmp_path / "p" / "tokens.idx").exists()
