"""The paper's published numbers beside ours: registry `published:` -> summary.md's paper table.

Every figure below is a MADE-UP TEST VALUE (never the paper's): the test checks the mechanism only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flanpipe.core.registry import RegistryError, load_registry
from flanpipe.report.tables import markdown, summarize_main

ENTRY = """
  {name}:
    cluster: nli
    source: {{type: local, format: jsonl, path: "data/{name}/{{split}}.jsonl"}}
    splits: {{train: train, validation: validation, test: test}}
    fields: {{premise: premise, hypothesis: hypothesis, answer: label}}
    options: ["yes", "no"]
    metric: accuracy
"""
PUBLISHED = """    published:
      flan_137b_zero_shot: 11.5
      lamda_pt_137b_zero_shot: 22.0
      lamda_pt_137b_few_shot: null
      gpt3_175b_zero_shot: 33.0
      source: "TEST VALUES, made up for tests/test_report_published.py (not the paper's)"
"""


def registry_file(tmp_path: Path, published: str = PUBLISHED) -> Path:
    p = tmp_path / "reg.yaml"
    p.write_text("datasets:" + ENTRY.format(name="nli_a") + published + ENTRY.format(name="nli_b"))
    return p


def test_registry_carries_published_scores(tmp_path: Path) -> None:
    reg = load_registry([registry_file(tmp_path)])
    assert reg["nli_a"].published == {
        "flan_137b_zero_shot": 11.5,
        "lamda_pt_137b_zero_shot": 22.0,
        "lamda_pt_137b_few_shot": None,
        "gpt3_175b_zero_shot": 33.0,
        "source": "TEST VALUES, made up for tests/test_report_published.py (not the paper's)",
    }
    assert reg["nli_b"].published is None


@pytest.mark.parametrize(
    ("published", "why"),
    [
        ("    published: {flan_137b_zero_shot: 11.5}\n", "source"),  # a figure without its table
        ("    published: {flan_137b_zero_shot: 11.5, flan_zero: 3, source: x}\n", "flan_zero"),  # unknown model
        ("    published: {flan_137b_zero_shot: high, source: x}\n", "high"),
    ],
)
def test_bad_published_entry_names_the_file_and_field(tmp_path: Path, published: str, why: str) -> None:
    with pytest.raises(RegistryError, match=rf"reg\.yaml.*nli_a(.|\n)*{why}"):
        load_registry([registry_file(tmp_path, published)])


def record(dataset: str, mean: float, model: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "cluster": "nli",
        "metric": "accuracy",
        "per_template": [{"template_id": 0, "validation": mean, "test": mean}],
        "mean": mean,
        "std": 0.0,
        "best_dev_template": 0,
        "best_dev_test": mean,
        "run": "heldout_nli",
        "variant": "natural",
        "held_out": "nli",
        "role": "tuned",
        "model": model,
    }


def test_flan_base_model_run_prints_the_difference(tmp_path: Path) -> None:
    """A run on lamda_pt_137b (the paper's base) gets 'ours − FLAN 137B': 20.0 − 11.5 = +8.5; a dataset
    without published scores is left out of the table; a missing model prints –."""
    published = {d: dict(s.published) for d, s in load_registry([registry_file(tmp_path)]).items() if s.published}
    recs = [record("nli_a", 20.0, "lamda_pt_137b"), record("nli_b", 40.0, "lamda_pt_137b")]
    md = markdown(summarize_main(recs, published=published))
    assert "Beside the paper (same base model: difference to FLAN 137B):" in md
    assert "| nli_a | 20.0 | 11.5 | 22.0 | – | 33.0 | – | +8.5 |" in md, md
    assert "| nli_b | 40.0 |" not in md
    assert "Source: TEST VALUES, made up for tests/test_report_published.py (not the paper's)" in md


def test_other_models_show_the_paper_as_reference(tmp_path: Path) -> None:
    published = {d: dict(s.published) for d, s in load_registry([registry_file(tmp_path)]).items() if s.published}
    md = markdown(summarize_main([record("nli_a", 20.0, "tiny")], published=published))
    assert "The paper's numbers (reference):" in md
    assert "| nli_a | 20.0 | 11.5 | 22.0 | – | 33.0 | – |" in md, md
    assert "ours − FLAN 137B" not in md
    assert "The paper" not in markdown(summarize_main([record("nli_a", 20.0, "tiny")]))
