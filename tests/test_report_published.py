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
    assert "| nli_a | 20.0 | 11.5 | – | 22.0 | – | 33.0 | – | +8.5 |" in md, md
    assert "| nli_b | 40.0 |" not in md
    assert "Source: TEST VALUES, made up for tests/test_report_published.py (not the paper's)" in md


def test_other_models_show_the_paper_as_reference(tmp_path: Path) -> None:
    published = {d: dict(s.published) for d, s in load_registry([registry_file(tmp_path)]).items() if s.published}
    md = markdown(summarize_main([record("nli_a", 20.0, "tiny")], published=published))
    assert "The paper's numbers (reference):" in md
    assert "| nli_a | 20.0 | 11.5 | – | 22.0 | – | 33.0 | – |" in md, md
    assert "ours − FLAN 137B" not in md
    assert "The paper" not in markdown(summarize_main([record("nli_a", 20.0, "tiny")]))


def test_flan137b_report_prints_the_papers_figures_for_the_filled_datasets() -> None:
    """config/flan137b.yaml's report: the registry's published FLAN 137B figures (copied, with their source,
    from public quotes of the paper) beside every held-out dataset that has them, the difference to FLAN
    137B for its lamda_pt_137b runs, and nothing for the datasets without figures."""
    from flanpipe.plan.config import load_config
    from flanpipe.plan.experiments import plan_experiment

    plan = plan_experiment(load_config("config/flan137b.yaml"))
    published = {d: dict(s.published) for d, s in plan.registry.items() if s.published}  # rules' report_published
    assert len(published) == 15
    records = [
        {**record(e.dataset, 50.0, "?"), "cluster": plan.registry[e.dataset].cluster}
        | {"metric": plan.registry[e.dataset].metric, **plan.record_meta(e)}
        for e in plan.evaluations
    ]
    md = markdown(summarize_main(records, "flan137b.yaml", published=published))
    assert md.count("Beside the paper (same base model: difference to FLAN 137B):") == 6  # one per held-out cluster
    assert "| rte | 50.0 | 84.1 | 84.5 (k=8) | – | – | – | – | -34.1 |" in md, md
    assert "| anli_r1 | 50.0 | 47.7 | – | – | – | – | – | +2.3 |" in md
    assert "| wmt16_ende | 50.0 | 27.0 | – | – | – | – | – | +23.0 |" in md
    tables = [block.split("\n\n", 2)[1] for block in md.split("Beside the paper (same base model")[1:]]
    shown = {row.split(" | ")[0].lstrip("| ") for t in tables for row in t.splitlines()[2:]}
    assert shown == set(published) - {"record"}  # ReCoRD's cluster is not held out in flan137b
    assert "Source: second-hand copy of FLAN (arXiv 2109.01652v5), read in OpenCodePapers/OpenCodePapers" in md
