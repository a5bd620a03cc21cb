"""Bad inputs caught when the DAG is planned (flanpipe.plan.experiments.plan_experiment calling flanpipe.plan.checks):
values checked against the runs and evaluations that will use them, before any job. An ablation's
problems fail only its own target (``Plan.check_ablation`` / ``Plan.check_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_inputs import (
    ROOT,
    TINY,
    assert_failed_before_any_job,
    base_checkpoint,
    default_config,
    dry_run,
    plan,
    registry_dir,
    write,
)

from flanpipe.core.registry import load_registry
from flanpipe.core.vocab import VocabError, parse_shard_name
from flanpipe.data.patterns import TemplateError
from flanpipe.data.templates import load_templates, templates_for_mode
from flanpipe.plan.checks import PlanError, PlanWarning


def test_overlaps_unknown_cluster(tmp_path: Path) -> None:
    """``overlaps: {nli: [paraphrse]}`` silently kept paraphrase in nli's training data."""
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=r"config key overlaps\.nli: unknown cluster\(s\) \['paraphrse'\]; the registry has "
        r"\['closed_book_qa', 'nli'\]",
    ):
        plan(tmp_path, overlaps={"nli": ["paraphrse"]})
    with pytest.raises(PlanError, match=r"config key overlaps\.nil: unknown cluster\(s\) \['nil'\]"):
        plan(tmp_path, overlaps={"nil": ["closed_book_qa"]})


def test_training_dataset_without_train_split(tmp_path: Path) -> None:
    """Failed with ``InputFunctionException ... KeyError: 'train'`` in the DAG. A dataset without a train
    split is now evaluation-only: never trained on, so here no training data is left, named as such."""
    registry_dir(tmp_path, extra="    splits: {validation: validation, test: test}\n")  # qa: no train
    with pytest.raises(PlanError, match=r"config key held_out: holding out 'nli' .* leaves no training data"):
        plan(tmp_path)


def test_evaluated_dataset_without_test_split(tmp_path: Path) -> None:
    registry_dir(tmp_path, extra="    splits: {train: train, validation: validation}\n")
    with pytest.raises(
        PlanError, match=r"dataset 'qa' has no 'test' split .* run 'heldout_closed_book_qa' is evaluated"
    ):
        plan(tmp_path, held_out=["closed_book_qa"])


def test_given_checkpoint_without_weights(tmp_path: Path) -> None:
    """A valid model.json over an empty checkpoint/ passed the DAG checks and failed in the training job."""
    registry_dir(tmp_path)
    ckpt = base_checkpoint(tmp_path, TINY)
    (ckpt / "checkpoint" / "metadata.json").unlink()
    with pytest.raises(
        PlanError, match=rf"config key base\.checkpoint: base checkpoint {ckpt} has no complete weights: .* \['metadata"
    ):
        plan(tmp_path, base={"checkpoint": str(ckpt)})


def test_ablations_not_asked_for_do_not_fail_the_main_plan(tmp_path: Path) -> None:
    """base.checkpoint, or a registry without the default's clusters, failed the main DAG on the default
    ablation blocks; each ablation's error now comes when its target is asked for."""
    registry_dir(tmp_path)
    ckpt = base_checkpoint(tmp_path, TINY)
    p = plan(tmp_path, base={"checkpoint": str(ckpt)}, ablations=default_config()["ablations"])
    assert p.runs["heldout_nli"].init == "base-tiny"
    with pytest.raises(PlanError, match=r"config key ablations\.scale\.checkpoints: base\.checkpoint is given"):
        p.check_ablation("scale")
    with pytest.raises(PlanError, match=r"ablations\.clusters\.order: unknown cluster\(s\)"):
        p.check_ablation("clusters")
    p.check_ablation("instructions")  # plannable ones are fine


def test_dag_with_base_checkpoint_plans_and_ablation_target_fails(tmp_path: Path) -> None:
    cfg = default_config()
    cfg["base"]["checkpoint"] = str(base_checkpoint(tmp_path, TINY))
    ok = dry_run(tmp_path / "w", cfg)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    r = dry_run(tmp_path / "w2", cfg, "ablation_scale")
    assert_failed_before_any_job(r, tmp_path / "w2", "config key ablations.scale.checkpoints", "micro.yaml")


def test_scale_checkpoints_naming_no_model(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    ckpt = str(base_checkpoint(tmp_path, TINY))
    scale = {"models": [str(TINY)], "checkpoints": {str(TINY): ckpt, "config/models/tiny.yml": ckpt}}
    p = plan(tmp_path, base={"checkpoint": ckpt}, ablations={"scale": scale})
    with pytest.raises(PlanError, match=r"ablations\.scale\.checkpoints: \['config/models/tiny\.yml'\] are not in"):
        p.check_ablation("scale")


def test_template_count_larger_than_a_dataset_has(tmp_path: Path) -> None:
    """Asking for 4 templates of a dataset with 2 silently trained on 2 (and 3 and 4 on the same data)."""
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=r"config key templates\.num_templates: 3 templates per dataset asked for \(run 'heldout_nli'\), but "
        r"dataset 'qa' has only 1",
    ):
        plan(tmp_path, templates={"num_templates": 3})
    p = plan(tmp_path, held_out=["closed_book_qa"], ablations={"templates": {"counts": [1, 4]}})
    with pytest.raises(PlanError, match=r"ablations\.templates\.counts: 4 templates .* dataset 'nli_a' has only 2"):
        p.check_ablation("templates")


def test_zero_template_shard_is_a_clear_error(tmp_path: Path) -> None:
    """``natural-0`` gave a raw IndexError."""
    with pytest.raises(VocabError, match=r"'natural-0': the template count must be >= 1"):
        parse_shard_name("natural-0")
    reg = registry_dir(tmp_path)
    spec = load_registry([reg])["nli_a"]
    with pytest.raises(TemplateError, match=rf"{spec.templates}: dataset 'nli_a': 0 templates asked for, but the file"):
        templates_for_mode(load_templates(spec.templates), spec, "natural", 0)


def test_fewshot_without_a_base_model_warns(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.warns(PlanWarning, match=r"base\.fewshot = 2 has no effect: there is no base model"):
        plan(tmp_path, base={"fewshot": 2, "pretrain_steps": 0})


def test_duplicate_key_in_snakemake_configfile(tmp_path: Path) -> None:
    """Snakemake parses --configfile itself and kept the last of two equal keys."""
    work = tmp_path / "w"
    text = (ROOT / "config" / "config.yaml").read_text() + "held_out: [sentiment]\n"
    write(work / "dup.yaml", text)
    r = dry_run(work, json.loads(json.dumps(default_config())), "--configfile", "dup.yaml")
    assert_failed_before_any_job(r, work, "dup.yaml:", "duplicate key 'held_out' (first at line")
