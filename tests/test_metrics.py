"""Hand-computed checks for every metric; the arithmetic is written next to each expectation."""

from __future__ import annotations

import math

import pytest

from flanpipe.eval.metrics import (
    METRICS,
    accuracy,
    bleu,
    exact_match,
    f1,
    get_metric,
    normalize_answer,
    rouge1,
    rouge2,
    rouge_l,
    token_f1,
)


def test_registry_names_and_lookup() -> None:
    assert set(METRICS) == {"accuracy", "exact_match", "f1", "bleu", "rouge"}
    assert get_metric("rouge") is rouge_l
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("meteor")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),  # lowercase, "!" dropped, article dropped, spaces collapsed
        ("an apple, a pear", "apple pear"),  # both articles and the comma go
        ("another theory", "another theory"),  # articles only as whole words
        ("A.B.", "ab"),  # punctuation goes first: "a.b." -> "ab", which is no article
        ("the.", ""),  # "the." -> "the" -> "" : punctuation is stripped before articles
        ("  tab\tand\nnewline ", "tab and newline"),
        ("Señor's café", "señors café"),  # only ASCII punctuation is removed
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_accuracy_is_exact_after_strip() -> None:
    # hits: "positive"==" positive "(strip) yes, "Negative"!="negative" (case matters), "neutral" yes
    # -> 2 of 3 = 66.67
    preds = ["positive", "Negative", "neutral"]
    refs = [" positive ", "negative", "neutral"]
    assert accuracy(preds, refs) == pytest.approx(200 / 3)


def test_exact_match_normalizes_and_takes_max_over_references() -> None:
    # 1: "The Eiffel Tower." vs ["eiffel tower"] -> both "eiffel tower" -> hit
    # 2: "Paris" vs ["London", "paris!"] -> second reference normalizes to "paris" -> hit
    # 3: "1889" vs ["1887", "1888"] -> miss
    # 4: "the" vs ["a"] -> both normalize to "" -> hit
    # -> 3 of 4 = 75
    preds = ["The Eiffel Tower.", "Paris", "1889", "the"]
    refs = [["eiffel tower"], ["London", "paris!"], ["1887", "1888"], ["a"]]
    assert exact_match(preds, refs) == pytest.approx(75.0)
    # single-string references are one-element reference lists
    assert exact_match(["An Apple"], ["apple"]) == 100.0


def test_token_f1_by_hand() -> None:
    # pred "the Eiffel Tower in Paris" -> [eiffel, tower, in, paris]; ref -> [eiffel, tower]
    # common = 2; P = 2/4, R = 2/2; F1 = 2*0.5*1/(0.5+1) = 2/3
    assert token_f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    # repeated tokens count by multiplicity: pred [x x y], ref [x y y]
    # common = min(2,1) for x + min(1,2) for y = 2; P = 2/3, R = 2/3, F1 = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("cat", "dog") == 0.0
    # empty after normalization: 1 only when both are empty (SQuAD v2 convention)
    assert token_f1("The", "an") == 1.0
    assert token_f1("the", "dog") == 0.0


def test_f1_mean_of_max_over_references() -> None:
    # ex 1: max(F1 vs "Eiffel Tower" = 2/3, F1 vs "the Eiffel Tower in Paris" = 1) = 1
    # ex 2: "blue" vs "red" = 0
    # mean = (1 + 0) / 2 = 0.5 -> 50
    preds = ["Eiffel Tower in Paris", "blue"]
    refs = [["Eiffel Tower", "the Eiffel Tower in Paris"], ["red"]]
    assert f1(preds, refs) == pytest.approx(50.0)


def test_bleu_single_sentence_by_hand() -> None:
    # hyp "a b c d e f" vs ref "a b c d e g": matched n-grams / hyp n-grams
    # 1-gram 5/6, 2-gram 4/5, 3-gram 3/4, 4-gram 2/3; product = 120/360 = 1/3
    # equal lengths -> BP = 1; BLEU = 100 * (1/3)^(1/4) = 75.98
    assert bleu(["a b c d e f"], ["a b c d e g"]) == pytest.approx(100 * (1 / 3) ** 0.25)


def test_bleu_brevity_penalty() -> None:
    # hyp "a b c d" vs ref "a b c d e f": all precisions 1 but hyp 4 < ref 6 tokens
    # BP = exp(1 - 6/4) = exp(-0.5) = 0.6065 -> 60.65
    assert bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5))


def test_bleu_is_corpus_level() -> None:
    # n-gram counts are summed before the mean (not a mean of sentence BLEUs):
    # sent 1 "a b c d" == ref: 1g 4/4, 2g 3/3, 3g 2/2, 4g 1/1
    # sent 2 "a b c d e f" vs "a b c d e g": 1g 5/6, 2g 4/5, 3g 3/4, 4g 2/3
    # corpus: 9/10, 7/8, 5/6, 3/4; product = 945/1920; lengths 10 vs 10 -> BP = 1
    preds = ["a b c d", "a b c d e f"]
    refs = ["a b c d", "a b c d e g"]
    assert bleu(preds, refs) == pytest.approx(100 * (945 / 1920) ** 0.25)


def test_bleu_ragged_multi_reference() -> None:
    # sent 1 has two references; the second one matches exactly -> clipped counts all full
    # sent 2 has one reference, identical -> the corpus is a perfect match = 100
    preds = ["the cat sat on the mat", "hello there general kenobi"]
    refs = [["a cat was on a mat", "the cat sat on the mat"], ["hello there general kenobi"]]
    assert bleu(preds, refs) == pytest.approx(100.0)


def test_rouge_by_hand() -> None:
    # pred "the cat sat on the mat" (6 tokens) vs ref "the cat was on the mat" (6 tokens)
    # rouge1: overlap the x2, cat, on, mat = 5 -> P = R = 5/6 -> F = 83.33
    # rouge2: pred bigrams {the cat, cat sat, sat on, on the, the mat}, ref shares
    #         {the cat, on the, the mat} = 3 of 5 -> F = 60
    # rougeL: LCS "the cat on the mat" = 5 -> P = R = 5/6 -> F = 83.33
    preds, refs = ["the cat sat on the mat"], ["the cat was on the mat"]
    assert rouge1(preds, refs) == pytest.approx(500 / 6)
    assert rouge2(preds, refs) == pytest.approx(60.0)
    assert rouge_l(preds, refs) == pytest.approx(500 / 6)


def test_rouge_l_differs_from_rouge1_on_reordering() -> None:
    # pred "police killed the gunman" vs ref "the gunman police killed": same bag of words
    # rouge1 = 100; LCS = 2 ("police killed" or "the gunman") -> P = R = 2/4 -> rougeL = 50
    preds, refs = ["police killed the gunman"], ["the gunman police killed"]
    assert rouge1(preds, refs) == pytest.approx(100.0)
    assert rouge_l(preds, refs) == pytest.approx(50.0)


def test_rouge_mean_and_multi_reference_max() -> None:
    # ex 1: refs ["x y z w", "the gunman police killed"] -> best rougeL = 50 (as above; first ref 0)
    # ex 2: identical -> 100;  mean = (50 + 100) / 2 = 75
    preds = ["police killed the gunman", "stocks rose"]
    refs = [["x y z w", "the gunman police killed"], ["stocks rose"]]
    assert METRICS["rouge"](preds, refs) == pytest.approx(75.0)


def test_stemming_in_rouge() -> None:
    # Porter stemmer: "running" and "runs" both stem to "run" -> unigram F = 1 -> 100
    assert rouge1(["running"], ["runs"]) == pytest.approx(100.0)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_is_bounded_and_checks_lengths(name: str) -> None:
    fn = METRICS[name]
    same = "five words are here now"  # >= 4 tokens, else BLEU has no 4-grams and is 0
    assert fn([same], [same]) == pytest.approx(100.0)
    assert 0.0 <= fn(["totally unrelated"], ["nothing shared in common"]) <= 100.0
    with pytest.raises(ValueError):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        fn([], [])


def test_rank_choices_by_hand() -> None:
    """Option 0: "yes" (3 chars, 2 tokens) logp -3; option 1: "it is not possible" (18 chars, 6 tokens) logp -6.
    Summed: -3 > -6 -> 0. Per char: -1 < -1/3 -> 1. Per token: -1.5 < -1 -> 1. No EOS scored (the lm_eval
    convention): acc_norm and per_char_eos are one rule."""
    from flanpipe.eval.metrics import SCORINGS, rank_choices

    got = rank_choices([[-3.0, -6.0], [-2.0, -2.0, -9.0]], [[3, 18], [4, 2, 9]], [[2, 6], [1, 3, 3]])
    assert set(got.winners) == set(got.tied) == set(SCORINGS)
    assert got.winners["sum"] == [0, 0]  # second example: a tie goes to the earliest option...
    assert got.tied["sum"] == [False, True]  # ...and is flagged
    assert got.winners["acc_norm"] == got.winners["per_char_eos"] == [1, 0]  # -2/4 = -0.5 beats -1 and -1
    assert got.tied["acc_norm"] == [False, False]
    assert got.winners["per_token"] == [1, 1]  # second: -2/3 beats -2/1 and -9/3
    with pytest.raises(ValueError, match="at least one character"):
        rank_choices([[-1.0]], [[0]], [[1]])
    with pytest.raises(ValueError, match="NaN"):
        rank_choices([[float("nan"), -1.0]], [[1, 1]], [[1, 1]])
    with pytest.raises(ValueError, match="options of example 1"):
        rank_choices([[-1.0], [-1.0, -2.0]], [[1], [1]], [[1], [1, 1]])


def test_acc_norm_leaves_the_eos_out() -> None:
    """The flan convention scores EOS after each option. Option "a" (1 char, 1 token + EOS): own log-prob -1,
    EOS -4; option "aab" (3 chars, 3 tokens + EOS): own -4, EOS -4.
    sum: -5 vs -8 -> "a". acc_norm (lm-evaluation-harness: own / chars): -1 vs -4/3 -> "a".
    per_char_eos ((own + EOS) / chars): -5 vs -8/3 -> "aab". per_token: -5/2 vs -8/4 -> "aab"."""
    from flanpipe.eval.metrics import rank_choices

    got = rank_choices([[-1.0, -4.0]], [[1, 3]], [[2, 4]], eos=[[-4.0, -4.0]])
    assert got.winners == {"sum": [0], "acc_norm": [0], "per_char_eos": [1], "per_token": [1]}
    assert rank_choices([], [], []).winners == {"sum": [], "acc_norm": [], "per_char_eos": [], "per_token": []}
