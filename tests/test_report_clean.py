"""summary.md's clean-subset scores (contaminated eval examples left out) and the intervals on averages."""

from __future__ import annotations

from typing import Any

import pytest

from flanpipe.report.tables import markdown, summarize_main


def scored(dataset: str, cluster: str, test: list[list[float]], run: str | None = None) -> dict[str, Any]:
    """An eval record whose per-example test scores are ``test[template][example]`` (validation = test)."""
    rows = [(split, t, e, x) for split in ("validation", "test") for t, xs in enumerate(test) for e, x in enumerate(xs)]
    per_example = {k: [r[i] for r in rows] for i, k in enumerate(("split", "template_id", "example_id", "score"))}
    means = [sum(xs) / len(xs) for xs in test]
    return {
        "dataset": dataset,
        "cluster": cluster,
        "metric": "accuracy",
        "n_templates": len(test),
        "per_template": [{"template_id": t, "validation": m, "test": m} for t, m in enumerate(means)],
        "mean": sum(means) / len(means),
        "std": 0.0,
        "best_dev_template": 0,
        "best_dev_test": means[0],
        "run": run or f"heldout_{cluster}",
        "variant": "natural",
        "held_out": cluster,
        "role": "tuned",
        "per_example": per_example,
    }


def test_average_intervals_by_hand() -> None:
    """nli_a scores [0, 100] on 2 examples: its bootstrap mean is 0, 50 or 100 (p 1/4, 1/2, 1/4); nli_b is
    always 100. Cluster replicates (a + 100) / 2 take 50, 75, 100, each end with ~500 of 2000 replicates,
    so the 95% interval is [50, 100] around 75. With sentiment constant at 60 the held-out average
    (75 + 60) / 2 = 67.5 has interval [(50 + 60) / 2, (100 + 60) / 2] = [55, 80]."""
    recs = [
        scored("nli_a", "nli", [[0.0, 100.0]]),
        scored("nli_b", "nli", [[100.0, 100.0]]),
        scored("sent_a", "sentiment", [[60.0, 60.0, 60.0]]),
    ]
    s = summarize_main(recs, "exp", seed=3)
    nli = s["clusters"]["nli"]["average"]["tuned_zeroshot"]
    assert nli["mean"] == 75.0 and (nli["mean_ci"]["lo"], nli["mean_ci"]["hi"]) == (50.0, 100.0)
    sent = s["clusters"]["sentiment"]["average"]["tuned_zeroshot"]
    assert (sent["mean_ci"]["lo"], sent["mean_ci"]["hi"], sent["mean_ci"]["se"]) == (60.0, 60.0, 0.0)
    ho = s["held_out_average"]["tuned_zeroshot"]
    assert ho["mean"] == 67.5 and (ho["mean_ci"]["lo"], ho["mean_ci"]["hi"]) == (55.0, 80.0)
    # one dataset's cell and a one-dataset cluster's average come from the same replicates: same interval
    one = summarize_main(recs[:1], seed=3)["clusters"]["nli"]
    assert one["average"]["tuned_zeroshot"]["mean_ci"] == one["datasets"]["nli_a"]["slots"]["tuned_zeroshot"]["mean_ci"]
    assert s["average_interval"]["n_boot"] == 2000 and s["average_interval"]["seed"] == 3
    md = markdown(s)
    assert "| instruction-tuned, zero-shot | 67.5 [55.0, 80.0] | – | 67.5 | 2 |" in md, md
    assert "| **cluster average** |  | **75.0 [50.0, 100.0] / 75.0** |" in md, md
    assert "95% bootstrap, 2000 replicates, seed 3; examples resampled with replacement within each dataset" in md


def test_average_interval_is_seeded_and_stratified() -> None:
    """Same seed -> same interval; a dataset's draw does not change when another dataset joins."""
    a = scored("nli_a", "nli", [[0.0, 100.0, 100.0, 0.0, 100.0], [100.0, 0.0, 0.0, 0.0, 100.0]])
    one = summarize_main([a], seed=1)["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_ci"]
    assert summarize_main([a], seed=1)["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_ci"] == one
    assert summarize_main([a], seed=2)["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_ci"] != one
    # adding a constant dataset halves the spread of a's replicates and shifts them: (a + 50) / 2
    two = summarize_main([a, scored("nli_b", "nli", [[50.0, 50.0]])], seed=1)
    ci = two["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_ci"]
    assert ci["lo"] == pytest.approx((one["lo"] + 50) / 2) and ci["hi"] == pytest.approx((one["hi"] + 50) / 2)


def audit(dataset: str, test_ids: list[int], validation_ids: list[int]) -> dict[str, Any]:
    """A contamination audit (flanpipe.data.contamination's layout) flagging the given eval example ids."""
    splits = {"test": {"contaminated_ids": test_ids}, "validation": {"contaminated_ids": validation_ids}}
    return {"datasets": {dataset: {"splits": splits}}}


def test_clean_subset_beside_all_examples() -> None:
    """Templates score [100, 100, 0, 0] and [100, 0, 0, 0]: all examples (50 + 25) / 2 = 37.5; the audit
    flags test example 0 (and a validation id, which the test score ignores), so the clean subset is
    (100/3 + 0) / 2 = 16.7 with 1 dropped. A run without an audit shows no clean score."""
    recs = [
        scored("nli_a", "nli", [[100.0, 100.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]),
        scored("sent_a", "sentiment", [[100.0, 0.0]]),
    ]
    s = summarize_main(recs, "exp", audits={"heldout_nli": audit("nli_a", [0], [3])})
    a = s["clusters"]["nli"]["datasets"]["nli_a"]["slots"]["tuned_zeroshot"]
    assert a["mean"] == 37.5
    assert a["clean"] == {"mean": pytest.approx(50 / 3), "n": 3, "n_dropped": 1}
    assert s["clusters"]["sentiment"]["datasets"]["sent_a"]["slots"]["tuned_zeroshot"]["clean"] is None
    nli = s["clusters"]["nli"]["average"]["tuned_zeroshot"]
    assert nli["clean_mean"] == pytest.approx(50 / 3) and nli["clean_dropped"] == 1
    # one cluster without an audit: no held-out clean average (a clean mean over part would mislead)
    assert s["held_out_average"]["tuned_zeroshot"]["clean_mean"] is None
    md = markdown(s)
    assert "| nli_a | accuracy | 37.5 ± 0.0 [0.0, 75.0] / 50.0; clean 16.7 (−1) |" in md, md
    assert "**37.5 [" in md and "; clean 16.7 (−1)**" not in md  # the clean part sits outside the bold


def test_audit_flagging_nothing_keeps_every_example() -> None:
    rec = scored("nli_a", "nli", [[100.0, 0.0]])
    s = summarize_main([rec], audits={"heldout_nli": {"datasets": {}}})
    assert s["clusters"]["nli"]["datasets"]["nli_a"]["slots"]["tuned_zeroshot"]["clean"] == {
        "mean": 50.0,
        "n": 2,
        "n_dropped": 0,
    }
    assert s["held_out_average"]["tuned_zeroshot"]["clean_mean"] == 50.0
