"""The word-level encoding path of flanpipe.data.tokenize gives exactly sp.encode's ids, and the bounded-memory
sampling and concatenation give exactly what the straightforward versions give."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sentencepiece as spm

from flanpipe.data import tokenize as tok

# whitespace of every kind, SentencePiece's own '▁', multi-byte and control characters
PIECES = [
    "ab",
    "c",
    "de",
    "f",
    " ",
    " ",
    "  ",
    "\n",
    "\t",
    "\u2581",
    "\u3000",
    "\u00a0",
    "é",
    "日本",
    "🙂",
    "\r",
    "\x00",
]
EDGE = ["", " ", "  ", "x", " x", "x ", "a  b", "\n", " \n ", "\u2581", "a\u2581b", "\u2581\u2581x", "\t x"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25))) for _ in range(n)] + EDGE


def _reference(sp: spm.SentencePieceProcessor, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = sp.encode(texts, out_type=int)
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32), np.array([len(x) for x in ids], np.int64)


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    path = tmp_path_factory.mktemp("tok") / "corpus.parquet"
    texts = _texts(3_000, 0)
    pl.DataFrame({"inputs": texts, "targets": texts[::-1]}).write_parquet(path)
    return tok.open_tokenizer(tok.train_tokenizer([path], path.with_name("spm.model"), 400, 3_000, seed=0)).sp


def test_flanpipe_models_split_at_spaces(sp: spm.SentencePieceProcessor) -> None:
    assert tok.splits_at_spaces(sp)


def test_word_path_equals_sentencepiece(sp: spm.SentencePieceProcessor) -> None:
    texts = _texts(5_000, 1)
    flat, lengths = tok._encode_texts(tok.as_tokenizer(sp), pl.Series(texts), 2, by_words=True, add_special=True)
    ref_flat, ref_lengths = _reference(sp, texts)
    assert np.array_equal(lengths, ref_lengths) and np.array_equal(flat, ref_flat)


def test_other_normalization_falls_back_to_sentencepiece() -> None:
    buf = io.BytesIO()
    texts = _texts(2_000, 2)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type="bpe",
        vocab_size=300,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )  # defaults: nmt_nfkc, remove_extra_whitespaces
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert not tok.splits_at_spaces(sp)
    enc = tok.encode_examples(sp, texts, texts, 40, 8)
    ref = sp.encode(texts, out_type=int)
    assert all(enc.example(i)[0].tolist() == ref[i][:40] for i in range(len(texts)))


def test_concat_leaves_callers_list_and_matches_numpy(sp: spm.SentencePieceProcessor) -> None:
    texts = _texts(50, 3)
    parts = [tok.encode_examples(sp, texts[i : i + 10], texts[i : i + 10], 8, 4) for i in range(0, 60, 10)]
    whole = tok.concat_encoded(parts)
    assert len(parts) == 6
    assert np.array_equal(whole.tokens, np.concatenate([p.tokens for p in parts]))
    assert np.array_equal(whole.input_lengths, np.concatenate([p.input_lengths for p in parts]))
    assert np.array_equal(whole.lengths, np.concatenate([p.lengths for p in parts]))
    assert whole.truncated_inputs == sum(p.truncated_inputs for p in parts)


def test_sample_over_files_equals_sample_over_one_file(tmp_path: Path) -> None:
    texts = _texts(2_000, 4)
    df = pl.DataFrame({"inputs": texts, "targets": texts[::-1]})
    one = tmp_path / "one.parquet"
    df.write_parquet(one)
    files = []
    for i in range(4):  # uneven files, one smaller than the sample
        files.append(tmp_path / f"part{i}.parquet")
        df.slice(i * 600, 600 if i < 3 else 50).write_parquet(files[-1])
    pl.concat([pl.read_parquet(f) for f in files]).write_parquet(tmp_path / "joined.parquet")
    for k in (1, 100, 10_000):
        assert tok._sample_sentences(files, k, seed=7) == tok._sample_sentences(
            [tmp_path / "joined.parquet"], k, seed=7
        )
        assert tok._sample_sentences(files[::-1], k, seed=7) == tok._sample_sentences(files, k, seed=7)
