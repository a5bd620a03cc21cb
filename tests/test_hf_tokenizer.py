"""flanpipe.data.hf_tokenizer: a checkpoint's own tokenizer, ids equal to transformers' for the same text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from flanpipe.data.hf_tokenizer import load_hf_tokenizer

transformers = pytest.importorskip("transformers")  # in the dev extra: CI runs these

CORPUS = [f"the quick brown fox jumps over the lazy dog {i} times, then sleeps." for i in range(200)]
TEXTS = ["the quick fox sleeps", "lazy dogs jump 42 times!", ""]


def _bpe_dir(out: Path, *, pad: bool) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )
    fast.save_pretrained(out)
    return out


@pytest.mark.parametrize("pad", [True, False])
def test_tokenizer_json_ids_equal_transformers(tmp_path, pad):
    d = _bpe_dir(tmp_path / "tok", pad=pad)
    ours, theirs = load_hf_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)
    assert ours.encode_batch(TEXTS) == [theirs(t)["input_ids"] for t in TEXTS]
    assert ours.eos_id == theirs.eos_token_id == 2
    assert ours.pad_id == (3 if pad else 2)  # no pad token: pad with EOS (padded positions carry no loss)
    assert ours.vocab_size == len(theirs)


def _sp_dir(out: Path) -> Path:
    """A Llama-style checkpoint tokenizer: SentencePiece tokenizer.model (BOS 1, EOS 2, no pad; byte
    fallback, identity normalization, spaces kept, as Llama's) + tokenizer_config.json."""
    out.mkdir(parents=True)
    (out / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    )  # fmt: skip
    (out / "corpus.txt").unlink()
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "add_bos_token": True, "add_eos_token": False, "legacy": True}
        )
    )  # fmt: skip
    return out


def test_sentencepiece_model_adds_bos_like_llama(tmp_path):
    d = _sp_dir(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    ours = load_hf_tokenizer(d)
    assert (
        ours.kind == "sentencepiece"
        and ours.eos_id == 2
        and ours.pad_id == 2
        and ours.vocab_size == sp.get_piece_size()
    )
    for text in TEXTS:
        assert ours.encode(text) == [1, *sp.encode(text)]
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.decode(ours.encode("the quick fox")) == "the quick fox"


def test_eos_falls_back_to_generation_config(tmp_path):
    d = _bpe_dir(tmp_path / "tok", pad=False)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert load_hf_tokenizer(d).eos_id == 1


def test_no_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_hf_tokenizer(tmp_path)
