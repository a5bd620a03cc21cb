"""config/t0.yaml on local fixtures: T0's task types, its held-out types, its cap rule, P3-format templates.

The T0-only registry entries (config/registry/t0) read tests/fixtures/t0 (written by its make_fixtures.py), the
catalogue ones tests/fixtures/flan; a mirror directory of symlinks joins the two for data.local_mirror.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from flanpipe.config import load_config
from flanpipe.experiments import plan_experiment
from flanpipe.ingest import ingest_split
from flanpipe.io import read_yaml
from flanpipe.mixing import MixtureConfig, build_mixture, dataset_cap
from flanpipe.registry import ROLES, load_registry
from flanpipe.templates import load_validated, render_eval_shard, render_shard

ROOT = Path(__file__).resolve().parent.parent
T0_FIXTURES = ROOT / "tests" / "fixtures" / "t0"
FLAN_FIXTURES = ROOT / "tests" / "fixtures" / "flan"
T0_CONFIG = ROOT / "config" / "t0.yaml"
T0_ONLY = sorted(load_registry(["config/registry/t0/*.yaml"]))
HELD_OUT = {"nli", "coreference", "sentence_completion", "word_sense"}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("t0_mirror")
    for name in load_config(T0_CONFIG)["datasets"]:
        src = T0_FIXTURES / name if name in T0_ONLY else FLAN_FIXTURES / name
        (root / name).symlink_to(src, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def plan(mirror: Path):  # noqa: ANN201
    config = load_config(T0_CONFIG)
    config["data"]["local_mirror"] = str(mirror)
    return plan_experiment(config)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fixtures_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_t0_fixtures", T0_FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.BUILDERS) == T0_ONLY
    for name in T0_ONLY:
        for role in ROLES:
            assert jsonl(T0_FIXTURES / name / f"{role}.jsonl") == module.rows(name, role), (name, role)


def test_plan_holds_out_t0_task_types_from_one_training_mixture(plan) -> None:  # noqa: ANN001
    clusters = {s.cluster for s in plan.registry.values()}
    assert clusters == HELD_OUT | {
        "multiple_choice_qa",
        "extractive_qa",
        "closed_book_qa",
        "struct_to_text",
        "sentiment",
        "summarization",
        "topic_classification",
        "paraphrase",
    }
    assert plan.registry["cosmos_qa"].cluster == "multiple_choice_qa"  # config clusters: overrides FLAN's
    assert plan.registry["wic"].cluster == "word_sense"
    assert sorted(plan.runs) == [f"heldout_{c}" for c in sorted(HELD_OUT)]
    training = {tuple(sorted(r.datasets)) for r in plan.runs.values()}
    assert len(training) == 1  # T0's single training mixture, whichever type is evaluated
    (datasets,) = training
    assert len(datasets) == 22 and not {plan.registry[d].cluster for d in datasets} & HELD_OUT
    evaluated = {e.dataset for e in plan.evaluations}
    assert {plan.registry[d].cluster for d in evaluated} == HELD_OUT
    assert all(plan.registry[d].has_options for d in evaluated)  # rank classification everywhere
    assert all(t.kind == "jinja" for d in T0_ONLY for t in plan.templates.get(d, load_validated(plan.registry[d])))


@pytest.mark.parametrize("name", T0_ONLY)
def test_t0_entries_ingest_and_render_with_their_own_answer_choices(name: str, plan, tmp_path: Path) -> None:  # noqa: ANN001
    spec = plan.registry[name]
    paths = {}
    for role in ROLES:
        paths[role] = tmp_path / f"{role}.parquet"
        ingest_split(spec, role, paths[role])
    report = render_shard(spec, paths["train"], tmp_path / "train.parquet")
    train = pl.read_parquet(tmp_path / "train.parquet")
    assert report["rows"] == train.height == 4
    assert train["inputs"].str.len_chars().min() > 0 and train["targets"].str.len_chars().min() > 0  # type: ignore[operator]
    out = tmp_path / "eval.parquet"
    render_eval_shard(spec, {"validation": paths["validation"], "test": paths["test"]}, out)
    frame = pl.read_parquet(out)
    assert frame.height == 2 * 6
    for target, options in zip(frame["targets"], frame["options"].to_list(), strict=True):
        if spec.has_options:
            assert target in options  # the template's own choices, rendered per example, hold the target
        else:
            assert options == []  # generation (F1)
    assert "|||" not in "".join(frame["inputs"])


def test_t0_cap_rule_500k_over_prompts(tmp_path: Path) -> None:
    cfg = MixtureConfig(**read_yaml(T0_CONFIG)["mixture"])
    assert [dataset_cap(cfg, k) for k in (1, 2, 8, 10)] == [500000, 250000, 62500, 50000]
    assert dataset_cap(MixtureConfig(cap=30000), 10) == 30000  # FLAN: off
    # on shards: 2 templates and a budget of 6 keep 3 examples; 3 templates keep 2
    shards = {}
    for name, k in (("two", 2), ("three", 3)):
        n = 12
        df = pl.DataFrame(
            {
                "dataset": [name] * n,
                "cluster": ["c"] * n,
                "split": ["train"] * n,
                "example_id": list(range(n)),
                "template_id": [i % k for i in range(n)],
                "turned_around": [False] * n,
                "inputs": ["x" * 40] * n,
                "targets": ["y"] * n,
                "options": [[]] * n,
            },
            schema_overrides={"template_id": pl.Int32, "options": pl.List(pl.Utf8)},
        )
        shards[name] = tmp_path / f"{name}.parquet"
        df.write_parquet(shards[name])
    stats = build_mixture(
        shards,
        MixtureConfig(cap=100, max_rate=100, prompt_budget=6),
        tmp_path / "mix.parquet",
        tmp_path / "mix.json",
        budget_tokens=10_000,
        inputs_length=64,
        targets_length=8,
    )
    rows = {r["dataset"]: r for r in stats["datasets"]}
    assert (rows["two"]["available"], rows["two"]["capped"]) == (12, 3)
    assert (rows["three"]["available"], rows["three"]["capped"]) == (12, 2)
    mix = pl.read_parquet(tmp_path / "mix.parquet")
    assert set(mix.filter(pl.col("dataset") == "two")["example_id"]) == {0, 1, 2}  # first 3 (cap_mode first)


def test_dry_run_plans_t0(mirror: Path, plan, tmp_path: Path) -> None:  # noqa: ANN001
    raw = read_yaml(T0_CONFIG)
    raw["data"] = {**(raw.get("data") or {}), "local_mirror": str(mirror)}
    (tmp_path / "t0.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path)]
    cmd += ["--configfile", str(tmp_path / "t0.yaml"), "--cores", "2", "-n"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout + done.stderr
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    stats = {line.split()[0]: int(line.split()[1]) for line in table.strip().splitlines()[2:] if line.strip()}
    assert stats["render_shard"] == 22  # the training datasets only
    assert stats["train"] == stats["mix"] == 4
    assert stats["eval_result"] == len(plan.evaluations)  # one result file per (model, variant, dataset)
    groups = {(e.run, e.variant, plan.registry[e.dataset].cluster) for e in plan.evaluations}
    assert stats["evaluate"] == len(groups)  # one model load per (model, variant, cluster)


def test_cluster_override_names_unknown_datasets(mirror: Path) -> None:
    from flanpipe.experiments import PlanError

    config = load_config(T0_CONFIG)
    config["data"]["local_mirror"] = str(mirror)
    config["clusters"] = {**config["clusters"], "not_a_dataset": "nli"}
    with pytest.raises(PlanError, match=r"config key clusters: unknown dataset\(s\) \['not_a_dataset'\]"):
        plan_experiment(config)
