"""Evaluation-only registry entries: scored by the runs that hold out their cluster, never trained on."""

from __future__ import annotations

import copy

import pytest
import yaml

from flanpipe.core.io import resolve_config_path
from flanpipe.core.registry import RegistryError, load_registry
from flanpipe.core.vocab import EvalVariant
from flanpipe.plan.config import load_config, validate_config
from flanpipe.plan.eval_plan import eval_group_name
from flanpipe.plan.experiments import plan_experiment

# RTE's synthetic stand-in again, without a train split: what a test-only benchmark looks like in the registry
EXTRA = {
    "cluster": "nli",
    "source": {"type": "local", "format": "jsonl", "path": "results/synthetic/synth_nli_rte/{split}.jsonl"},
    "splits": {"validation": "validation", "test": "test"},
    "fields": {"premise": "sentence1", "hypothesis": "sentence2", "answer": "label"},
    "options": ["yes", "no"],
    "metric": "accuracy",
    "templates": "config/templates/synth_nli_rte.yaml",
}


def _registry(tmp_path, **extra) -> str:
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"rte_test_only": {**EXTRA, **extra}}}))
    return str(path)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    cfg = copy.deepcopy(load_config(resolve_config_path("config/config.yaml")))
    cfg["registry"] = [*cfg["registry"], _registry(tmp_path_factory.mktemp("eval_only"))]
    cfg["ablations"] = {}
    return validate_config(cfg)


def test_no_train_split_means_evaluation_only(tmp_path) -> None:
    spec = load_registry([_registry(tmp_path)])["rte_test_only"]
    assert spec.eval_only and eval_group_name(spec) == "nli__rte_test_only"
    marked = load_registry(
        [_registry(tmp_path, splits={"train": "train", "validation": "validation", "test": "test"}, eval_only=True)]
    )
    assert marked["rte_test_only"].eval_only
    with pytest.raises(RegistryError, match="rte_test_only.*needs both 'validation' and 'test'"):
        load_registry([_registry(tmp_path, splits={"test": "test"})])


def test_scored_by_its_held_out_run_never_trained_on(config) -> None:
    plan = plan_experiment(config)
    scored = {(e.run, e.variant) for e in plan.evaluations if e.dataset == "rte_test_only"}
    assert {r for r, _ in scored} == {"heldout_nli", "base-tiny"}  # the run holding out nli, and the base
    assert all(EvalVariant.parse(v).shots == 0 for _, v in scored)  # few-shot exemplars need a train split
    for run in plan.runs.values():  # no mixture, base-LM text or (so) tokenizer sample holds it
        assert "rte_test_only" not in run.datasets
    assert not any("rte_test_only" in p for p in plan.tokenizer_shards())
    assert "rte_test_only" not in plan.audited_datasets("heldout_nli")  # training must not wait on it

    everywhere = plan_experiment(validate_config({**config, "eval": {**config["eval"], "eval_only_all_runs": True}}))
    runs = {e.run for e in everywhere.evaluations if e.dataset == "rte_test_only"}
    assert runs == {"heldout_nli", "heldout_sentiment", "base-tiny"}
    assert len(everywhere.evaluations) == len(set(everywhere.evaluations))
