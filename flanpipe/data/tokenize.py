"""Tokenizers: train flanpipe's SentencePiece model, open any tokenizer, batch-encode examples into flat arrays.

``open_tokenizer`` is the one entry point: a SentencePiece ``.model`` file or a checkpoint directory
(``tokenizer.json`` / ``tokenizer.model`` + ``tokenizer_config.json``), behind one ``Tokenizer`` interface.

The encoding rule is the contract the packer, trainer and evaluator share (ARCH.md, "Tokenizer"):
input ids truncated to ``inputs_length``; target ids truncated to ``targets_length - 1`` and then the
tokenizer's EOS appended, so a target always ends in EOS and never exceeds ``targets_length``. Rank
classification (flanpipe.eval.evaluate) scores an option as a target, but whole unless ``eval.option_tokens``
caps it: a cut at ``targets_length`` could make two options tie.

BOS and other special tokens: the input is encoded as the checkpoint's tokenizer encodes a prompt
(``add_special=True``: a Llama tokenizer puts BOS first, as ``transformers`` does), the target as bare
text. So every example is ``[BOS] input target EOS``: packing concatenates whole examples, each row
segment starts with the BOS the model saw at the start of every pretraining document, and the EOS
between examples is the one the model must learn to emit. A BOS inside the target would be a token
the model is trained to generate mid-answer; BOS only at the start of a packed row would give every
later example in that row a start the model never sees at evaluation time, where each input is
encoded on its own (with its BOS). Truncation keeps the start of the input, so BOS survives it.
flanpipe's own model has no BOS, so its ids are unchanged.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from flanpipe.core.io import atomic_path
from flanpipe.data.hf_tokenizer import Tokenizer

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Encode this many examples at a time: the chunk's words (~65,536 x ~200 x ~40 B ~= 0.5 GB as split
# lists and Arrow arrays) are the transient peak; the numpy result is 4 B per token.
_ENCODE_CHUNK = 65_536
WORD_START = "\u2581"  # '▁': SentencePiece's escaped space, which starts every word piece


def _sample_sentences(parquet_paths: Sequence[Path], sample_size: int, seed: int) -> list[str]:
    """Pick ``sample_size`` examples by smallest seeded hash of (inputs, targets).

    Hashing content (not position) makes the sample independent of file order and row order, and
    ``bottom_k`` keeps it a top-k instead of a full sort. Ties are broken by the text itself.
    Polars documents its hash as stable within a version, which is what "same inputs + seed" needs.
    The k smallest of all files are the k smallest of (running k smallest + next file), so files are
    reduced one at a time: peak memory is one file's text, not every shard's (FLAN: ~1.5 GB of it).
    """
    by = ["_key", "inputs", "targets"]
    best: pl.DataFrame | None = None
    for p in parquet_paths:
        part = (
            pl.scan_parquet(p)
            .select("inputs", "targets")
            .with_columns(_key=pl.struct("inputs", "targets").hash(seed))
            .collect()
        )
        if len(part) > sample_size:
            # keep rows with key <= the k-th smallest key (ties included): a top-k over the text tie-breakers
            # on the whole file would copy all its text into sort keys (multi_news-sized file: +0.8 GB)
            part = part.filter(pl.col("_key") <= part["_key"].bottom_k(sample_size).max())
        best = (part if best is None else pl.concat([best, part])).bottom_k(sample_size, by=by)
        # Polars strings are views into the file's buffers; copying the k kept rows out (via Arrow)
        # lets those buffers go, else they all stay alive and peak memory is every shard's text again
        best = pl.DataFrame(best.to_arrow())
    if best is None:
        return []
    sample = (
        best.sort(by)
        # one sentence per field: inputs and targets are encoded separately, so train on them separately
        .select(sentence=pl.concat_list("inputs", "targets"))
        .explode("sentence")
        .filter(pl.col("sentence").str.len_bytes() > 0)
    )
    return sample["sentence"].to_list()


def _normalize_model_bytes(model: bytes) -> bytes:
    """Record ``num_threads = 1`` in the model's trainer spec.

    SentencePiece BPE training gives the same pieces and scores for any thread count (checked in the
    tests), but it copies ``num_threads`` into the saved proto, so the bytes would depend on the
    machine's core count. Fixing the recorded value makes same sample + seed -> byte-identical file.
    """
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.num_threads = 1
    return proto.SerializeToString(deterministic=True)


def _vocab_text(model: bytes) -> str:
    """The ``.vocab`` side file SentencePiece writes with ``model_prefix``: ``piece<TAB>score`` per id."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def train_tokenizer(
    parquet_paths: Sequence[Path],
    out_model: Path,
    vocab_size: int,
    sample_size: int,
    seed: int,
    num_threads: int | None = None,
) -> Path:
    """Train a byte-fallback BPE tokenizer on a seeded sample of mixture/shard text; return the .model path.

    Normalization is 'identity' with whitespace kept, because FLAN templates carry meaning in newlines
    ("OPTIONS:\\n- a\\n- b") and the default nmt_nfkc rule would fold them into spaces.
    ``vocab_size`` is a soft limit (hard_vocab_limit=False): a tiny corpus yields a smaller vocabulary
    instead of an error; ``check_vocab`` guards the other direction.
    """
    out_model = Path(out_model)
    if out_model.suffix != ".model":
        raise ValueError(f"tokenizer path must end in .model, got {out_model}")
    sentences = _sample_sentences(parquet_paths, sample_size, seed)
    if not sentences:
        raise ValueError(f"no non-empty inputs/targets text to train a tokenizer on in {list(parquet_paths)}")
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buf,  # in-memory: no temp prefix or input path recorded in the proto
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            input_sentence_size=0,  # use the whole (already sampled) set; no SentencePiece-side shuffling
            max_sentence_length=1 << 16,  # default 4192 bytes would silently drop long FLAN inputs
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training for {out_model} failed (vocab_size={vocab_size}; byte fallback "
            f"reserves 256 + 3 special ids and every character of the sample needs one more): {err}"
        ) from err
    model = _normalize_model_bytes(buf.getvalue())
    vocab_path = out_model.with_suffix(".vocab")
    with atomic_path(vocab_path) as tmp:
        tmp.write_text(_vocab_text(model), encoding="utf-8")
    with atomic_path(out_model) as tmp:  # .model last: its presence means both are complete
        tmp.write_bytes(model)
    return out_model


@dataclass
class SPTokenizer:
    """A bare SentencePiece ``.model`` (flanpipe-trained or user-given) behind the ``Tokenizer`` interface.

    Ids are ``sp.encode(text)``'s: no BOS is added (a bare model carries no tokenizer config that asks
    for one, and flanpipe's own model has none), so packed data stays as it always was. EOS and pad
    are the model's own ids (flanpipe's: pad 0, EOS 1); a model without a pad id pads with EOS.
    """

    sp: spm.SentencePieceProcessor
    source: Path
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    add_bos: bool = False

    @functools.cached_property
    def splits_at_spaces(self) -> bool:
        """Whether the per-word cache of ``encode_examples`` is exact for this model (see ``splits_at_spaces``)."""
        return splits_at_spaces(self.sp)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(
        self, texts: list[str], add_special: bool = True, num_threads: int | None = None
    ) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        return self.sp.decode([list(r) for r in rows])


def as_tokenizer(
    tok: Tokenizer | spm.SentencePieceProcessor, source: str | os.PathLike[str] = "<in memory>"
) -> Tokenizer:
    """``tok`` itself, or an in-memory SentencePiece processor wrapped as an ``SPTokenizer`` (tests, benches)."""
    if not isinstance(tok, spm.SentencePieceProcessor):
        return tok
    if tok.eos_id() < 0:
        raise ValueError(f"{source}: SentencePiece model has no EOS id (train it with eos_id >= 0)")
    pad = tok.pad_id() if tok.pad_id() >= 0 else tok.eos_id()
    return SPTokenizer(tok, Path(source), tok.get_piece_size(), tok.eos_id(), pad)


def _open_sentencepiece(path: Path) -> Tokenizer:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a SentencePiece .model file: {e}") from None
    return as_tokenizer(sp, path)


def open_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The one way to get a tokenizer: a SentencePiece ``.model`` file, or a checkpoint directory.

    A directory (a checkpoint, or ``flanpipe import-hf``'s output, whose ``hf/`` holds the copied side files) is read
    with its ``tokenizer.json`` or ``tokenizer.model`` plus ``tokenizer_config.json``, so ids, EOS, pad
    and BOS are the checkpoint's (``flanpipe.data.hf_tokenizer.load_hf_tokenizer``).
    """
    path = Path(path)
    if path.is_dir():
        from flanpipe.data.hf_tokenizer import load_hf_tokenizer

        # ``flanpipe import-hf DIR --out OUT`` keeps the checkpoint's side files in OUT/hf
        names = ("tokenizer.json", "tokenizer.model")
        if not any((path / n).exists() for n in names) and any((path / "hf" / n).exists() for n in names):
            path = path / "hf"
        return load_hf_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (a SentencePiece .model file or a checkpoint directory)")
    return _open_sentencepiece(path)


def piece_count(path: str | os.PathLike[str]) -> int:
    """Vocabulary size of a .model file, read from its proto without building a processor (milliseconds,
    so the DAG can check a given tokenizer against the model config before any job runs), or of a
    checkpoint tokenizer directory (``open_tokenizer``'s ``vocab_size``, added tokens included)."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if path.is_dir():
        return open_tokenizer(path).vocab_size
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise ValueError(f"{path} is not a SentencePiece .model file: {e}") from None
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece .model file: it has no pieces")
    return len(proto.pieces)


def check_vocab(
    tok: Tokenizer,
    model_vocab_size: int,
    path: str | os.PathLike[str] = "tokenizer",
    model_path: str | os.PathLike[str] = "the model config",
) -> None:
    """Raise if token ids could index past the model's embedding table (a silent crash on GPU)."""
    n = as_tokenizer(tok).vocab_size
    if n > model_vocab_size:
        raise ValueError(
            f"tokenizer {path} has {n} pieces but {model_path}'s vocab_size is {model_vocab_size} "
            f"({n} > {model_vocab_size}); "
            f"raise the model's vocab_size to >= {n} or train a smaller tokenizer"
        )


@dataclass(frozen=True)
class EncodedExamples:
    """A batch of encoded examples as flat arrays (no per-example Python objects).

    Example i is ``tokens[offsets[i]:offsets[i + 1]]``: its first ``input_lengths[i]`` tokens are the
    input, the rest the target ending in EOS.
    """

    tokens: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n + 1], offsets[0] == 0
    input_lengths: np.ndarray  # int32 [n]
    truncated_inputs: int  # examples whose input was cut to inputs_length
    truncated_targets: int  # examples whose target was cut to targets_length - 1 (+ EOS)
    inputs_length: int
    targets_length: int
    trimmed_exemplars: int = 0  # few-shot examples that lost exemplars to fit inputs_length (their own prompt kept)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Total tokens per example (input + target + EOS), int64."""
        return np.diff(self.offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        """Target tokens per example including EOS, int64."""
        return self.lengths - self.input_lengths

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, target ids incl. EOS) of example i, for tests and debugging."""
        seq = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        return seq[: self.input_lengths[i]], seq[self.input_lengths[i] :]


def _flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """List of id lists -> (flat int32 ids, int64 lengths) without a Python loop over tokens."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def splits_at_spaces(sp: spm.SentencePieceProcessor) -> bool:
    """Whether encoding a text equals concatenating the encodings of its ' '-separated words.

    SentencePiece escapes each space to '▁' and prepends one more (add_dummy_prefix), so a text is the
    words '▁w0', '▁w1', ... When no piece holds '▁' after its first character (true of every model
    trained with split_by_whitespace, the default and ours) no BPE merge can cross a word start, so
    each word encodes exactly as ``sp.encode(w)`` does on its own. Identity normalization that keeps
    extra spaces is required too: anything else could change where the model's words begin.
    """
    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    ns = proto.normalizer_spec
    return (
        ns.add_dummy_prefix
        and ns.escape_whitespaces
        and not ns.remove_extra_whitespaces
        and not ns.precompiled_charsmap
        and not proto.trainer_spec.treat_whitespace_as_suffix
        and all(WORD_START not in p.piece[1:] for p in proto.pieces)
    )


def _encode_by_words(
    sp: spm.SentencePieceProcessor, texts: pl.Series, num_threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """sp.encode of ``texts`` via each distinct word encoded once (valid when ``splits_at_spaces``).

    SentencePiece BPE costs ~1 us per token; a FLAN chunk of 65,536 examples has ~9M words but only
    ~170k distinct ones, so splitting + hashing the words (~50 ns each) and encoding the distinct ones
    is ~5x cheaper than encoding every text: 185M mixture tokens go from ~200 to ~40 CPU-seconds.
    """
    words = texts.str.split(" ")
    n_words = words.list.len().to_numpy().astype(np.int64)
    flat = words.explode()
    empty = (texts.str.len_bytes() == 0).to_numpy()
    if empty.any():  # "" splits into one empty word but encodes to nothing
        flat = flat.filter(pl.Series(np.repeat(~empty, n_words)))
        n_words[empty] = 0
    coded = pc.dictionary_encode(flat.rechunk().to_arrow())
    distinct = coded.dictionary.to_pylist()
    ids = sp.encode(distinct, out_type=int, num_threads=num_threads)
    # the empty word is a lone '▁' (leading, trailing or doubled space): half of " " = dummy prefix + space
    two_spaces = sp.encode(" ", out_type=int)
    space = two_spaces[: len(two_spaces) // 2]
    table_ids, table_len = _flatten([x if w else space for w, x in zip(distinct, ids, strict=True)])
    table_offsets = np.zeros(len(table_len) + 1, dtype=np.int64)
    np.cumsum(table_len, out=table_offsets[1:])
    table = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(table_offsets), pa.array(table_ids)))
    per_word = table.gather(pl.from_arrow(coded.indices))  # every list is non-empty: explode gives no nulls
    word_len = np.zeros(len(per_word) + 1, dtype=np.int64)
    np.cumsum(per_word.list.len().to_numpy(), out=word_len[1:])
    ends = np.cumsum(n_words)
    # tokens of text i = tokens of its words (ends[i] - n_words[i]) .. ends[i]
    return per_word.explode().to_numpy().astype(np.int32, copy=False), word_len[ends] - word_len[ends - n_words]


def _encode_texts(
    tok: Tokenizer, texts: pl.Series, num_threads: int, by_words: bool, add_special: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 ids, int64 lengths) exactly as ``tok.encode_batch(texts, add_special)`` gives them.

    ``by_words`` (an ``SPTokenizer`` that ``splits_at_spaces``, which adds no special tokens) takes
    the per-word cache; any other tokenizer encodes in its own native threads."""
    if by_words and texts.dtype == pl.String and len(texts) and not texts.null_count():
        return _encode_by_words(tok.sp, texts, num_threads)
    return _flatten(tok.encode_batch(texts.to_list(), add_special=add_special, num_threads=num_threads))


def token_positions(lengths: np.ndarray) -> np.ndarray:
    """Position of every token within its own sequence: lengths [2, 3] -> [0, 1, 0, 1, 2]."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def _after_exemplars(texts: pl.Series, ends: pl.Series, drop: np.ndarray) -> pl.Series:
    """Each text without its first ``drop[i]`` exemplars (``drop`` >= 1): cut at that exemplar's end."""
    frame = pl.DataFrame({"t": texts, "e": ends, "k": pl.Series(drop, dtype=pl.Int32)})
    return frame.select(pl.col("t").str.slice(pl.col("e").list.get(pl.col("k") - 1))).to_series()


def _splice(
    flat: np.ndarray, lengths: np.ndarray, rows: np.ndarray, sub_flat: np.ndarray, sub_lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) with the sequences of ``rows`` replaced by (sub_flat, sub_lengths), no loop over rows:
    each kept token moves from its old start + position to its new start + position."""
    new_lengths = lengths.copy()
    new_lengths[rows] = sub_lengths
    old_start, new_start = np.cumsum(lengths) - lengths, np.cumsum(new_lengths) - new_lengths
    out = np.empty(int(new_lengths.sum()), dtype=flat.dtype)
    keep = np.ones(len(lengths), dtype=bool)
    keep[rows] = False
    kept = lengths[keep]
    at = token_positions(kept)
    out[np.repeat(new_start[keep], kept) + at] = flat[np.repeat(old_start[keep], kept) + at]
    out[np.repeat(new_start[rows], sub_lengths) + token_positions(sub_lengths)] = sub_flat
    return out, new_lengths


def _exemplar_drops(
    tok: Tokenizer,
    texts: pl.Series,
    ends: pl.Series,
    have: np.ndarray,
    inputs_length: int,
    num_threads: int,
    by_words: bool,
) -> np.ndarray:
    """How many exemplars each of ``texts`` (all over ``inputs_length``) must lose from the front to fit: as
    few as make it fit, all of them if its own prompt alone is too long. The loop is over the exemplar count
    (formats.shots / the eval shots), not over rows; each round re-encodes only the rows still too long."""
    drop = np.zeros(len(texts), dtype=np.int64)
    fits = np.zeros(len(texts), dtype=bool)
    for j in range(1, int(have.max(initial=0)) + 1):
        pending = np.flatnonzero(~fits & (have >= j))
        if not len(pending):
            break
        drop[pending] = j
        trial = _after_exemplars(texts.gather(pending), ends.gather(pending), drop[pending])
        _, lengths = _encode_texts(tok, trial, num_threads, by_words, add_special=True)
        fits[pending] = lengths <= inputs_length
    return drop


def _drop_exemplars(
    tok: Tokenizer,
    inputs: pl.Series,
    ends: pl.Series,
    in_flat: np.ndarray,
    in_len: np.ndarray,
    inputs_length: int,
    num_threads: int,
    by_words: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Few-shot rows longer than ``inputs_length`` lose whole exemplars from the front (``_exemplar_drops``),
    so the question its target answers stays in the prompt; only those rows are re-encoded. Returns the new
    (flat ids, lengths) and the number of rows that lost exemplars."""
    n_exemplars = ends.list.len().to_numpy()
    over = np.flatnonzero((in_len > inputs_length) & (n_exemplars > 0))
    if not len(over):
        return in_flat, in_len, 0
    texts, row_ends = inputs.gather(over), ends.gather(over)
    drop = _exemplar_drops(tok, texts, row_ends, n_exemplars[over], inputs_length, num_threads, by_words)
    sub_flat, sub_len = _encode_texts(tok, _after_exemplars(texts, row_ends, drop), num_threads, by_words, True)
    flat, lengths = _splice(in_flat, in_len, over, sub_flat, sub_len)
    return flat, lengths, len(over)


def fit_exemplars(tok: Tokenizer, inputs: pl.Series, ends: pl.Series, inputs_length: int) -> tuple[pl.Series, int]:
    """Few-shot input texts that fit ``inputs_length`` tokens by losing exemplars from the front, the rule
    packing applies to training rows (``_drop_exemplars``), for callers that encode text themselves (evaluation,
    whose conventions encode input and option together). ``ends``: each row's exemplar end offsets
    (``flanpipe.data.formats.EXEMPLAR_ENDS``; empty for a zero-shot row). Returns the texts and how many rows
    lost exemplars."""
    _, lengths = _encode_texts(tok, inputs, 1, False, add_special=True)
    have = ends.list.len().to_numpy()
    over = np.flatnonzero((lengths > inputs_length) & (have > 0))
    if not len(over):
        return inputs, 0
    texts, row_ends = inputs.gather(over), ends.gather(over)
    drop = _exemplar_drops(tok, texts, row_ends, have[over], inputs_length, 1, False)
    return inputs.clone().scatter(over, _after_exemplars(texts, row_ends, drop)), len(over)


def _encode_chunk(
    tok: Tokenizer,
    inputs: pl.Series,
    targets: pl.Series,
    inputs_length: int,
    targets_length: int,
    num_threads: int,
    by_words: bool,
    exemplar_ends: pl.Series | None = None,
) -> EncodedExamples:
    in_flat, in_len = _encode_texts(tok, inputs, num_threads, by_words, add_special=True)
    trimmed = 0
    if exemplar_ends is not None:
        in_flat, in_len, trimmed = _drop_exemplars(
            tok, inputs, exemplar_ends, in_flat, in_len, inputs_length, num_threads, by_words
        )
    tg_flat, tg_len = _encode_texts(tok, targets, num_threads, by_words, add_special=False)
    in_pos, tg_pos = token_positions(in_len), token_positions(tg_len)
    keep_in = np.minimum(in_len, inputs_length)
    keep_tg = np.minimum(tg_len, targets_length - 1)
    # example i occupies keep_in[i] + keep_tg[i] + 1 (EOS) slots starting at offsets[i]
    offsets = np.zeros(len(in_len) + 1, dtype=np.int64)
    np.cumsum(keep_in + keep_tg + 1, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    # scatter: a kept input token at position p of example i goes to offsets[i] + p,
    # a kept target token to offsets[i] + keep_in[i] + p; EOS fills the last slot
    m = in_pos < np.repeat(keep_in, in_len)
    tokens[np.repeat(offsets[:-1], in_len)[m] + in_pos[m]] = in_flat[m]
    m = tg_pos < np.repeat(keep_tg, tg_len)
    tokens[np.repeat(offsets[:-1] + keep_in, tg_len)[m] + tg_pos[m]] = tg_flat[m]
    tokens[offsets[1:] - 1] = tok.eos_id
    return EncodedExamples(
        tokens=tokens,
        offsets=offsets,
        input_lengths=keep_in.astype(np.int32),
        truncated_inputs=int((in_len > inputs_length).sum()),
        truncated_targets=int((tg_len > targets_length - 1).sum()),
        inputs_length=inputs_length,
        targets_length=targets_length,
        trimmed_exemplars=trimmed,
    )


def concat_encoded(parts: Sequence[EncodedExamples]) -> EncodedExamples:
    """Join encoded batches (same length limits) into one, shifting offsets."""
    return _concat_consuming(list(parts))


def _concat_consuming(parts: list[EncodedExamples]) -> EncodedExamples:
    """``concat_encoded`` that empties ``parts`` as it copies, so each part can be freed once copied.

    The result is allocated with np.empty, whose pages are committed only when written: copying part
    by part and dropping each keeps the peak at result + one part instead of 2 x result
    (FLAN scale: 185M tokens x 4 B = 0.74 GB saved).
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    if any((p.inputs_length, p.targets_length) != (first.inputs_length, first.targets_length) for p in parts):
        raise ValueError("cannot concatenate examples encoded with different length limits")
    n_tokens, n_examples = sum(len(p.tokens) for p in parts), sum(len(p) for p in parts)
    tokens = np.empty(n_tokens, dtype=first.tokens.dtype)
    offsets = np.empty(n_examples + 1, dtype=np.int64)
    input_lengths = np.empty(n_examples, dtype=first.input_lengths.dtype)
    offsets[0] = 0
    t = e = truncated_inputs = truncated_targets = trimmed = 0
    parts.reverse()
    while parts:
        p = parts.pop()
        tokens[t : t + len(p.tokens)] = p.tokens
        offsets[e + 1 : e + 1 + len(p)] = p.offsets[1:] + t
        input_lengths[e : e + len(p)] = p.input_lengths
        truncated_inputs, truncated_targets = (
            truncated_inputs + p.truncated_inputs,
            truncated_targets + p.truncated_targets,
        )
        trimmed += p.trimmed_exemplars
        t, e = t + len(p.tokens), e + len(p)
        del p
    return EncodedExamples(
        tokens=tokens,
        offsets=offsets,
        input_lengths=input_lengths,
        truncated_inputs=truncated_inputs,
        truncated_targets=truncated_targets,
        inputs_length=first.inputs_length,
        targets_length=first.targets_length,
        trimmed_exemplars=trimmed,
    )


def encode_examples(
    tok: Tokenizer,
    inputs: Sequence[str] | pl.Series,
    targets: Sequence[str] | pl.Series,
    inputs_length: int,
    targets_length: int,
    num_threads: int | None = None,
    exemplar_ends: pl.Series | None = None,
) -> EncodedExamples:
    """Encode (input, target) pairs with the shared truncation + EOS rule, batched and multi-threaded.

    ``exemplar_ends`` (a few-shot formats shard's ``flanpipe.data.formats.EXEMPLAR_ENDS``): a row too long for
    ``inputs_length`` first loses exemplars from the front (``_drop_exemplars``), then is cut like any other."""
    if inputs_length < 0 or targets_length < 1:
        raise ValueError(
            f"need inputs_length >= 0 and targets_length >= 1 (room for EOS), got {inputs_length} and {targets_length}"
        )
    # a Series is sliced per chunk (zero-copy): converting it all to Python strings up front would
    # cost ~1.1 GB of str objects for a FLAN mixture, on top of the text itself
    inputs = inputs if isinstance(inputs, pl.Series) else pl.Series(list(inputs), dtype=pl.Utf8)
    targets = targets if isinstance(targets, pl.Series) else pl.Series(list(targets), dtype=pl.Utf8)
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    threads = num_threads or os.cpu_count() or 1
    tok = as_tokenizer(tok)
    by_words = isinstance(tok, SPTokenizer) and tok.splits_at_spaces
    parts = [
        _encode_chunk(
            tok,
            inputs.slice(s, _ENCODE_CHUNK),
            targets.slice(s, _ENCODE_CHUNK),
            inputs_length,
            targets_length,
            threads,
            by_words,
            None if exemplar_ends is None else exemplar_ends.slice(s, _ENCODE_CHUNK),
        )
        for s in range(0, max(len(inputs), 1), _ENCODE_CHUNK)
    ]
    return parts[0] if len(parts) == 1 else _concat_consuming(parts)


def encode_parquet(
    tok: Tokenizer,
    path: str | os.PathLike[str],
    inputs_length: int,
    targets_length: int,
    num_threads: int | None = None,
) -> EncodedExamples:
    """``encode_examples`` over a mixture file read in batches, so its text is never all in memory:
    only the int32 tokens (4 bytes a token) accumulate, one batch of text at a time beside them."""
    import pyarrow.parquet as pq

    from flanpipe.data.formats import EXEMPLAR_ENDS

    pf = pq.ParquetFile(path)
    columns = ["inputs", "targets", *([EXEMPLAR_ENDS] if EXEMPLAR_ENDS in pf.schema_arrow.names else [])]
    parts = [
        encode_examples(
            tok,
            batch["inputs"],
            batch["targets"],
            inputs_length,
            targets_length,
            num_threads,
            batch[EXEMPLAR_ENDS] if EXEMPLAR_ENDS in columns else None,
        )
        for batch in (pl.from_arrow(b) for b in pf.iter_batches(batch_size=_ENCODE_CHUNK, columns=columns))
    ]
    if not parts:
        return encode_examples(tok, [], [], inputs_length, targets_length, num_threads)
    return parts[0] if len(parts) == 1 else _concat_consuming(parts)
