"""The whole FLAN config (config/flan137b.yaml, 65 registry entries) on local fixtures, with no hub access.

tests/fixtures/flan/<dataset>/<role>.jsonl hold a few invented rows shaped like each real source (field
names, nesting, label sets; written by tests/fixtures/flan/make_fixtures.py). Config data.local_mirror points
every dataset at them; each one is ingested, rendered into its training shard and its eval shards, and the
DAG is planned (and partly run) through Snakemake.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml
from dag import ROOT, run_snakemake
from dag import read_jsonl as jsonl

from flanpipe.core.io import read_yaml
from flanpipe.core.registry import ROLES, load_registry
from flanpipe.data.ingest import REFERENCES, ingest_split
from flanpipe.data.templates import load_validated, render_eval_shard, render_shard
from flanpipe.plan.config import dataset_spec, load_config
from flanpipe.plan.eval_plan import eval_groups
from flanpipe.plan.experiments import Plan, plan_experiment

FIXTURES = ROOT / "tests" / "fixtures" / "flan"
FLAN_CONFIG = ROOT / "config" / "flan137b.yaml"
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# Rows the real sources have and ingest must drop (bad_rows: drop in the entry): SNLI's label -1,
# Sentiment140's neutral tweets (test split only).
DROPPED = {("snli", "train"): {"null answer": 1}, ("sent140", "test"): {"null answer": 1}}


def mirrored_config() -> dict:
    config = load_config(FLAN_CONFIG)
    config["data"]["local_mirror"] = str(FIXTURES)
    return config


CONFIG = mirrored_config()
PLAN: Plan = plan_experiment(CONFIG)


def test_every_registry_entry_has_fixtures() -> None:
    assert len(PLAN.registry) == 65
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(PLAN.registry)
    for name in PLAN.registry:
        for role in ROLES:
            assert 3 <= len(jsonl(FIXTURES / name / f"{role}.jsonl")) <= 6, (name, role)


def test_fixtures_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in PLAN.registry:
        for role in ROLES:
            assert jsonl(FIXTURES / name / f"{role}.jsonl") == module.rows(name, role), (name, role)


def test_local_mirror_replaces_every_source() -> None:
    original = load_registry(CONFIG["registry"])
    assert {s.source.type for s in original.values()} == {"hf", "local"}
    for name, spec in PLAN.registry.items():
        assert spec.source.type == "local" and spec.source.format == "jsonl"
        assert spec.source.path == f"{FIXTURES}/{name}/{{split}}.jsonl"
        assert dict(spec.splits) == {r: r for r in ROLES}
        assert spec.fields == original[name].fields and spec.options == original[name].options
    for name in ("rte", "story_cloze", "squad_v1"):  # hf, local and hf with nested columns
        assert dataset_spec(CONFIG, name) == PLAN.registry[name]  # what the rule scripts see
    unmirrored = load_config(FLAN_CONFIG)
    assert unmirrored["data"]["local_mirror"] is None
    assert dataset_spec(unmirrored, "rte") == original["rte"]


def assert_rendered(frame: pl.DataFrame, where: str) -> None:
    assert frame.height > 0, where
    for column in ("inputs", "targets"):
        values = frame[column]
        assert values.null_count() == 0, (where, column)
        for text in values:
            assert text.strip(), (where, column, "empty")
            assert not PLACEHOLDER.search(text), (where, column, text)


@dataclass
class Ingested:
    paths: dict[str, Path]
    rows: dict[str, int]


def ingest_all(name: str, tmp_path: Path) -> Ingested:
    """Every role, eval splits first: as in the DAG, train is checked against them (split hygiene)."""
    spec = PLAN.registry[name]
    paths, rows = {}, {}
    for role in ("validation", "test", "train"):
        raw = jsonl(FIXTURES / name / f"{role}.jsonl")
        paths[role] = tmp_path / f"{role}.parquet"
        evals = {r: paths[r] for r in ("validation", "test")} if role == "train" else None
        report = ingest_split(spec, role, paths[role], policy=CONFIG["data"]["bad_rows"], eval_splits=evals)
        assert report["dropped"] == DROPPED.get((name, role), {}), (name, role, report)
        assert report["rows"] + sum(report["dropped"].values()) == len(raw)
        hygiene = report["split_hygiene"]
        assert hygiene["duplicates_within"] == 0 and not any(hygiene.get("duplicates_with", {}).values()), hygiene
        canon = pl.read_parquet(paths[role])
        # several acceptable answers (a list column): the first is the target, all are kept as references
        refs = REFERENCES in canon.columns
        assert canon.columns == ["example_id", *spec.fields, *([REFERENCES] if refs else [])]
        if refs:
            assert canon["answer"].to_list() == canon[REFERENCES].list.first().to_list()
        if spec.options is not None:
            assert set(canon["answer"]) <= set(spec.options), (name, role)
        if spec.options_field is not None:
            assert all(a in opts for a, opts in zip(canon["answer"], canon[spec.options_field], strict=True))
        rows[role] = canon.height
    return Ingested(paths, rows)


@pytest.mark.parametrize("name", sorted(PLAN.registry))
def test_ingest_and_render(name: str, tmp_path: Path) -> None:
    spec = PLAN.registry[name]
    data = ingest_all(name, tmp_path)

    shard = tmp_path / "train.natural-all.parquet"
    report = render_shard(spec, data.paths["train"], shard, mode="natural")
    train = pl.read_parquet(shard)
    assert report["rows"] == train.height == data.rows["train"]
    assert report["templates"] == [t.index for t in load_validated(spec)]
    assert_rendered(train, f"{name} train")

    eval_inputs = {role: data.paths[role] for role in ("validation", "test")}
    scored = sum(not t.turned_around for t in load_validated(spec))
    for options_in_prompt in (True, False) if spec.has_options else (True,):
        out = tmp_path / f"eval.{options_in_prompt}.parquet"
        render_eval_shard(spec, eval_inputs, out, mode="natural", options_in_prompt=options_in_prompt)
        frame = pl.read_parquet(out)
        where = f"{name} eval options_in_prompt={options_in_prompt}"
        assert frame.height == scored * (data.rows["validation"] + data.rows["test"]), where
        assert not frame["turned_around"].any()
        assert_rendered(frame, where)
        if spec.has_options:
            for target, options in zip(frame["targets"], frame["options"], strict=True):
                assert target in options, (where, target, options)
            shown = frame["inputs"].str.contains("OPTIONS:\n- ", literal=True)
            assert shown.any() if options_in_prompt else not shown.any(), where
        else:
            assert frame["options"].list.len().max() == 0, where


def test_documented_gaps_stay_visible(tmp_path: Path) -> None:
    """Known limitations written in the registry entries (misc.yaml), pinned so a fix shows up here."""
    math = tmp_path / "math.parquet"
    ingest_split(PLAN.registry["math_dataset"], "train", math)
    assert all(a.startswith("b'") and a.endswith("\\n'") for a in pl.read_parquet(math)["answer"])  # bytes repr
    quac = tmp_path / "quac.parquet"
    ingest_split(PLAN.registry["quac"], "train", quac)
    raw = jsonl(FIXTURES / "quac" / "train.jsonl")
    assert pl.read_parquet(quac)["question"].to_list() == [r["questions"][0] for r in raw]  # first turn only


def job_stats(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)}


@pytest.fixture(scope="module")
def dag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose config is flan137b.yaml plus data.local_mirror (a nested --config would
    replace the whole `data` mapping, so the mirror goes into a config file of its own)."""
    workdir = tmp_path_factory.mktemp("flan_dag")
    raw = read_yaml(FLAN_CONFIG)
    raw["data"] = {**(raw.get("data") or {}), "local_mirror": str(FIXTURES)}
    (workdir / "flan.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return workdir


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_snakemake(workdir, workdir / "flan.yaml", "--cores", "2", *args, timeout=300)


def test_dry_run_plans_every_dataset_from_the_mirror(dag_dir: Path) -> None:
    done = snakemake(dag_dir, "-n")
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout + done.stderr
    stats = job_stats(out)
    held_out = [d for d, s in PLAN.registry.items() if s.cluster in CONFIG["held_out"]]
    runs = len(CONFIG["held_out"])
    assert (len(PLAN.registry), len(held_out), runs) == (65, 33, 6)
    assert stats["render_shard"] == 65  # one natural-all training shard per dataset
    # every role of every dataset: a train split is checked against its validation/test (split hygiene)
    assert stats["ingest"] == 3 * 65
    assert "download" not in stats  # no hub source is left
    classification = [d for d in held_out if PLAN.registry[d].has_options]
    assert stats["render_eval_shard"] == len(held_out) + len(classification) == 54  # natural (+ natural-noopts)
    assert stats["eval_result"] == len(PLAN.evaluations) == 54  # one tuned model per held-out cluster, no base
    # one evaluation job (one model load) per (run, variant, cluster): natural for 6 runs, natural-noopts
    # for the 5 whose cluster has options (translation has none)
    cluster_of = {name: spec.cluster for name, spec in PLAN.registry.items()}
    assert stats["evaluate"] == len(eval_groups(PLAN.evaluations, cluster_of)) == 2 * runs - 1
    assert stats["mix"] == stats["pack"] == stats["train"] == stats["train_spec"] == runs
    inputs = set(re.findall(r"rule ingest:\n\s+input: (\S+)", out))
    assert len(inputs) == stats["ingest"] and all(p.startswith(f"{FIXTURES}/") for p in inputs)


def test_rule_scripts_read_the_mirror(dag_dir: Path) -> None:
    """The ingest and render rules (their scripts look the entry up with dataset_spec) on the fixtures."""
    targets = ["results/shards/rte/eval/natural-noopts.parquet", "results/shards/dart/train/natural-all.parquet"]
    done = snakemake(dag_dir, *targets)
    assert done.returncode == 0, done.stderr[-4000:]
    for target in targets:
        assert_rendered(pl.read_parquet(dag_dir / target), target)
    log = (dag_dir / "logs/ingest/rte/test.log").read_text()
    assert str(FIXTURES / "rte" / "test.jsonl") in log
