"""Tokenizer training determinism, newline handling, and the truncation + EOS encoding rule."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flanpipe.data import tokenize as tok

WORDS = ["Premise:", "Hypothesis:", "the", "movie", "was", "great", "bad", "Question?", "answer", "yes", "no"]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.5:  # FLAN-style options block: newlines must survive
        words.append("\nOPTIONS:\n- yes\n- no")
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    n = 2_000
    df = pl.DataFrame(
        {
            "inputs": [_text(rng, 1, 40) for _ in range(n)],
            "targets": [_text(rng, 0, 4) for _ in range(n)],
        }
    )
    path = tmp_path_factory.mktemp("corpus") / "mixture.parquet"
    df.write_parquet(path)
    return path


@pytest.fixture(scope="module")
def model_path(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "spm.model"
    return tok.train_tokenizer([corpus], out, vocab_size=320, sample_size=1_000, seed=1)


@pytest.fixture(scope="module")
def sp(model_path: Path):
    return tok.open_tokenizer(model_path).sp


def test_train_is_deterministic_across_threads_and_row_order(corpus: Path, model_path: Path, tmp_path: Path):
    # same sample + seed -> byte-identical .model, whatever the thread count or the parquet row order
    shuffled = tmp_path / "shuffled.parquet"
    pl.read_parquet(corpus).sample(fraction=1.0, shuffle=True, seed=3).write_parquet(shuffled)
    a = tok.train_tokenizer([corpus], tmp_path / "a.model", 320, 1_000, seed=1, num_threads=1)
    b = tok.train_tokenizer([shuffled], tmp_path / "b.model", 320, 1_000, seed=1, num_threads=2)
    assert a.read_bytes() == b.read_bytes() == model_path.read_bytes()
    assert (tmp_path / "a.vocab").read_text(encoding="utf-8") == (tmp_path / "b.vocab").read_text(encoding="utf-8")
    # nothing but the two outputs (and the inputs) is left behind: temp files were renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.model",
        "a.vocab",
        "b.model",
        "b.vocab",
        "shuffled.parquet",
    ]


def test_sample_depends_on_seed_and_size(corpus: Path):
    s1 = tok._sample_sentences([corpus], 200, seed=1)
    assert s1 == tok._sample_sentences([corpus], 200, seed=1)
    assert s1 != tok._sample_sentences([corpus], 200, seed=2)
    assert 200 <= len(s1) <= 400  # inputs + non-empty targets of 200 examples


def test_special_ids_and_vocab(sp, model_path: Path):
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() <= 320
    # SentencePiece's own .vocab format: "piece<TAB>score" per id, pieces raw (the "\n" piece spans a line)
    vocab = model_path.with_suffix(".vocab").read_text(encoding="utf-8")
    assert vocab.count("\t") == sp.get_piece_size() and vocab.startswith("<pad>\t0\n</s>\t0\n<unk>\t0\n")


@pytest.mark.parametrize(
    "text",
    ["OPTIONS:\n- a\n- b", "Premise: x\n\nHypothesis:  two  spaces\tand a tab ", "unseen → 中文 é", ""],
)
def test_round_trip_keeps_newlines_and_whitespace(sp, text: str):
    assert sp.decode(sp.encode(text)) == text


def test_newline_is_a_piece(sp):
    # trained on templates with "\n", the newline gets its own piece instead of a byte-fallback <0x0A>
    assert "\n" in sp.encode("OPTIONS:\n- a", out_type=str)


def test_check_vocab(sp):
    tok.check_vocab(sp, sp.get_piece_size())
    with pytest.raises(ValueError, match=rf"spm.model has {sp.get_piece_size()} pieces.*vocab_size is 100"):
        tok.check_vocab(sp, 100, path="results/tokenizer/spm.model")


def test_load_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tok.open_tokenizer(tmp_path / "nope.model")


def _reference(sp, inputs: list[str], targets: list[str], n_in: int, n_tg: int) -> list[tuple[list, list]]:
    """The ARCH.md rule written the obvious way, one example at a time."""
    return [(sp.encode(i)[:n_in], sp.encode(t)[: n_tg - 1] + [1]) for i, t in zip(inputs, targets, strict=True)]


@pytest.mark.parametrize("n_in,n_tg", [(8, 3), (1, 1), (0, 2), (1000, 1000)])
def test_encode_matches_reference(sp, n_in: int, n_tg: int):
    rng = random.Random(n_in + n_tg)
    inputs = [_text(rng, 0, 20) for _ in range(300)] + [""]
    targets = [_text(rng, 0, 4) for _ in range(300)] + [""]
    enc = tok.encode_examples(sp, pl.Series(inputs), targets, n_in, n_tg, num_threads=2)
    ref = _reference(sp, inputs, targets, n_in, n_tg)
    assert len(enc) == len(ref) and enc.tokens.dtype == np.int32 and enc.offsets.dtype == np.int64
    assert enc.offsets[0] == 0 and enc.offsets[-1] == len(enc.tokens)
    for i, (ri, rt) in enumerate(ref):
        got_in, got_tg = enc.example(i)
        assert got_in.tolist() == ri and got_tg.tolist() == rt
    assert np.all(enc.input_lengths <= n_in) and np.all(enc.target_lengths <= n_tg)
    assert np.all(enc.target_lengths >= 1)  # EOS always present
    assert enc.truncated_inputs == sum(len(sp.encode(i)) > n_in for i in inputs)
    assert enc.truncated_targets == sum(len(sp.encode(t)) > n_tg - 1 for t in targets)


def test_encode_in_chunks_equals_one_batch(sp, monkeypatch: pytest.MonkeyPatch):
    rng = random.Random(5)
    inputs, targets = [_text(rng, 0, 30) for _ in range(101)], [_text(rng, 0, 6) for _ in range(101)]
    whole = tok.encode_examples(sp, inputs, targets, 16, 4)
    monkeypatch.setattr(tok, "_ENCODE_CHUNK", 7)
    chunked = tok.encode_examples(sp, inputs, targets, 16, 4)
    for field in ("tokens", "offsets", "input_lengths"):
        assert np.array_equal(getattr(whole, field), getattr(chunked, field))
    assert (whole.truncated_inputs, whole.truncated_targets) == (chunked.truncated_inputs, chunked.truncated_targets)


def test_encode_parquet_in_batches_equals_one_batch(sp, corpus: Path, monkeypatch: pytest.MonkeyPatch):
    """The pack rule reads its mixture in batches (text never all in memory): same arrays as one batch."""
    df = pl.read_parquet(corpus)
    whole = tok.encode_examples(sp, df["inputs"], df["targets"], 24, 6)
    monkeypatch.setattr(tok, "_ENCODE_CHUNK", 333)  # 2000 rows -> 7 batches, the last one short
    batched = tok.encode_parquet(sp, corpus, 24, 6)
    for field in ("tokens", "offsets", "input_lengths"):
        assert np.array_equal(getattr(whole, field), getattr(batched, field))
    assert (whole.truncated_inputs, whole.truncated_targets) == (batched.truncated_inputs, batched.truncated_targets)


def test_encode_validates(sp):
    with pytest.raises(ValueError, match="room for EOS"):
        tok.encode_examples(sp, ["a"], ["b"], 4, 0)
    with pytest.raises(ValueError, match="2 inputs but 1 targets"):
        tok.encode_examples(sp, ["a", "b"], ["c"], 4, 2)
    assert len(tok.encode_examples(sp, [], [], 4, 2)) == 0
