"""Uncertainty of the held-out scores: bootstrap intervals, paired tuned-vs-base tests, template spread.

A zero-shot score on 200 examples moves by several points when the examples change, so a difference
between two models means little without an interval. Everything here resamples *examples* (the
templates are the experiment's conditions, and every template scores the same examples), reading the
``per_example`` scores of an evaluation JSON (flanpipe.eval.evaluate.per_example_scores).

Resampling is vectorised: B bootstrap replicates of N examples are a [B, N] matrix of multinomial counts
(how often each example is drawn), so every replicate's per-template means are one matrix product
counts @ scores.T / N. Seeded (numpy Generator), so a report is reproducible.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

DEFAULT_BOOTSTRAP = 2_000


@dataclass(frozen=True)
class ScoreMatrix:
    """Per-example scores of one evaluation split: ``scores[t, i]`` = template ``template_ids[t]`` on
    example ``example_ids[i]``."""

    template_ids: np.ndarray
    example_ids: np.ndarray
    scores: np.ndarray  # float [T, N]


def score_matrix(result: Mapping, split: str, exclude: Sequence[int] = ()) -> ScoreMatrix:
    """The [templates x examples] matrix of one split of an evaluation JSON, examples in id order.

    ``exclude``: example ids to leave out (e.g. the contamination audit's, for clean-subset scores).
    Every template must score the same examples (render_eval renders each example under each template).
    """
    if "per_example" not in result:
        raise ValueError(f"evaluation of {result.get('dataset')!r} has no per_example scores (re-run evaluate)")
    df = pl.DataFrame(result["per_example"]).filter(
        (pl.col("split") == split) & ~pl.col("example_id").is_in(list(exclude))
    )
    wide = df.pivot(on="template_id", index="example_id", values="score", sort_columns=True).sort("example_id")
    templates = [c for c in wide.columns if c != "example_id"]
    if wide.select(pl.any_horizontal(pl.all().is_null())).to_series().any():
        raise ValueError(f"{result.get('dataset')!r} {split}: templates do not all score the same examples")
    return ScoreMatrix(
        template_ids=np.array([int(t) for t in templates], dtype=np.int64),
        example_ids=wide["example_id"].to_numpy(),
        scores=wide.select(templates).to_numpy().T.astype(np.float64).reshape(len(templates), wide.height),
    )


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] multinomial counts: replicate b draws example i counts[b, i] times (rows sum to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return float(lo), float(hi)


def template_spread(per_template: Sequence[Mapping], split: str = "test") -> dict[str, float | None]:
    """Std (population, as flanpipe.eval.evaluate.summarize), min and max of the per-template scores: the
    paper's point that the template matters about as much as the model for some tasks."""
    xs = np.array([t[split] for t in per_template if t.get(split) is not None], dtype=np.float64)
    if xs.size == 0:
        return {"std": None, "min": None, "max": None, "range": None}
    return {"std": float(xs.std()), "min": float(xs.min()), "max": float(xs.max()), "range": float(np.ptp(xs))}


def mean_over_templates_ci(
    test: ScoreMatrix, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean over templates of the per-template test score, with a bootstrap interval over examples.

    One replicate draws N examples with replacement and rescores every template on that same draw
    (the templates are paired through the examples).
    """
    t, n = test.scores.shape
    counts = bootstrap_counts(n, n_boot, np.random.default_rng(seed))
    reps = (counts @ test.scores.T / n).mean(axis=1)  # [B]
    lo, hi = percentile_interval(reps, level)
    return {"estimate": float(test.scores.mean()), "lo": lo, "hi": hi, "se": float(reps.std(ddof=1)), "n": n}


def dataset_rng(seed: int, dataset: str) -> np.random.Generator:
    """A generator per (seed, dataset): averages resample each dataset independently (stratified) and the
    draw of a dataset does not change when another dataset joins the report."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])


def mean_over_templates_replicates(test: ScoreMatrix, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] bootstrap replicates (over examples) of the mean over templates, for averaging."""
    n = test.scores.shape[1]
    return (bootstrap_counts(n, n_boot, rng) @ test.scores.T / n).mean(axis=1)


def best_dev_ci(
    validation: ScoreMatrix,
    test: ScoreMatrix,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int]:
    """Test score of the template that is best on validation, with a bootstrap interval that redoes the
    choice in every replicate (validation and test examples resampled independently), so the interval
    includes the luck of picking the template, not just the test sample's. Ties -> lowest template id."""
    if not np.array_equal(validation.template_ids, test.template_ids):
        raise ValueError("validation and test must score the same templates")
    rng = np.random.default_rng(seed)
    nv, nt = validation.scores.shape[1], test.scores.shape[1]
    val_means = validation.scores.mean(axis=1)
    best = int(np.argmax(val_means))  # argmax: first maximum = lowest template id (ids are sorted)
    val_reps = bootstrap_counts(nv, n_boot, rng) @ validation.scores.T / nv  # [B, T]
    test_reps = bootstrap_counts(nt, n_boot, rng) @ test.scores.T / nt  # [B, T]
    chosen = np.argmax(val_reps, axis=1)
    reps = test_reps[np.arange(n_boot), chosen]
    lo, hi = percentile_interval(reps, level)
    return {
        "template": int(test.template_ids[best]),
        "estimate": float(test.scores[best].mean()),
        "lo": lo,
        "hi": hi,
        "se": float(reps.std(ddof=1)),
        "same_choice_fraction": float(np.mean(chosen == best)),
    }


def sign_test(diffs: np.ndarray) -> dict[str, float | int]:
    """Exact two-sided sign test of paired differences (ties dropped): P(|wins - n/2| >= observed) under
    Binomial(n, 1/2). Makes no assumption about the score distribution (0/100 accuracies included)."""
    wins, losses = int(np.sum(diffs > 0)), int(np.sum(diffs < 0))
    n = wins + losses
    if n == 0:
        return {"wins": 0, "losses": 0, "ties": int(diffs.size), "p_value": 1.0}
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return {"wins": wins, "losses": losses, "ties": int(diffs.size - n), "p_value": min(1.0, 2.0 * tail)}


def _aligned(tuned: ScoreMatrix, base: ScoreMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean-over-templates scores of both models on the examples and templates they share."""
    ex = np.intersect1d(tuned.example_ids, base.example_ids)
    tpl = np.intersect1d(tuned.template_ids, base.template_ids)
    if ex.size == 0 or tpl.size == 0:
        raise ValueError("tuned and base share no (template, example) to pair")

    def pick(m: ScoreMatrix) -> np.ndarray:
        rows = np.searchsorted(m.template_ids, tpl)
        cols = np.searchsorted(m.example_ids, ex)
        return m.scores[np.ix_(rows, cols)].mean(axis=0)

    return pick(tuned), pick(base)


def paired_comparison(
    tuned: Mapping[str, ScoreMatrix],
    base: Mapping[str, ScoreMatrix],
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, object]:
    """Tuned minus base on the same examples, for one cluster (dataset -> test ScoreMatrix of each model).

    The cluster score is the mean over datasets of the mean-over-templates score (as the report averages).
    Paired bootstrap: each replicate resamples every dataset's examples (stratified) once and applies the
    draw to both models, so example difficulty cancels; p-value = two-sided share of replicates whose
    difference falls on the other side of 0 (at least 1/n_boot). Also an exact sign test over all
    examples of the cluster, on the per-example mean-over-templates scores.
    """
    datasets = sorted(set(tuned) & set(base))
    if not datasets:
        raise ValueError("no dataset evaluated for both models")
    rng = np.random.default_rng(seed)
    diffs_all, per_dataset = [], {}
    reps = np.zeros(n_boot)
    for d in datasets:
        a, b = _aligned(tuned[d], base[d])
        diff = a - b
        counts = bootstrap_counts(diff.size, n_boot, rng)
        rep = counts @ diff / diff.size
        reps += rep / len(datasets)
        lo, hi = percentile_interval(rep, level)
        per_dataset[d] = {"difference": float(diff.mean()), "lo": lo, "hi": hi, "n": int(diff.size)}
        diffs_all.append(diff)
    estimate = float(np.mean([v["difference"] for v in per_dataset.values()]))
    lo, hi = percentile_interval(reps, level)
    other_side = np.mean(reps <= 0) if estimate > 0 else np.mean(reps >= 0)
    p = min(1.0, max(2.0 * float(other_side), 1.0 / n_boot))
    return {
        "difference": estimate,
        "lo": lo,
        "hi": hi,
        "p_value_bootstrap": p,
        "sign_test": sign_test(np.concatenate(diffs_all)),
        "datasets": per_dataset,
        "n_boot": n_boot,
        "level": level,
    }


def dataset_uncertainty(
    result: Mapping,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
    exclude: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, object]:
    """Intervals for one evaluation JSON: mean over templates, best-dev template, template spread.

    ``exclude``: split -> example ids to leave out (clean-subset scores after a contamination audit).
    """
    exclude = exclude or {}
    val = score_matrix(result, "validation", exclude.get("validation", ()))
    test = score_matrix(result, "test", exclude.get("test", ()))
    return {
        "dataset": result.get("dataset"),
        "mean": mean_over_templates_ci(test, n_boot, seed, level),
        "best_dev": best_dev_ci(val, test, n_boot, seed, level),
        "spread": template_spread(result.get("per_template", [])),
        "level": level,
        "n_boot": n_boot,
    }
