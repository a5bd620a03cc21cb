"""Evaluation metrics, all on a 0-100 scale, behind one registry.

Every metric has the same signature, `metric(predictions, references) -> float`, so the
evaluator can look one up by the name written in the task registry (`metric: rouge`) and
never special-case a dataset. References are either one string per prediction or a list
of acceptable strings per prediction (multi-reference QA, translation, data-to-text);
string-matching metrics take the max over references, BLEU uses sacrebleu's native
multi-reference support.

The scoring libraries load on first use: an evaluate job whose datasets are all accuracy-scored never
imports them (rouge_score pulls in nltk, and through it scipy.stats, scikit-learn and pandas: ~1.2 s of
a job's start on the shared 2-core machine, ``python -X importtime``).
"""

from __future__ import annotations

import collections
import itertools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

References = Sequence[str] | Sequence[Sequence[str]]
Metric = Callable[[Sequence[str], References], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Lift references to one non-empty list per prediction, checking lengths early.

    A silent length mismatch would zip-truncate and report a score over fewer examples.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("cannot score an empty set of predictions")
    lists = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if any(len(refs) == 0 for refs in lists):
        raise ValueError("every prediction needs at least one reference")
    return lists


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse whitespace.

    Order matters and follows the official SQuAD script: punctuation goes before articles,
    so "the." loses its period and then its article.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def accuracy(predictions: Sequence[str], references: References) -> float:
    """Percent of predictions equal to a reference (surrounding whitespace ignored).

    Used for rank classification, where the prediction is an option string copied verbatim,
    so no further normalization is wanted (that is exact_match's job).
    """
    refs = _reference_lists(predictions, references)
    hits = sum(pred.strip() in {r.strip() for r in rs} for pred, rs in zip(predictions, refs, strict=True))
    return 100.0 * hits / len(predictions)


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Percent of predictions whose SQuAD-normalized form equals any normalized reference."""
    refs = _reference_lists(predictions, references)
    hits = sum(
        normalize_answer(pred) in {normalize_answer(r) for r in rs} for pred, rs in zip(predictions, refs, strict=True)
    )
    return 100.0 * hits / len(predictions)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 (0-1) between two normalized bags of tokens.

    If either side normalizes to no tokens the score is 1 when both are empty and 0
    otherwise (the SQuAD v2 convention), so "the" vs "a" is a perfect match instead of 0/0.
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(ref_tokens)
    n_same = sum(common.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(predictions: Sequence[str], references: References) -> float:
    """Mean over examples of the max token F1 over that example's references, x100."""
    refs = _reference_lists(predictions, references)
    total = sum(max(token_f1(pred, r) for r in rs) for pred, rs in zip(predictions, refs, strict=True))
    return 100.0 * total / len(predictions)


def bleu(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU from sacrebleu (13a tokenization, default smoothing).

    Corpus-level, not a mean of sentence BLEUs: n-gram counts are summed over the whole
    set before the geometric mean, which is what translation papers report. sacrebleu
    wants reference *streams* (the k-th reference of every example), so a ragged set of
    references is padded with None, which sacrebleu skips.
    """
    import sacrebleu

    refs = _reference_lists(predictions, references)
    n_streams = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


@cache
def _rouge_scorer() -> RougeScorer:
    """One shared scorer; building it loads the Porter stemmer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge(kind: str, predictions: Sequence[str], references: References) -> float:
    """Mean F-measure of one ROUGE kind, taking the best reference per example, x100."""
    refs = _reference_lists(predictions, references)
    scorer = _rouge_scorer()
    total = sum(scorer.score_multi(rs, pred)[kind].fmeasure for pred, rs in zip(predictions, refs, strict=True))
    return 100.0 * total / len(predictions)


def rouge1(predictions: Sequence[str], references: References) -> float:
    """Unigram-overlap ROUGE-1 F-measure (stemmed), mean over examples."""
    return _rouge("rouge1", predictions, references)


def rouge2(predictions: Sequence[str], references: References) -> float:
    """Bigram-overlap ROUGE-2 F-measure (stemmed), mean over examples."""
    return _rouge("rouge2", predictions, references)


def rouge_l(predictions: Sequence[str], references: References) -> float:
    """Longest-common-subsequence ROUGE-L F-measure (stemmed), mean over examples.

    This is the number reported as "ROUGE" for struct-to-text and summarization.
    """
    return _rouge("rougeL", predictions, references)


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "f1": f1,
    "bleu": bleu,
    "rouge": rouge_l,
}
"""Metric name (as written in the task registry) -> metric function."""


def get_metric(name: str) -> Metric:
    """Look a metric up by name, failing loudly with the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}") from None


# ---------------------------------------------------------------------------------------------------
# rank classification: which option wins under each scoring rule

SCORINGS = ("sum", "acc_norm", "per_char_eos", "per_token")
"""Rank-classification rules (config eval.scoring), for option k of an example with ``own_k`` the summed log-prob of
the option's own scored tokens (its text tokens; under the lm_eval convention lm-evaluation-harness's continuation,
the " " delimiter included as it is tokenized), ``eos_k`` the log-prob of the EOS after it (0 where the convention
scores none), ``chars_k`` the option text's characters (delimiter not counted) and ``tokens_k`` the scored tokens
(EOS included):

- ``sum``: own_k + eos_k. FLAN's rank classification; under the lm_eval convention lm-evaluation-harness's ``acc``.
- ``acc_norm``: own_k / chars_k. lm-evaluation-harness's ``acc_norm`` exactly (``argmax(lls / completion_len)``,
  ``completion_len = len(choice)``): the EOS never enters it, whatever the convention.
- ``per_char_eos``: (own_k + eos_k) / chars_k. What flanpipe once called per_char: acc_norm's rule with the EOS
  log-prob in the numerator; equal to acc_norm under the lm_eval convention.
- ``per_token``: (own_k + eos_k) / tokens_k, a tokenizer-dependent length normalisation.
"""


@dataclass(frozen=True)
class Ranking:
    """Per rule: each example's winning option (ties go to the earliest, as numpy's argmax) and whether its best
    score was shared by another option (a tie: the pick is the option order's, not the model's)."""

    winners: dict[str, list[int]]
    tied: dict[str, list[bool]]


def rule_scores(own: np.ndarray, eos: np.ndarray, chars: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Every rule's score of each option (flat arrays, one entry per option): the formulas of ``SCORINGS``."""
    total = own + eos
    return {"sum": total, "acc_norm": own / chars, "per_char_eos": total / chars, "per_token": total / tokens}


def rank_choices(
    own: Sequence[Sequence[float]],
    chars: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    eos: Sequence[Sequence[float]] | None = None,
) -> Ranking:
    """Winning option and tie flag per example under every rule of ``SCORINGS`` (see there for the formulas).

    ``own``/``eos``: the per-option log-probs the scorer returns (``eos`` None: no EOS scored, the lm_eval
    convention); ``chars``/``tokens``: the option text's characters and the scored tokens. Long options lose
    summed log-prob just by having more tokens, so the normalised rules are the usual check that a ranking is not
    a length bias. One pass over the flat options (numpy), no second model pass.
    """
    parts = {"own": own, "chars": chars, "tokens": tokens, **({"eos": eos} if eos is not None else {})}
    if len({len(x) for x in parts.values()}) != 1:
        raise ValueError(f"examples per input: { ({k: len(x) for k, x in parts.items()}) }")
    if not own:
        return Ranking({k: [] for k in SCORINGS}, {k: [] for k in SCORINGS})
    counts = {k: np.fromiter(map(len, x), dtype=np.int64, count=len(x)) for k, x in parts.items()}
    n = counts["own"]
    bad = np.flatnonzero((n == 0) | np.any([c != n for c in counts.values()], axis=0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"options of example {i}: { ({k: len(x[i]) for k, x in parts.items()}) } values")
    total = int(n.sum())
    flat = {k: np.fromiter(itertools.chain.from_iterable(x), dtype=np.float64, count=total) for k, x in parts.items()}
    if min(flat["chars"].min(), flat["tokens"].min()) < 1:
        raise ValueError("every option needs at least one character and one token to be length-normalised")
    if np.isnan(flat["own"]).any() or ("eos" in flat and np.isnan(flat["eos"]).any()):
        raise ValueError("an option's log-prob is NaN: the model's logits are not finite")
    scores = rule_scores(flat["own"], flat.get("eos", np.zeros(total)), flat["chars"], flat["tokens"])
    starts = np.cumsum(n) - n
    example = np.repeat(np.arange(len(n)), n)
    winners, tied = {}, {}
    for name, score in scores.items():
        is_max = score == np.repeat(np.maximum.reduceat(score, starts), n)
        first = np.flatnonzero(is_max)[np.unique(example[is_max], return_index=True)[1]]  # earliest best option
        winners[name] = (first - starts).tolist()
        tied[name] = (np.add.reduceat(is_max, starts) > 1).tolist()
    return Ranking(winners, tied)
