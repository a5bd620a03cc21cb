"""flanpipe.report.stats against cases small enough to enumerate by hand."""

from __future__ import annotations

import numpy as np
import pytest

from flanpipe.report.stats import (
    ScoreMatrix,
    best_dev_ci,
    dataset_uncertainty,
    mean_over_templates_ci,
    paired_comparison,
    score_matrix,
    sign_test,
    template_spread,
)


def _result(val: list[list[float]], test: list[list[float]], ids: list[int] | None = None) -> dict:
    """An evaluation JSON's per_example block: scores[t][i] for template t on example ids[i]."""
    cols: dict[str, list] = {"split": [], "template_id": [], "example_id": [], "score": []}
    for split, m in (("validation", val), ("test", test)):
        for t, row in enumerate(m):
            for i, s in enumerate(row):
                cols["split"].append(split)
                cols["template_id"].append(t)
                cols["example_id"].append((ids or list(range(len(row))))[i])
                cols["score"].append(s)
    per_template = [{"template_id": t, "test": float(np.mean(r))} for t, r in enumerate(test)]
    return {"dataset": "d", "per_example": cols, "per_template": per_template}


def _m(scores: list[list[float]], ids: list[int] | None = None) -> ScoreMatrix:
    a = np.array(scores, dtype=float)
    return ScoreMatrix(np.arange(a.shape[0]), np.array(ids or range(a.shape[1])), a)


def test_score_matrix_pivots_and_excludes() -> None:
    r = _result([[1, 2, 3], [4, 5, 6]], [[10, 20, 30], [40, 50, 60]], ids=[7, 3, 5])
    m = score_matrix(r, "test")
    assert m.template_ids.tolist() == [0, 1] and m.example_ids.tolist() == [3, 5, 7]
    assert m.scores.tolist() == [[20, 30, 10], [50, 60, 40]]
    assert score_matrix(r, "test", exclude=[5]).scores.tolist() == [[20, 10], [50, 40]]
    with pytest.raises(ValueError, match="per_example"):
        score_matrix({"dataset": "d"}, "test")


def test_mean_interval_matches_the_enumerated_bootstrap() -> None:
    # two examples; template 0 scores (100, 0), template 1 scores (100, 100): estimate 75.
    # A replicate draws example 0 twice (p 1/4), once (1/2) or never (1/4): mean over templates
    # (c0 x 50 + 100) / 2 = 100, 75, 50 -> interval [50, 100], se = sqrt(312.5) = 17.68
    ci = mean_over_templates_ci(_m([[100, 0], [100, 100]]), n_boot=20_000, seed=1)
    assert ci["estimate"] == 75.0 and (ci["lo"], ci["hi"]) == (50.0, 100.0)
    assert ci["se"] == pytest.approx(312.5**0.5, rel=0.03)
    assert mean_over_templates_ci(_m([[100, 0], [100, 100]]), n_boot=500, seed=3) == mean_over_templates_ci(
        _m([[100, 0], [100, 100]]), n_boot=500, seed=3
    )  # seeded


def test_constant_scores_give_a_point_interval() -> None:
    ci = mean_over_templates_ci(_m([[60] * 5, [80] * 5]), n_boot=200)
    assert ci["estimate"] == ci["lo"] == ci["hi"] == 70.0 and ci["se"] == 0.0


def test_best_dev_redoes_the_choice_per_replicate() -> None:
    # validation: template 1 always wins (no variance) -> its test score (mean 50) every time
    val, test = _m([[0, 0, 0], [100, 100, 100]]), _m([[100, 100, 100, 100], [100, 0, 100, 0]])
    ci = best_dev_ci(val, test, n_boot=2_000)
    assert ci["template"] == 1 and ci["estimate"] == 50.0 and ci["same_choice_fraction"] == 1.0
    assert ci["lo"] < 50.0 < ci["hi"]
    # a validation tie: the lowest template id, as flanpipe.eval.evaluate.summarize chooses
    assert best_dev_ci(_m([[50, 50], [50, 50]]), _m([[10, 10], [90, 90]]), n_boot=100)["template"] == 0
    # validation (100, 0) vs (0, 100): each template wins half the replicates, ties (1/2) -> template 0
    tie = best_dev_ci(_m([[100, 0], [0, 100]]), _m([[0, 0], [100, 100]]), n_boot=20_000, seed=2)
    assert tie["same_choice_fraction"] == pytest.approx(0.75, abs=0.02)  # draws (2,0) and (1,1) keep t0


def test_sign_test_exact_binomial() -> None:
    # 4 wins, 1 loss, 1 tie: n = 5, P(X <= 1) = (1 + 5) / 32, two-sided 12 / 32
    assert sign_test(np.array([1, 2, 3, 4, -1, 0])) == {"wins": 4, "losses": 1, "ties": 1, "p_value": 0.375}
    assert sign_test(np.ones(5))["p_value"] == 2 / 32
    assert sign_test(np.zeros(3))["p_value"] == 1.0


def test_paired_comparison_hand_cases() -> None:
    base = {"a": _m([[0, 100], [0, 100]]), "b": _m([[50, 50, 50]])}
    same = paired_comparison(base, base, n_boot=500)
    assert same["difference"] == 0.0 and same["p_value_bootstrap"] == 1.0 and same["sign_test"]["ties"] == 5
    # tuned = base + 10 everywhere: the difference is exactly 10 in every replicate
    up = {d: ScoreMatrix(m.template_ids, m.example_ids, m.scores + 10) for d, m in base.items()}
    res = paired_comparison(up, base, n_boot=500)
    assert res["difference"] == res["lo"] == res["hi"] == 10.0
    assert res["p_value_bootstrap"] == 1 / 500 and res["sign_test"]["wins"] == 5
    # one dataset, differences (100, 0): replicates 0 (p 1/4), 50, 100 -> two-sided p = 2 x 1/4
    one = paired_comparison({"a": _m([[100, 50]])}, {"a": _m([[0, 50]])}, n_boot=20_000, seed=5)
    assert one["difference"] == 50.0 and one["p_value_bootstrap"] == pytest.approx(0.5, abs=0.02)


def test_paired_comparison_pairs_only_shared_examples() -> None:
    tuned = _m([[100, 100, 100]], ids=[1, 2, 3])
    base = _m([[0, 0]], ids=[2, 3])
    res = paired_comparison({"a": tuned}, {"a": base}, n_boot=100)
    assert res["datasets"]["a"]["n"] == 2 and res["difference"] == 100.0


def test_dataset_uncertainty_and_spread() -> None:
    r = _result([[0, 0, 100], [100, 100, 100]], [[0, 100, 100], [100, 100, 0]])
    out = dataset_uncertainty(r, n_boot=300, exclude={"test": [2]})
    assert out["mean"]["estimate"] == pytest.approx(75.0) and out["mean"]["n"] == 2  # (50 + 100) / 2
    assert out["best_dev"]["template"] == 1 and out["best_dev"]["estimate"] == 100.0
    spread = template_spread(r["per_template"])
    assert spread["min"] == pytest.approx(200 / 3) and spread["max"] == pytest.approx(200 / 3)
    assert spread["std"] == 0.0 and template_spread([]) == {"std": None, "min": None, "max": None, "range": None}
