"""results/uncertainty.{json,md}: intervals per evaluation, clean subsets from the audit, tuned vs base."""

from __future__ import annotations

import json

import pytest

from flanpipe.report.uncertainty import format_markdown, uncertainty_report, write_uncertainty
from tests.test_stats import _result


def _records():
    # 2 templates x 4 examples; tuned gets examples 0-2 right under both templates, base only example 0
    tuned = _result([[100, 100, 100, 0]] * 2, [[100, 100, 100, 0]] * 2)
    base = _result([[100, 0, 0, 0]] * 2, [[100, 0, 0, 0]] * 2)
    meta = [
        {"run": "heldout_c", "variant": "natural", "held_out": "c", "role": "tuned"},
        {"run": "base-tiny", "variant": "natural", "held_out": "c", "role": "base"},
    ]
    audit = {"datasets": {"d": {"splits": {"validation": {"contaminated_ids": []}, "test": {"contaminated_ids": [1]}}}}}
    return [tuned, base], meta, {"heldout_c": audit}


def test_report_intervals_clean_subset_and_pairing() -> None:
    results, meta, audits = _records()
    rep = uncertainty_report(results, meta, audits, n_boot=500, seed=0)
    tuned, base = rep["evaluations"]
    assert tuned["all"]["mean"]["estimate"] == 75.0 and tuned["contaminated_excluded"] == 1
    assert tuned["clean"]["mean"]["estimate"] == pytest.approx(200 / 3)  # examples 0, 2, 3: 100, 100, 0
    assert base["clean"] is None  # the base run has no audit here
    (cmp,) = rep["tuned_vs_base"]
    # per-example differences 0, 100, 100, 0 -> +50; sign test: 2 wins, 0 losses, 2 ties, p = 2 x 1/4
    assert cmp["held_out"] == "c" and cmp["difference"] == 50.0
    assert cmp["sign_test"] == {"wins": 2, "losses": 0, "ties": 2, "p_value": 0.5}
    md = format_markdown(rep)
    assert "| c | d | heldout_c | natural | 75.0 [" in md and "| c | natural | +50.0 [" in md


def test_write_uncertainty_reads_and_writes(tmp_path) -> None:
    results, meta, audits = _records()
    paths = []
    for i, r in enumerate(results):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    (tmp_path / "a.json").write_text(json.dumps(audits["heldout_c"]))
    write_uncertainty(
        paths, meta, {"heldout_c": tmp_path / "a.json"}, tmp_path / "u.json", tmp_path / "u.md", n_boot=50
    )
    assert len(json.loads((tmp_path / "u.json").read_text())["evaluations"]) == 2
    assert (tmp_path / "u.md").read_text().startswith("# Uncertainty")
