"""open_tokenizer: a checkpoint's SentencePiece or tokenizer.json tokenizer through tokenize -> pack -> evaluate.

Ids are checked against ``transformers.AutoTokenizer`` on the same directory, EOS/pad against the
checkpoint's tokenizer config, and the packed rows and evaluation against those ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_evaluate import brute_greedy, brute_option_logprob, make_lm, make_shard, sentiment_rows
from test_hf_tokenizer import _bpe_dir, _sp_dir
from test_packing import _read

from flanpipe.data.packing import pack_to_indexed_dataset
from flanpipe.data.tokenize import check_vocab, encode_examples, open_tokenizer, piece_count
from flanpipe.eval.evaluate import evaluate_shard, predict_shard, truncate_input

transformers = pytest.importorskip("transformers")

N_IN, N_TG, PACK = 48, 12, 64


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizer.json"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    return _sp_dir(root / "sp") if request.param == "sentencepiece" else _bpe_dir(root / "bpe", pad=True)


@pytest.fixture(scope="module")
def rendered() -> pl.DataFrame:
    """Rendered eval rows (inputs, targets, options) of a classification and a generative task."""
    return pl.concat([make_shard(sentiment_rows(3, 2, ["good", "bad"])), make_shard(sentiment_rows(2, 1, None))])


def test_ids_eos_pad_match_transformers_through_pack(checkpoint: Path, rendered: pl.DataFrame, tmp_path: Path):
    tok, hf = open_tokenizer(checkpoint), transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert tok.eos_id == hf.eos_token_id
    assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    inputs, targets = rendered["inputs"].to_list(), rendered["targets"].to_list()
    enc = encode_examples(tok, inputs, targets, N_IN, N_TG, num_threads=2)
    for i, (text, target) in enumerate(zip(inputs, targets, strict=True)):
        inp, tgt = enc.example(i)
        # the input as transformers encodes a prompt (Llama: BOS first); the target bare, then EOS
        assert inp.tolist() == hf(text)["input_ids"][:N_IN]
        assert tgt.tolist() == hf(target, add_special_tokens=False)["input_ids"][: N_TG - 1] + [hf.eos_token_id]

    # texts where SentencePiece and transformers' reading of it could part: spaces, newlines, bytes
    odd = [" leading space", "two  spaces", "tab\tand\nnewline ", "é ü 中文 !", "", " "]
    assert tok.encode_batch(odd) == [hf(t)["input_ids"] for t in odd]
    assert tok.encode_batch(odd, add_special=False) == [hf(t, add_special_tokens=False)["input_ids"] for t in odd]

    stats = pack_to_indexed_dataset(enc, PACK, tmp_path / "packed", pad_id=tok.pad_id)
    rows = _read(tmp_path / "packed")
    assert stats["examples"] == len(inputs)
    seg = rows["segments"]
    assert (rows["tokens"][seg == 0] == tok.pad_id).all() and (seg == 0).any()
    # the last token of every packed segment is the checkpoint's EOS
    last = np.zeros_like(seg, dtype=bool)
    last[:, :-1] = (seg[:, :-1] != 0) & (seg[:, :-1] != seg[:, 1:])
    last[:, -1] = seg[:, -1] != 0
    assert int(last.sum()) == len(inputs) and (rows["tokens"][last] == tok.eos_id).all()
    # BOS (when the checkpoint adds one) starts every example in a row, not only the row
    if tok.add_bos:
        first = np.zeros_like(last)
        first[:, 0] = seg[:, 0] != 0
        first[:, 1:] = (seg[:, 1:] != 0) & (seg[:, 1:] != seg[:, :-1])
        assert (rows["tokens"][first] == tok.bos_id).all()


def test_evaluate_end_to_end_with_checkpoint_ids(checkpoint: Path, rendered: pl.DataFrame):
    tok, hf = open_tokenizer(checkpoint), transformers.AutoTokenizer.from_pretrained(checkpoint)
    lm = make_lm(tok.vocab_size, seed=3)
    cls = rendered.filter(pl.col("options").list.len() > 0)
    gen = rendered.filter(pl.col("options").list.len() == 0)
    # option scoring: transformers' prompt ids (the start kept), each option's bare ids, whole, + the checkpoint's EOS
    eos = hf.eos_token_id
    want_cls = []
    for text, options in cls.filter(~pl.col("turned_around")).select("inputs", "options").iter_rows():
        inp = truncate_input(hf(text)["input_ids"], N_IN)
        opts = [hf(o, add_special_tokens=False)["input_ids"] + [eos] for o in options]
        want_cls.append(options[int(np.argmax([brute_option_logprob(lm, inp, o) for o in opts]))])
    assert predict_shard(lm, tok, cls, N_IN, N_TG, 4)["prediction"].to_list() == want_cls
    result = evaluate_shard(lm, tok, cls, "accuracy", N_IN, N_TG, batch_size=4)
    assert result["dataset"] == cls["dataset"][0]
    got = predict_shard(lm, tok, gen, N_IN, N_TG, 4)
    live = got.filter(~pl.col("turned_around"))
    # greedy generation from transformers' prompt ids, stopping at the checkpoint's EOS (an untrained
    # model emits stray byte pieces, which the two libraries decode differently: compare on our decode)
    want = [
        tok.decode(brute_greedy(lm, truncate_input(hf(t)["input_ids"], N_IN), N_TG, hf.eos_token_id))
        for t in live["inputs"].to_list()
    ]
    assert live["prediction"].to_list() == want
    # and on real text our decode is transformers'
    for t in live["targets"].to_list():
        assert tok.decode(tok.encode(t)) == hf.decode(hf(t)["input_ids"], skip_special_tokens=True)
    assert evaluate_shard(lm, tok, gen, "rouge", N_IN, N_TG, batch_size=4)["dataset"] == gen["dataset"][0]


def test_tokenizer_larger_than_embedding_is_named(checkpoint: Path):
    tok = open_tokenizer(checkpoint)
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} pieces but .*vocab_size is 8\b"):
        check_vocab(tok, 8, path=checkpoint)
    assert str(checkpoint) in _message(lambda: check_vocab(tok, 8, path=checkpoint))
    # the plan-time check (config key tokenizer.model) reads a checkpoint directory's size too
    assert piece_count(checkpoint) == tok.vocab_size


def _message(fn) -> str:  # noqa: ANN001
    try:
        fn()
    except ValueError as e:
        return str(e)
    raise AssertionError("no error")


def test_import_hf_output_dir_opens(checkpoint: Path, tmp_path: Path):
    """``flanpipe import-hf``'s output keeps the tokenizer side files in ``hf/``: the output dir itself opens."""
    import shutil

    shutil.copytree(checkpoint, tmp_path / "imported" / "hf")
    tok, direct = open_tokenizer(tmp_path / "imported"), open_tokenizer(checkpoint)
    assert tok.source == tmp_path / "imported" / "hf" / direct.source.name
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (direct.vocab_size, direct.eos_id, direct.pad_id)
    assert tok.encode("the lazy fox") == direct.encode("the lazy fox")


def test_bad_paths_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        open_tokenizer(tmp_path / "nope.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.json or tokenizer.model"):
        open_tokenizer(tmp_path / "empty")
    (tmp_path / "junk.model").write_bytes(b"not a proto")
    with pytest.raises(ValueError, match="junk.model is not a SentencePiece"):
        open_tokenizer(tmp_path / "junk.model")


def test_plan_checks_a_checkpoint_tokenizer_dir_against_the_model(checkpoint: Path, tmp_path: Path):
    from test_bad_inputs import PlanError, model_file, plan, registry_dir

    n = open_tokenizer(checkpoint).vocab_size
    registry_dir(tmp_path)
    small = model_file(tmp_path, vocab_size=n - 1)
    with pytest.raises(
        PlanError, match=rf"tokenizer {checkpoint} \(tokenizer.model\) has {n} pieces.*\({n} > {n - 1}\)"
    ):
        plan(tmp_path, model=str(small), tokenizer={"model": str(checkpoint)})
    assert plan(tmp_path, tokenizer={"model": str(checkpoint)}).runs  # the tiny model's 1024 ids fit it


def test_flanpipe_model_keeps_its_ids(tmp_path: Path):
    """flanpipe's own .model: EOS 1, pad 0, no BOS, and the per-word fast path, so its packed data is unchanged."""
    from flanpipe.data.tokenize import SPTokenizer, train_tokenizer

    texts = [f"w{i} x{i % 7}\ny{i % 13}" for i in range(200)]
    pl.DataFrame({"inputs": texts, "targets": texts[::-1]}).write_parquet(tmp_path / "s.parquet")
    tok = open_tokenizer(train_tokenizer([tmp_path / "s.parquet"], tmp_path / "spm.model", 300, 1_000, seed=0))
    assert isinstance(tok, SPTokenizer) and tok.splits_at_spaces
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos) == (1, 0, None, False)
    enc = encode_examples(tok, texts, texts[::-1], 8, 4)
    for i, (a, b) in enumerate(zip(texts, texts[::-1], strict=True)):
        inp, tgt = enc.example(i)
        assert inp.tolist() == tok.sp.encode(a)[:8] and tgt.tolist() == tok.sp.encode(b)[:3] + [1]
