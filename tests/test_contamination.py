"""Contamination audit: planted overlaps are found exactly, disjoint data gives none."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from flanpipe.data.contamination import (
    AuditConfig,
    ContaminationError,
    audit_contamination,
    ngram_hashes,
    run_audit,
    word_hashes,
)
from flanpipe.data.patterns import Template

LEAK_A = "the quick brown fox jumps over the lazy dog near the old river bank today"  # 15 words
LEAK_B = "seven silver spoons were found beneath a wooden floor in the abandoned mill"  # 13 words
NEAR = "purple clouds drifted slowly over twelve quiet hills while farmers watched the"  # 12 of 13 shared


def _filler(i: int, n: int = 20) -> str:
    """Text no other filler shares a 13-gram with (every word carries its row and position)."""
    return " ".join(f"w{i}x{j}" for j in range(n))


def _write_eval(tmp_path, split: str, premises: list[str], hypotheses: list[str]) -> str:
    path = tmp_path / f"held_{split}.parquet"
    pl.DataFrame(
        {
            "example_id": list(range(len(premises))),
            "premise": premises,
            "hypothesis": hypotheses,
            "answer": ["yes"] * len(premises),
        }
    ).write_parquet(path)
    return str(path)


def _setup(tmp_path, train_inputs: list[str], train_targets: list[str]):
    mixture = tmp_path / "mixture.parquet"
    pl.DataFrame(
        {
            "dataset": [f"train{i % 2}" for i in range(len(train_inputs))],
            "inputs": train_inputs,
            "targets": train_targets,
        }
    ).write_parquet(mixture)
    val_p = [_filler(100 + i) for i in range(8)]
    val_h = [_filler(200 + i) for i in range(8)]
    test_p = [_filler(300 + i) for i in range(8)]
    test_h = [_filler(400 + i) for i in range(8)]
    test_p[3] = "The QUICK brown fox, jumps over the 'lazy' dog near the old river bank today!"  # normalises to LEAK_A
    val_h[5] = LEAK_B
    test_h[6] = NEAR + " end"
    splits = {
        "held": {
            "validation": _write_eval(tmp_path, "validation", val_p, val_h),
            "test": _write_eval(tmp_path, "test", test_p, test_h),
        }
    }
    templates = {
        "held": [
            Template(0, "{premise}\nDoes the premise above entail the stated hypothesis?\n{hypothesis}", "{answer}"),
            Template(1, "Read this carefully and then decide whether it follows: {premise} {hypothesis}", "{answer}"),
            Template(2, "Write a premise that entails {hypothesis}", "{premise}", turned_around=True),
        ]
    }
    return mixture, splits, templates


def test_planted_overlaps_found_exactly(tmp_path):
    inputs = [_filler(i) for i in range(50)]
    targets = [_filler(1000 + i, 3) for i in range(50)]
    inputs[7] = f"Context: {LEAK_A.upper()} and more"  # example leak inside a training prompt
    targets[20] = LEAK_B + "."  # example leak inside a training target
    inputs[30] = "Some other task. " + NEAR  # 12 shared words only: below the 13-gram
    inputs[41] = "Q: does the premise above entail the stated hypothesis? OPTIONS: yes no"  # template 0's text
    mixture, splits, templates = _setup(tmp_path, inputs, targets)

    report = audit_contamination(mixture, splits, templates, AuditConfig(ngram=13, template_ngram=6))
    held = report["datasets"]["held"]
    assert held["splits"]["test"]["contaminated_ids"] == [3]
    assert held["splits"]["validation"]["contaminated_ids"] == [5]
    assert held["examples"] == 16 and held["contaminated"] == 2
    assert held["contaminated_fraction"] == pytest.approx(2 / 16)
    assert held["templates_seen"] == [0]
    assert held["scored_templates_seen_fraction"] == pytest.approx(1 / 2)  # template 2 is turned around
    assert report["leaking_train_datasets"] == {"train0": 1, "train1": 1}  # leaking rows 7 and 20
    assert report["mixture_rows"] == 50 and report["passed"]


def test_disjoint_data_has_no_overlap(tmp_path):
    inputs = [_filler(i) for i in range(50)]
    targets = [_filler(1000 + i, 3) for i in range(50)]
    mixture, splits, templates = _setup(tmp_path, inputs, targets)
    report = audit_contamination(mixture, splits, templates, AuditConfig(batch_rows=7))
    held = report["datasets"]["held"]
    assert held["contaminated"] == 0 and held["templates_seen"] == []
    assert held["splits"]["test"]["contaminated_ids"] == [] and report["leaking_train_datasets"] == {}


def test_batches_do_not_change_the_result(tmp_path):
    inputs = [_filler(i) for i in range(50)]
    targets = [_filler(1000 + i, 3) for i in range(50)]
    inputs[49] = LEAK_A
    mixture, splits, templates = _setup(tmp_path, inputs, targets)
    a = audit_contamination(mixture, splits, templates, AuditConfig(batch_rows=3))
    b = audit_contamination(mixture, splits, templates, AuditConfig(batch_rows=1000))
    assert a["datasets"] == b["datasets"] and a["datasets"]["held"]["splits"]["test"]["contaminated_ids"] == [3]


def test_threshold_fails_the_run_and_keeps_the_report(tmp_path):
    inputs = [_filler(i) for i in range(50)]
    targets = [_filler(1000 + i, 3) for i in range(50)]
    inputs[0], inputs[1] = LEAK_A, LEAK_B
    mixture, splits, _ = _setup(tmp_path, inputs, targets)
    tfile = tmp_path / "t.yaml"
    tfile.write_text('templates:\n  - inputs: "{premise} {hypothesis}"\n    targets: "{answer}"\n')
    out = tmp_path / "audit.json"
    with pytest.raises(ContaminationError, match="held: 2/16"):
        run_audit(mixture, splits, {"held": tfile}, out, AuditConfig(max_contaminated_fraction=0.1))
    assert not out.exists()
    assert json.loads((tmp_path / "audit.json.failed.json").read_text())["passed"] is False
    report = run_audit(mixture, splits, {"held": tfile}, out, AuditConfig(max_contaminated_fraction=0.125))
    assert report["passed"] and json.loads(out.read_text())["datasets"]["held"]["contaminated"] == 2


def test_ngram_hashes_stay_inside_one_text():
    words, doc = word_hashes(pl.Series(["a b c", "Hello, WORLD!", "x y  z  w"]))
    assert doc.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    h, owner = ngram_hashes(words, doc, 3)
    assert owner.tolist() == [0, 2, 2]  # "a b c", "x y z", "y z w": none straddles two texts
    again, _ = ngram_hashes(*word_hashes(pl.Series(["hello world", "X Y Z"])), 3)
    assert again.tolist() == [h[1]]  # normalised: same words -> same hash
    assert len(np.unique(h)) == 3


def test_cli_and_bench_find_the_planted_leaks(tmp_path):
    from flanpipe.bench.audit import run_bench
    from flanpipe.cli import build_parser
    from flanpipe.cli_audit import cmd_audit, cmd_bench_audit

    args = build_parser().parse_args(["audit", "heldout_nli", "--out", "x.json"])
    assert args.fn is cmd_audit and args.ingest == "results/ingest"
    assert build_parser().parse_args(["bench", "audit", "--examples", "10"]).fn is cmd_bench_audit
    result = run_bench(examples=3000, eval_examples=20, leaks=4, workdir=tmp_path)
    assert result["examples"] == 3000 and result["planted"] == 4 and result["found_exactly_planted"]


def test_instruction_free_evaluations_get_no_template_check():
    """A dataset scored only in no_template / dataset_name mode has no instruction text to leak: it is
    audited for leaked examples but not for seen templates; one also scored with natural prompts gets both."""
    import dataclasses

    from flanpipe.core.io import resolve_config_path
    from flanpipe.core.vocab import EvalVariant
    from flanpipe.plan.config import load_config
    from flanpipe.plan.experiments import plan_experiment

    plan = plan_experiment(load_config(resolve_config_path("config/config.yaml")))
    run = "heldout_nli__train-dataset_name"  # instructions ablation: scored dataset_name -> natural and -> dataset_name
    ablation = plan.ablations["instructions"]
    assert {EvalVariant.parse(e.variant).mode for e in ablation if e.run == run} == {"natural", "dataset_name"}
    assert plan.template_audited_datasets(run) == plan.audited_datasets(run) != []
    free = [e for e in ablation if not (e.run == run and EvalVariant.parse(e.variant).mode == "natural")]
    only_free = dataclasses.replace(plan, ablations={**plan.ablations, "instructions": free})
    assert only_free.audited_datasets(run) == plan.audited_datasets(run)
    assert only_free.template_audited_datasets(run) == []
