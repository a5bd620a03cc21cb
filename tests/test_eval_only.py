"""Evaluation-only registry entries: scored by the runs that hold out their cluster, never trained on."""

from __future__ import annotations

import copy
import warnings

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
    assert "rte_test_only" in plan.audited_datasets("heldout_nli")  # every dataset a run is scored on
    assert "rte_test_only" in plan.audited_datasets("base-tiny")
    assert "rte_test_only" not in plan.audited_datasets("heldout_sentiment")  # it does not score it

    everywhere = plan_experiment(validate_config({**config, "eval": {**config["eval"], "eval_only_all_runs": True}}))
    runs = {e.run for e in everywhere.evaluations if e.dataset == "rte_test_only"}
    assert runs == {"heldout_nli", "heldout_sentiment", "base-tiny"}
    assert len(everywhere.evaluations) == len(set(everywhere.evaluations))


def test_unscored_eval_only_dataset_is_named(config) -> None:
    """An eval-only entry in a cluster no run holds out (and eval_only_all_runs false) appeared nowhere in the
    plan, with no word."""
    from flanpipe.plan.checks import PlanWarning

    quiet = {**config, "held_out": ["sentiment"]}
    with pytest.warns(PlanWarning, match=r"evaluation-only dataset\(s\) \['rte_test_only'\] are scored by no run.*"
                      r"\['nli'\].*eval.eval_only_all_runs: true"):  # fmt: skip
        plan = plan_experiment(validate_config(quiet))
    assert not any(e.dataset == "rte_test_only" for e in plan.evaluations)
    everywhere = {**quiet, "eval": {**config["eval"], "eval_only_all_runs": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        plan = plan_experiment(validate_config(everywhere))  # scored now: no warning
    assert {e.run for e in plan.evaluations if e.dataset == "rte_test_only"} == {"heldout_sentiment", "base-tiny"}


def test_eval_only_entry_built_from_a_training_split_is_reported_contaminated(config, tmp_path) -> None:
    """An eval-only entry whose examples are another dataset's training examples: the run trained on them
    scored them with no contamination reported, because eval-only datasets were left out of every audit."""
    import polars as pl

    from flanpipe.data.contamination import audit_contamination

    plan = plan_experiment(config)
    run = "base-tiny"  # pretrained on every trainable dataset's train text, and it scores rte_test_only
    assert "synth_nli_rte" in plan.runs[run].datasets and "rte_test_only" in plan.audited_datasets(run)
    sentences = [
        f"the committee number {i} approved the new budget for the northern district schools" for i in range(6)
    ]
    mixture = pl.DataFrame({"dataset": ["synth_nli_rte"] * 6, "inputs": sentences, "targets": ["yes"] * 6})
    mixture.write_parquet(tmp_path / "mixture.parquet")
    for split in ("validation", "test"):  # the eval-only entry's rows: the same sentences
        pl.DataFrame({"example_id": range(6), "sentence1": sentences, "sentence2": ["x"] * 6}).write_parquet(
            tmp_path / f"{split}.parquet"
        )
    splits = {
        d: {s: str(tmp_path / f"{s}.parquet") for s in ("validation", "test")} for d in plan.audited_datasets(run)
    }
    report = audit_contamination(tmp_path / "mixture.parquet", {"rte_test_only": splits["rte_test_only"]}, {})
    leaked = report["datasets"]["rte_test_only"]
    assert leaked["splits"]["test"]["contaminated"] == 6 and leaked["contaminated_fraction"] == 1.0, leaked
    assert not report["passed"] and report["leaking_train_datasets"] == {"synth_nli_rte": 6}, report
