"""Incremental reruns: an edit replans exactly what depends on it; a touch replans nothing.

Snakemake's rerun triggers (code, input, mtime, params, software-env) make this hold only if every
param is stable across processes (no Python ``hash()``: it is salted per process) and every file a job
reads is one of its inputs. Each planning below is a fresh ``snakemake --dry-run`` process, so an
unstable param would show up as a replanned job.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from dag import ROOT
from dag import snakemake as _snakemake

CONFIG = ROOT / "tests" / "config" / "incremental.yaml"
JOB = re.compile(r"^(?:local)?rule (\w+):$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def snakemake(work: Path, *args: str) -> str:
    r = _snakemake("--snakefile", ROOT / "Snakefile", *args, cwd=work, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def planned(work: Path) -> set[str]:
    """Jobs a dry run of the default target would run, as ``rule[wildcards]`` (wildcards sorted by name)."""
    jobs: list[list[str]] = []
    for line in snakemake(work, "--dry-run").splitlines():
        if m := JOB.match(line):
            jobs.append([m.group(1), ""])
        elif (m := WILDCARDS.match(line)) and jobs:
            jobs[-1][1] = ", ".join(sorted(m.group(1).split(", ")))  # Snakemake's wildcard order varies
    return {f"{rule}[{wc}]" for rule, wc in jobs}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the DAG built up to packing (not training: the point is the planning)."""
    work = tmp_path_factory.mktemp("incremental")
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copy(CONFIG, work / "config" / "config.yaml")
    snakemake(work, "--cores", "2", "--until", "pack", "audit", "render_eval_shard", "train_spec")
    return work


@pytest.mark.slow
def test_touch_replans_nothing_and_edit_replans_its_dependents(built: Path) -> None:
    baseline = planned(built)
    # Still to do: training, evaluation, the report. Nothing upstream of them.
    assert {j.split("[")[0] for j in baseline} == {"train", "evaluate", "eval_result", "report", "all"}, baseline

    template = built / "config" / "templates" / "synth_nli_entail.yaml"
    for path in (template, *(built / "results" / "ingest").rglob("*.parquet")):
        os.utime(path)  # newer mtime, same content
    assert planned(built) == baseline

    data = yaml.safe_load(template.read_text())
    data["templates"][0]["inputs"] += "\nAnswer with one of the options."
    template.write_text(yaml.safe_dump(data, sort_keys=False))
    replanned = planned(built)
    assert baseline <= replanned
    assert replanned - baseline == {
        "render_shard[dataset=synth_nli_entail, shard=natural-all]",
        "render_eval_shard[dataset=synth_nli_entail, variant=natural]",
        "render_eval_shard[dataset=synth_nli_entail, variant=natural-noopts]",
        "mix[run=heldout_sentiment]",  # the run that trains on it; heldout_nli's mixture is untouched
        "train_tokenizer[]",  # trained on every training shard...
        "pack[run=heldout_sentiment]",  # ...so both runs are re-tokenized
        "pack[run=heldout_nli]",
        "audit[run=heldout_sentiment]",  # its mixture changed
        "audit[run=heldout_nli]",  # the template file of the dataset it is scored on changed
    }


@pytest.mark.slow
def test_adding_an_eval_only_dataset_plans_only_its_evaluation(built: Path) -> None:
    """An evaluation-only entry added to the registry of a built run: its ingest, eval shards and its own
    evaluate jobs (flanpipe.plan.eval_plan.eval_group_name), and the audit of the run that scores it (every
    dataset a run is scored on is audited); nothing else upstream of training, no other evaluation."""
    config_file = built / "config" / "config.yaml"
    original = config_file.read_text()
    baseline = planned(built)
    extra = built / "config" / "registry" / "extra.yaml"
    entry = {  # the entailment set's synthetic source again, without a train split
        "cluster": "nli",
        "source": {"type": "local", "format": "jsonl", "path": "results/synthetic/synth_nli_entail/{split}.jsonl"},
        "splits": {"validation": "validation", "test": "test"},
        "fields": {"premise": "premise", "hypothesis": "hypothesis", "answer": "label"},
        "options": ["yes", "it is not possible to tell", "no"],
        "metric": "accuracy",
        "templates": "config/templates/synth_nli_entail.yaml",
    }
    extra.write_text(yaml.safe_dump({"datasets": {"rte_test_only": entry}}))
    cfg = yaml.safe_load(original)
    cfg["registry"].append("config/registry/extra.yaml")
    cfg["datasets"].append("rte_test_only")
    try:
        config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        replanned = planned(built)
    finally:
        config_file.write_text(original)
        extra.unlink()
    assert baseline <= replanned
    new = replanned - baseline
    own = {"ingest", "render_eval_shard", "evaluate", "eval_result"}
    assert own <= {j.split("[")[0] for j in new} <= own | {"audit"}, new
    assert "audit[run=heldout_nli]" in replanned  # new here, or already planned by an earlier edit of this module
    assert {j for j in new if "rte_test_only" not in j} <= {"audit[run=heldout_nli]"}, new  # nli's own job is kept


@pytest.mark.slow
def test_what_training_waits_on_is_scheduled_first(built: Path) -> None:
    """Rule priorities put the critical path first on a busy machine: a run's pack and audit (what its training
    waits on), then training, then everything else (evaluation above all, which would otherwise take the core a
    waiting run needs: the default DAG's second held-out run once started 64-80 s after the first)."""
    jobs: list[list] = []
    for line in snakemake(built, "--dry-run", "--forceall").splitlines():
        if m := JOB.match(line):
            jobs.append([m.group(1), 0])
        elif (m := re.match(r"^\s+priority: (\d+)$", line)) and jobs:
            jobs[-1][1] = int(m.group(1))
    by_rule: dict[str, set[int]] = {}
    for rule, priority in jobs:
        by_rule.setdefault(rule, set()).add(priority)
    assert by_rule["pack"] == by_rule["audit"] == {20}
    assert by_rule["train"] == {10}
    assert all(p == {0} for rule, p in by_rule.items() if rule not in {"pack", "audit", "train"}), by_rule
