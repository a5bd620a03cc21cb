"""Rank classification as a reviewer lines it up with lm-evaluation-harness: both conventions and every rule against
log-probs computed by hand, options scored whole (a planted case that used to tie), the per-example record read
back, refused option lists, and the length checks that run before a model loads.

The hand cases use a one-character-per-token tokenizer and a scorer whose next-token distribution is the same at
every position, with probabilities that are powers of two, so every log-prob is a whole number of bits (-log2 p):
    'a' 1 bit (p = 1/2), 'b' 2 bits (1/4), ' ' 3 bits (1/8), EOS 4 bits (1/16), 'c' 4 bits (1/16), others p = 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from test_evaluate import make_shard

from flanpipe.core.io import write_json
from flanpipe.eval.evaluate import (
    RECORD_SCHEMA,
    RankConfig,
    evaluate_many,
    evaluate_shard,
    predict_shard,
    run_evaluation,
)

LN2 = math.log(2)
CHARS = "\0\1" + " abcdefghijklmnopqrstuvwxyz:?.,"  # id 0 pad, id 1 EOS, then one id per character
BITS = {" ": 3, "a": 1, "b": 2, "c": 4}  # -log2 p of the characters the distribution gives mass to
EOS_BITS = 4


class CharTokenizer:
    """One token per character (flanpipe's Tokenizer protocol): no BOS, EOS = 1, pad = 0."""

    vocab_size, eos_id, pad_id, bos_id, add_bos, source = len(CHARS), 1, 0, None, False, Path("<chars>")

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(c) for c in text]

    def encode_batch(self, texts: list[str], add_special: bool = True, num_threads: int | None = None) -> list:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i] for i in ids)

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        return [self.decode(r) for r in rows]


class PowersOfTwo:
    """The same next-token distribution at every position: logits = log p, so log_softmax = log p exactly."""

    def __init__(self, max_positions: int | None = None) -> None:
        p = torch.zeros(len(CHARS), dtype=torch.float64)
        for c, bits in BITS.items():
            p[CHARS.index(c)] = 2.0**-bits
        p[1] = 2.0**-EOS_BITS
        assert p.sum() == 1.0
        self.logp = p.log()
        if max_positions is not None:
            self.max_positions = max_positions

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logp.expand(*tokens.shape, -1)


def rows(options: list[str], target: str, inputs: str = "q: which?", example_id: int = 0) -> list[dict]:
    """One test row of dataset 'toy' under template 0."""
    return [
        {"dataset": "toy", "cluster": "c", "split": "test", "example_id": example_id, "template_id": 0,
         "turned_around": False, "inputs": inputs, "targets": target, "options": options}
    ]  # fmt: skip


def bits(text: str) -> int:
    return sum(BITS[c] for c in text)


@pytest.mark.parametrize("convention", ["flan", "lm_eval"])
def test_conventions_and_rules_against_hand_computed_logprobs(convention: str) -> None:
    """Options "aab" (3 chars), "a" (1), "bbbb" (4); own = the option's scored tokens other than EOS.

    flan (input, option, EOS): own bits 4, 1, 8; EOS 4 each -> total 8, 5, 12; scored tokens 4, 2, 5.
      sum -8 / -5 / -12 -> "a"; acc_norm -4/3, -1/1, -8/4 -> "a"; per_char_eos -8/3, -5/1, -12/4 -> "aab";
      per_token -8/4, -5/2, -12/5 -> "aab".
    lm_eval (input, " " + option, no EOS): own = total bits 3 + 4, 3 + 1, 3 + 8 = 7, 4, 11; tokens 4, 2, 5.
      sum -7, -4, -11 -> "a"; acc_norm = per_char_eos -7/3, -4/1, -11/4 -> "aab"; per_token -7/4, -4/2, -11/5
      -> "aab".
    """
    options = ["aab", "a", "bbbb"]
    got = predict_shard(PowersOfTwo(), CharTokenizer(), make_shard(rows(options, "a")), 32, 4, 2,
                        RankConfig(convention=convention)).row(0, named=True)  # fmt: skip
    delim = 3 if convention == "lm_eval" else 0
    own = [delim + bits(o) for o in options]
    eos = [EOS_BITS] * 3 if convention == "flan" else [0] * 3
    assert got["logprob"] == pytest.approx([-(a + b) * LN2 for a, b in zip(own, eos, strict=True)], abs=1e-12)
    assert got["eos_logprob"] == (pytest.approx([-EOS_BITS * LN2] * 3, abs=1e-12) if convention == "flan" else None)
    assert got["n_tokens"] == [4, 2, 5]  # flan: text + EOS; lm_eval: delimiter + text
    want = {
        "flan": {"sum": 1, "acc_norm": 1, "per_char_eos": 0, "per_token": 0},
        "lm_eval": {"sum": 1, "acc_norm": 0, "per_char_eos": 0, "per_token": 0},
    }[convention]
    assert {k: got[f"chosen_{k}"] for k in want} == want
    assert got["chosen"] == want["sum"] and got["prediction"] == "a" and got["gold"] == 1
    assert not got["tied"] and got["options_cut"] == 0 and not got["input_cut"]


def test_lm_eval_convention_moves_the_inputs_trailing_whitespace_to_the_option() -> None:
    """lm-evaluation-harness's _encode_pair: input "q: " + " " + "ab" scores "  ab" (3 + 3 + 1 + 2 = 9 bits)
    after the input "q:"; the flan convention scores "ab" + EOS (1 + 2 + 4 = 7 bits) after "q: "."""
    shard = make_shard(rows(["ab", "c"], "ab", inputs="q: "))
    lm_eval = predict_shard(PowersOfTwo(), CharTokenizer(), shard, 32, 4, 2, RankConfig(convention="lm_eval"))
    flan = predict_shard(PowersOfTwo(), CharTokenizer(), shard, 32, 4, 2)
    assert lm_eval["logprob"][0].to_list() == pytest.approx([-9 * LN2, -10 * LN2], abs=1e-12)
    assert lm_eval["n_tokens"][0].to_list() == [4, 3]
    assert flan["logprob"][0].to_list() == pytest.approx([-7 * LN2, -8 * LN2], abs=1e-12)


def test_long_options_are_scored_whole_where_a_cut_used_to_tie(capsys: pytest.CaptureFixture[str]) -> None:
    """Planted: two options equal for 5 characters, differing in the 6th ('c' 4 bits vs 'b' 2 bits), the model's
    favourite listed second and gold. Cut to lengths.targets - 1 = 3 tokens + EOS (the old rule) both score
    "aaa" + EOS: a tie the first option wins, scored wrong whatever the model says. Whole, the second wins."""
    shard = make_shard(rows(["aaaaac", "aaaaab"], "aaaaab"))
    whole = evaluate_shard(PowersOfTwo(), CharTokenizer(), shard, "accuracy", 32, 4)
    assert whole["mean"] == 100.0 and whole["ties"]["sum"] == 0 and whole["options_cut"] == 0
    assert whole["convention"] == "flan" and whole["option_tokens"] is None

    capped = evaluate_shard(PowersOfTwo(), CharTokenizer(), shard, "accuracy", 32, 4, rank=RankConfig(option_tokens=4))
    assert capped["mean"] == 0.0  # the tie's first option: the cut, counted and logged, explains it
    assert capped["ties"]["sum"] == 1 and capped["options_cut"] == 2 and capped["option_tokens"] == 4
    assert "2 option(s) in 1 row(s) were longer than eval.option_tokens = 4" in capsys.readouterr().err

    # with no cap, an option that cannot fit beside its input is an error naming dataset, example and option
    too_long = r"dataset 'toy', test example_id 0 \(template 0\): option 'aaaaac' is 7 scored tokens; beside its "
    with pytest.raises(ValueError, match=too_long + r"9-token input that is 16 > the model's 12 positions"):
        evaluate_shard(PowersOfTwo(max_positions=12), CharTokenizer(), shard, "accuracy", 32, 4)


def test_duplicate_or_single_option_lists_are_refused_or_dropped() -> None:
    shard = rows(["a", "b"], "a") + rows(["a", "a", "b"], "a", example_id=7) + rows(["b"], "b", example_id=8)
    shard = make_shard(shard)
    with pytest.raises(ValueError, match=r"example_id 7 \(template 0\): option list \['a', 'a', 'b'\] has a duplicate"):
        evaluate_shard(PowersOfTwo(), CharTokenizer(), shard.head(2), "accuracy", 32, 4)
    with pytest.raises(ValueError, match=r"example_id 8 .* has a single option.*bad_option_lists: drop"):
        evaluate_shard(PowersOfTwo(), CharTokenizer(), shard, "accuracy", 32, 4)
    dropped = evaluate_shard(PowersOfTwo(), CharTokenizer(), shard, "accuracy", 32, 4,
                             rank=RankConfig(bad_option_lists="drop"))  # fmt: skip
    assert dropped["dropped_option_lists"] == {"single": 1, "duplicate": 1}
    assert dropped["per_example"]["example_id"] == [0]


def test_record_read_back(tmp_path: Path) -> None:
    """evaluate_many writes each dataset's record beside its JSON; read back, it holds every pick and log-prob."""
    shards = {"toy": tmp_path / "toy.parquet"}
    shard = make_shard(rows(["aab", "a", "bbbb"], "aab") + rows(["c", "ab"], "c", example_id=1))
    shard.with_columns(references=pl.concat_list("targets")).write_parquet(shards["toy"])  # as rendered eval shards
    result = evaluate_many(Path("m"), CharTokenizer(), shards, {"toy": "accuracy"}, tmp_path / "out",
                           lengths={"inputs": 32, "targets": 4}, scorer=PowersOfTwo(),
                           rank=RankConfig(scoring="acc_norm"))  # fmt: skip
    record = pl.read_parquet(tmp_path / "out" / "toy.predictions.parquet")
    assert dict(record.schema) == {**RECORD_SCHEMA, "references": pl.List(pl.Utf8)}
    assert record["references"].to_list() == [["aab"], ["c"]]
    assert json.loads((tmp_path / "out" / "toy.json").read_text())["predictions"] == "toy.predictions.parquet"
    assert result["toy"]["ties"] == {"sum": 0, "acc_norm": 0, "per_char_eos": 0, "per_token": 0}
    first, second = record.rows(named=True)
    assert first["options"] == ["aab", "a", "bbbb"] and first["gold"] == 0
    assert first["logprob"] == pytest.approx([-8 * LN2, -5 * LN2, -12 * LN2], abs=1e-12)  # see the first test
    assert (first["chosen"], first["chosen_acc_norm"], first["chosen_sum"]) == (1, 1, 1)  # headline: acc_norm
    assert first["prediction"] == "a"
    # "c": 4 + EOS 4 = 8 bits over 1 char; "ab": 1 + 2 + 4 = 7 bits, own 3 bits over 2 chars
    assert second["logprob"] == pytest.approx([-8 * LN2, -7 * LN2], abs=1e-12)
    assert (second["chosen_sum"], second["chosen_acc_norm"], second["gold"]) == (1, 1, 0)
    assert result["toy"]["mean"] == 0.0


def test_lengths_are_checked_against_the_model_before_it_loads(tmp_path: Path) -> None:
    """`flanpipe evaluate` (run_evaluation) checks as the DAG does: lengths.inputs + lengths.targets, and each
    option beside its input, against model.json's max_position_embeddings, before any weights are read (the
    model directory here has none)."""
    from flanpipe.core.model_config import ModelConfig

    model = tmp_path / "model"
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1, ffn_hidden_size=8, vocab_size=64,
                      max_position_embeddings=16)  # fmt: skip
    write_json(model / "model.json", cfg.to_dict())
    shard = tmp_path / "toy.parquet"
    make_shard(rows(["aaaaaaaaaa", "b"], "b")).write_parquet(shard)
    tok = tmp_path / "tok.model"
    tok.write_text("")
    out = tmp_path / "out.json"
    too_long = r"lengths.inputs \+ lengths.targets = 12 \+ 8 = 20 tokens are longer than max_position_embeddings = 16"
    with pytest.raises(ValueError, match=too_long):
        run_evaluation(model, tok, shard, out, metric="accuracy", lengths={"inputs": 12, "targets": 8})
    with pytest.raises(ValueError, match="option 'aaaaaaaaaa' is 11 scored tokens; beside its 9-token input"):
        run_evaluation(model, CharTokenizer(), shard, out, metric="accuracy", lengths={"inputs": 12, "targets": 4})


def test_schema_spells_the_rules_and_its_defaults_are_rank_configs() -> None:
    """config eval.scoring / convention / bad_option_lists list exactly the code's names (the schema is data and
    cannot import them), and the validated default config gives RankConfig's defaults."""
    from dag import ROOT

    from flanpipe.core.io import read_yaml
    from flanpipe.eval.evaluate import BAD_OPTION_LISTS, CONVENTIONS
    from flanpipe.eval.metrics import SCORINGS
    from flanpipe.plan.config import SCHEMA_PATH, load_config

    keys = read_yaml(SCHEMA_PATH)["properties"]["eval"]["properties"]
    assert keys["scoring"]["enum"] == list(SCORINGS)
    assert keys["convention"]["enum"] == list(CONVENTIONS)
    assert keys["bad_option_lists"]["enum"] == list(BAD_OPTION_LISTS)
    assert RankConfig.from_config(load_config(ROOT / "config" / "config.yaml")["eval"]) == RankConfig()
