"""One vocabulary: the schema, the planner, the report and the rules spell run roles, modes and names alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dag import ROOT

from flanpipe.core.io import read_yaml
from flanpipe.core.vocab import (
    ABLATIONS,
    INSTRUCTION_MODES,
    EvalVariant,
    RunKind,
    RunRole,
    VocabError,
    parse_shard_name,
    role_of_run_name,
    shard_name,
)
from flanpipe.plan.config import SCHEMA_PATH, load_config
from flanpipe.plan.experiments import plan_experiment
from flanpipe.plan.runs import Run
from flanpipe.report.tables import records_from_paths

CONFIG = ROOT / "config" / "config.yaml"


def test_schema_enums_are_the_vocabulary() -> None:
    schema = read_yaml(SCHEMA_PATH)["properties"]
    templates = schema["templates"]["properties"]
    assert templates["train_mode"]["enum"] == list(INSTRUCTION_MODES) == templates["eval_mode"]["enum"]
    ablations = schema["ablations"]["properties"]
    assert tuple(ablations) == ABLATIONS
    setting = ablations["instructions"]["properties"]["settings"]["items"]["properties"]
    assert setting["train"]["enum"] == setting["eval"]["enum"] == list(INSTRUCTION_MODES)


def test_names_round_trip() -> None:
    for name in ("natural", "natural-noopts", "no_template-2shot", "dataset_name-noopts-3shot"):
        assert EvalVariant.parse(name).name == name
    assert EvalVariant.parse("natural-noopts-2shot") == EvalVariant("natural", False, 2)
    for mode, k in (("natural", None), ("natural", 4), ("no_template", None), ("lm", None)):
        assert parse_shard_name(shard_name(mode, k)) == (mode, k)
    with pytest.raises(VocabError, match="unknown eval variant"):
        EvalVariant.parse("lm")
    with pytest.raises(VocabError, match="unknown training shard"):
        parse_shard_name("natural-some")


def test_run_roles_read_off_names_match_the_plan() -> None:
    """The report reads a role off a run's name when it has no plan: the planner's names must agree."""
    plan = plan_experiment(load_config(CONFIG))
    kinds = {r.kind for r in plan.runs.values()}
    assert kinds == {RunKind.TUNE, RunKind.PRETRAIN}
    for run in plan.runs.values():
        assert role_of_run_name(run.name) is run.role
        assert run.role is (RunRole.TUNED if run.kind is RunKind.TUNE else RunRole.BASE)
    main = {r.name for r in plan.runs.values() if r.is_main}
    assert main == {"heldout_nli", "heldout_sentiment"}
    assert Run("b", "m.yaml", kind="given").kind is RunKind.GIVEN


def test_record_meta_of_each_ablation() -> None:
    """What rules report/ablation pass the report: the x of each ablation read off its run."""
    plan = plan_experiment(load_config(CONFIG))
    values = {a: {plan.record_meta(e, a)["ablation_value"] for e in es} for a, es in plan.ablations.items()}
    assert values["clusters"] == {1, 2, 4}
    assert values["templates"] == {1, 2, 4}
    assert values["instructions"] == {
        "natural->natural",
        "no_template->natural",
        "dataset_name->natural",
        "dataset_name->dataset_name",
    }
    assert len(values["scale"]) == 2 and all(isinstance(v, int) and v > 0 for v in values["scale"])
    meta = plan.record_meta(plan.evaluations[0])
    assert "ablation_value" not in meta and meta["role"] in {"tuned", "base"} and type(meta["role"]) is str


def test_report_role_from_path(tmp_path) -> None:  # noqa: ANN001
    for run in ("base-tiny", "heldout_nli__micro"):
        p = tmp_path / run / "natural" / "rte.json"
        p.parent.mkdir(parents=True)
        p.write_text('{"dataset": "rte", "cluster": "nli"}', encoding="utf-8")
    roles = {r["run"]: r["role"] for r in records_from_paths(sorted(tmp_path.glob("*/*/*.json")))}
    assert roles == {"base-tiny": "base", "heldout_nli__micro": "tuned"}


def test_planning_never_imports_torch() -> None:
    """What rules/common.smk imports, and planning itself, stay torch- and Megatron-free (snakemake -n)."""
    code = (
        "import sys\n"
        "from flanpipe.plan.config import check_world, validate_config, load_config\n"
        "from flanpipe.plan.experiments import plan_experiment\n"
        "from flanpipe.data.ingest import check_local_source\n"
        "from flanpipe.core.io import resolve_config_path\n"
        "from flanpipe.core import vocab\n"
        f"plan = plan_experiment(load_config({str(CONFIG)!r}))\n"
        "[plan.record_meta(e, a) for a, es in plan.ablations.items() for e in es]\n"
        "[plan.train_spec(r) for r in plan.mixtures]\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'snakemake'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
