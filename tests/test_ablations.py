"""The paper's ablations are named DAG targets that plan only the runs they need (dry runs, seconds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dag import ROOT, run_snakemake

from flanpipe.plan.checks import PlanError
from flanpipe.plan.config import load_config
from flanpipe.plan.experiments import plan_experiment


def planned_runs(target: str, workdir: Path) -> set[str]:
    """Runs a dry run of ``target`` would train, from fresh (nothing built yet)."""
    r = run_snakemake(workdir, ROOT / "config" / "config.yaml", "-n", target, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return set(re.findall(r"output: results/models/(\S+)", r.stdout))


@pytest.mark.parametrize(
    ("target", "runs"),
    [
        (
            "ablation_clusters",
            {"base-tiny", "heldout_nli__clusters1", "heldout_nli__clusters2", "heldout_nli__clusters4"},
        ),
        (
            "ablation_scale",
            {
                "base-tiny",
                "base-micro",
                "heldout_nli",
                "heldout_sentiment",
                "heldout_nli__micro",
                "heldout_sentiment__micro",
            },
        ),
        (
            "ablation_templates",
            {"base-tiny"} | {f"heldout_{c}__templates{k}" for c in ("nli", "sentiment") for k in (1, 2, 4)},
        ),
        (
            "ablation_instructions",
            {"base-tiny", "heldout_nli", "heldout_sentiment"}
            | {f"heldout_{c}__train-{m}" for c in ("nli", "sentiment") for m in ("no_template", "dataset_name")},
        ),
    ],
)
def test_ablation_targets_build_only_what_they_need(target: str, runs: set[str], tmp_path: Path) -> None:
    assert planned_runs(target, tmp_path) == runs


def test_cluster_ablation_respects_overlaps_and_counts() -> None:
    cfg = load_config(ROOT / "config" / "config.yaml")
    plan = plan_experiment(cfg)
    clusters = {r.name: {plan.registry[d].cluster for d in r.datasets} for r in plan.runs.values()}
    # Clusters are added in the configured order; paraphrase never trains an NLI-held-out model.
    assert clusters["heldout_nli__clusters1"] == {"closed_book_qa"}
    assert clusters["heldout_nli__clusters2"] == {"closed_book_qa", "struct_to_text"}
    assert clusters["heldout_nli__clusters4"] == {"closed_book_qa", "struct_to_text", "commonsense", "sentiment"}
    cfg["ablations"]["clusters"]["counts"] = [5]
    deferred = plan_experiment(cfg)  # the main DAG still plans; the ablation fails when asked for
    with pytest.raises(PlanError, match=r"ablations.clusters.counts: 5 training clusters .* only 4 remain"):
        deferred.check_ablation("clusters")
