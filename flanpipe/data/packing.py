"""Pack encoded examples into fixed-length rows and write them as Megatron-Core IndexedDatasets.

Best-fit decreasing wastes far less than seqio's greedy next-fit (BFD is within 11/9 of the optimal
row count; next-fit can waste half the tokens), and on instruction data it leaves well under 1% padding.
Row layout and the three datasets (tokens / segments / loss_mask) follow ARCH.md, "Packed data".

The files are written here (``IndexedRowsWriter``), byte for byte what Megatron's IndexedDatasetBuilder
writes for one document per row (tests/test_packing.py compares them), and read back with Megatron's
IndexedDataset (flanpipe.train.rows). Importing Megatron's builder to write them cost a pack job ~3-5 s of
CPU (``megatron.core`` and torch: nearly all of a default-DAG pack job's 4.6-4.9 s); rows of equal
length make the index three numpy ranges.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import polars as pl

from flanpipe.core.io import atomic_path
from flanpipe.data.tokenize import EncodedExamples, token_positions

# Rows materialised at once while writing: 4,096 rows x 2,048 tokens x (4 + 4 + 1) B ~= 75 MB.
_WRITE_CHUNK_ROWS = 4_096

# Megatron-Core's IndexedDataset index (megatron/core/datasets/indexed_dataset.py, _IndexWriter): a fixed
# header, version 1, the dtype's code, then sequence count, document count, int32 sequence lengths, int64
# byte offsets of the sequences in the .bin, and int64 document boundaries (sequence indices, from 0).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4}


class IndexedRowsWriter:
    """One IndexedDataset (``prefix.bin`` + ``prefix.idx``) of equal-length rows, one document per row."""

    def __init__(self, prefix: Path, dtype: type[np.number], row_length: int) -> None:
        self.prefix, self.dtype, self.row_length = Path(prefix), np.dtype(dtype), row_length
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"IndexedRowsWriter: no IndexedDataset code for dtype {self.dtype}")
        self.rows = 0
        self._bin = open(self.prefix.with_suffix(".bin"), "wb")  # noqa: SIM115 (closed by finalize)

    def add_rows(self, rows: np.ndarray) -> None:
        """Append rows [n, row_length] (C order: row after row, as add_document writes them)."""
        if rows.ndim != 2 or rows.shape[1] != self.row_length:
            raise ValueError(f"rows of shape {rows.shape}, expected [n, {self.row_length}]")
        self._bin.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes(order="C"))
        self.rows += rows.shape[0]

    def finalize(self) -> None:
        """Close the .bin and write the .idx for the rows added."""
        self._bin.close()
        n, itemsize = self.rows, self.dtype.itemsize
        with open(self.prefix.with_suffix(".idx"), "wb") as idx:
            idx.write(_INDEX_HEADER)
            idx.write(np.array([1], dtype="<u8").tobytes())
            idx.write(np.array([_DTYPE_CODES[self.dtype]], dtype="<u1").tobytes())
            idx.write(np.array([n, n + 1], dtype="<u8").tobytes())  # sequences, document boundaries
            idx.write(np.full(n, self.row_length, dtype="<i4").tobytes())
            idx.write((np.arange(n, dtype="<i8") * (self.row_length * itemsize)).tobytes())
            idx.write(np.arange(n + 1, dtype="<i8").tobytes())


def _check_lengths(lengths: np.ndarray, pack_length: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > pack_length):
        raise ValueError(f"every length must be in [1, {pack_length}], got min {lengths.min()} max {lengths.max()}")
    return lengths


def best_fit_decreasing(lengths: np.ndarray, pack_length: int) -> np.ndarray:
    """Row index per example: longest first, each into the open row with the least room that still fits.

    Lengths are integers <= pack_length, so open rows are bucketed by remaining capacity (one stack of
    row ids per capacity value) and a sorted list holds the capacities whose stack is non-empty. Best fit
    is then a bisect for the smallest capacity >= length: O(log L) per example instead of O(rows), and
    the list insert/delete is a memmove of at most L pointers. Ties (equal lengths) keep example order
    (stable sort); among equally full rows the most recently touched is used (stack), deterministically.
    """
    lengths = _check_lengths(lengths, pack_length)
    order = np.argsort(-lengths, kind="stable").tolist()
    lens = lengths.tolist()
    stacks: list[list[int]] = [[] for _ in range(pack_length + 1)]  # capacity -> open row ids
    open_caps: list[int] = []  # sorted capacities c with stacks[c] non-empty
    rows = [0] * len(lens)
    n_rows = 0
    bisect_left, insort = bisect.bisect_left, bisect.insort
    for i in order:
        n = lens[i]
        k = bisect_left(open_caps, n)
        if k == len(open_caps):  # nothing fits: open a new row
            row, cap = n_rows, pack_length
            n_rows += 1
        else:
            cap = open_caps[k]
            stack = stacks[cap]
            row = stack.pop()
            if not stack:
                del open_caps[k]
        rows[i] = row
        left = cap - n
        if left:  # a full row never takes another example, so it leaves the structure
            stack = stacks[left]
            if not stack:
                insort(open_caps, left)
            stack.append(row)
    return np.asarray(rows, dtype=np.int64)


def next_fit(lengths: np.ndarray, pack_length: int) -> np.ndarray:
    """seqio-style greedy baseline: examples in order; start a new row when the next one does not fit."""
    lengths = _check_lengths(lengths, pack_length)
    rows = [0] * len(lengths)
    row, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > pack_length:
            row, used = row + 1, 0
        rows[i] = row
        used += n
    return np.asarray(rows, dtype=np.int64)


def padded(lengths: np.ndarray) -> np.ndarray:
    """No-packing baseline: one example per row."""
    return np.arange(len(lengths), dtype=np.int64)


def packing_efficiency(lengths: np.ndarray, rows: np.ndarray, pack_length: int) -> float:
    """Real tokens / row slots: sum(lengths) / (n_rows x pack_length); 1.0 means no padding."""
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    return float(np.sum(lengths)) / (n_rows * pack_length) if n_rows else 1.0


def _row_layout(rows: np.ndarray, n_rows: int, order_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle rows, then lay examples out: (example order, output row per example, segment id).

    BFD numbers rows roughly by length (long examples first), so rows are renumbered by a seeded
    permutation. Inside a row examples keep their mixture order; segment ids count 1..k along the row.
    """
    new_row = np.random.default_rng(order_seed).permutation(n_rows)[rows]
    order = np.lexsort((np.arange(len(rows)), new_row))  # by output row, then example index
    out_row = new_row[order]
    # first position (in `order`) of each example's row -> rank within the row
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = out_row[1:] != out_row[:-1]
    first = np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))
    segment = (np.arange(len(order)) - first + 1).astype(np.int32)
    return order, out_row, segment


def _fill_rows(
    encoded: EncodedExamples,
    ex: np.ndarray,
    local_row: np.ndarray,
    segment: np.ndarray,
    n_rows: int,
    pack_length: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialise ``n_rows`` rows from examples ``ex`` (in row order) by one scatter per array.

    Padding slots hold ``pad_id`` (the tokenizer's; masked out of loss and attention by segment 0)."""
    lens = encoded.offsets[ex + 1] - encoded.offsets[ex]
    # start of each example within its row = tokens of the earlier examples in the same row
    csum = np.cumsum(lens) - lens
    is_first = np.ones(len(ex), dtype=bool)
    is_first[1:] = local_row[1:] != local_row[:-1]
    start_in_row = csum - np.maximum.accumulate(np.where(is_first, csum, 0))
    pos = token_positions(lens)  # token position within its example
    src = np.repeat(encoded.offsets[ex], lens) + pos
    dst = np.repeat(local_row * pack_length + start_in_row, lens) + pos
    tokens = np.full(n_rows * pack_length, pad_id, dtype=np.int32)
    segments = np.zeros(n_rows * pack_length, dtype=np.int32)  # 0 = padding
    loss_mask = np.zeros(n_rows * pack_length, dtype=np.uint8)
    tokens[dst] = encoded.tokens[src]
    segments[dst] = np.repeat(segment, lens)
    loss_mask[dst] = pos >= np.repeat(encoded.input_lengths[ex], lens)  # target tokens incl. EOS
    shape = (n_rows, pack_length)
    return tokens.reshape(shape), segments.reshape(shape), loss_mask.reshape(shape)


def pack_to_indexed_dataset(
    encoded: EncodedExamples,
    pack_length: int,
    out_dir: Path,
    max_rows: int | None = None,
    order_seed: int = 0,
    meta: pl.DataFrame | None = None,
    pad_id: int = 0,
) -> dict:
    """BFD-pack ``encoded`` into rows of exactly ``pack_length`` tokens and write tokens/segments/loss_mask.

    ``meta`` (one row per example, e.g. flanpipe.data.provenance.mixture_meta) adds ``provenance.parquet``:
    one row per packed segment with its row, segment id, token span and ``meta``'s columns.
    Writes into a temp dir beside ``out_dir`` and renames it into place, so a killed job leaves no
    plausible-looking partial dataset. ``max_rows`` keeps only the first rows after the shuffle (an
    unbiased subset: every row is equally likely to survive). Returns the stats written to packing.json.
    Long but one pass: placement, the three column writers and the stats share the placement arrays, which
    split helpers would have to hand to each other.
    """
    need = encoded.inputs_length + encoded.targets_length
    if pack_length < need:
        raise ValueError(
            f"pack_length {pack_length} < inputs_length {encoded.inputs_length} + targets_length "
            f"{encoded.targets_length} = {need}: a maximal example would not fit in one row"
        )
    lengths = encoded.lengths
    rows = best_fit_decreasing(lengths, pack_length)
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    stats_all = {
        "packing_efficiency": packing_efficiency(lengths, rows, pack_length),
        "next_fit_efficiency": packing_efficiency(lengths, next_fit(lengths, pack_length), pack_length),
        "padded_efficiency": packing_efficiency(lengths, padded(lengths), pack_length),
    }
    order, out_row, segment = _row_layout(rows, n_rows, order_seed)
    kept_rows = n_rows if max_rows is None else min(n_rows, max_rows)
    n_kept = int(np.searchsorted(out_row, kept_rows))  # out_row is sorted: examples in the kept rows
    order, out_row, segment = order[:n_kept], out_row[:n_kept], segment[:n_kept]

    out_dir = Path(out_dir)
    names = {"tokens": np.int32, "segments": np.int32, "loss_mask": np.uint8}
    with atomic_path(out_dir, directory=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the final dir should read like any other output
        writers = {k: IndexedRowsWriter(tmp / k, dt, pack_length) for k, dt in names.items()}
        # split example ranges at chunk boundaries of the (sorted) output rows
        bounds = np.searchsorted(out_row, np.arange(0, kept_rows + _WRITE_CHUNK_ROWS, _WRITE_CHUNK_ROWS))
        for c, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            row0 = c * _WRITE_CHUNK_ROWS
            n = min(_WRITE_CHUNK_ROWS, kept_rows - row0)
            if n <= 0:
                break
            arrays = _fill_rows(encoded, order[lo:hi], out_row[lo:hi] - row0, segment[lo:hi], n, pack_length, pad_id)
            for writer, arr in zip(writers.values(), arrays, strict=True):
                writer.add_rows(arr)  # one row = one document, so GPTDataset-style readers see rows
        for writer in writers.values():
            writer.finalize()
        real = int(lengths[order].sum())
        stats = {
            "rows": kept_rows,
            "examples": n_kept,
            "real_tokens": real,
            "total_tokens": kept_rows * pack_length,
            # efficiency of what was written; the *_efficiency baselines below are over all examples
            "written_efficiency": real / (kept_rows * pack_length) if kept_rows else 1.0,
            **stats_all,
            "rows_available": n_rows,
            "examples_available": len(encoded),
            "truncated_inputs": encoded.truncated_inputs,
            "truncated_targets": encoded.truncated_targets,
            "trimmed_exemplars": encoded.trimmed_exemplars,  # few-shot rows that lost exemplars to fit inputs
            "inputs_length": encoded.inputs_length,
            "targets_length": encoded.targets_length,
            "pack_length": pack_length,
            "order_seed": order_seed,
        }
        if meta is not None:
            from flanpipe.data.provenance import provenance_frame

            provenance_frame(order, out_row, segment, lengths, meta).write_parquet(tmp / "provenance.parquet")
        (tmp / "packing.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def pack_mixture(
    mixture: Path,
    tokenizer: Path,
    model_config: Path,
    out_dir: Path,
    *,
    lengths: dict[str, int],
    seed: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Rule ``pack``: tokenize a mixture's (inputs, targets) and pack them into IndexedDatasets.

    ``tokenizer``: a ``.model`` file or a checkpoint directory (``open_tokenizer``); its EOS ends each
    target and its pad id fills row padding. The tokenizer's vocabulary is checked against the model
    config first, so a mismatched tokenizer fails here, in seconds, instead of as an index error in training.
    """
    from flanpipe.core.io import read_yaml
    from flanpipe.data.provenance import mixture_meta
    from flanpipe.data.tokenize import check_vocab, encode_parquet, open_tokenizer

    if lengths["pack"] < lengths["inputs"] + lengths["targets"]:
        raise ValueError(
            f"pack length {lengths['pack']} < inputs {lengths['inputs']} + targets {lengths['targets']} "
            f"= {lengths['inputs'] + lengths['targets']}"
        )
    tok = open_tokenizer(tokenizer)
    check_vocab(tok, int(read_yaml(model_config)["vocab_size"]), path=str(tokenizer), model_path=str(model_config))
    encoded = encode_parquet(tok, mixture, lengths["inputs"], lengths["targets"], num_threads)
    meta = mixture_meta(mixture, seed)  # provenance.parquet: seed is the mixture's, which the pack rule passes
    return pack_to_indexed_dataset(
        encoded, lengths["pack"], Path(out_dir), order_seed=seed, meta=meta, pad_id=tok.pad_id
    )
