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
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flanpipe.core.io import read_yaml
from flanpipe.core.registry import ROLES, load_registry
from flanpipe.data.importers import import_templates
from flanpipe.data.ingest import ingest_split
from flanpipe.data.mixing import MixtureConfig, build_mixture, dataset_cap
from flanpipe.data.promptsource_import import find_promptsource_file, load_promptsource_yaml
from flanpipe.data.templates import load_validated, render_eval_shard, render_shard
from flanpipe.plan.config import load_config
from flanpipe.plan.experiments import plan_experiment

ROOT = Path(__file__).resolve().parent.parent
T0_FIXTURES = ROOT / "tests" / "fixtures" / "t0"
FLAN_FIXTURES = ROOT / "tests" / "fixtures" / "flan"
T0_CONFIG = ROOT / "config" / "t0.yaml"
T0_ONLY = sorted(load_registry(["config/registry/t0/*.yaml"]))
HELD_OUT = {"nli", "coreference", "sentence_completion", "word_sense"}
P3_SOURCES = ROOT / "config" / "templates" / "t0" / "promptsource"
P3_DIR = ROOT / "config" / "templates" / "t0" / "p3"
P3_IMPORTS = read_yaml(P3_DIR / "imports.yaml")
P3_FILES = load_config(T0_CONFIG)["templates"]["files"]
# promptsource's story_cloze/2016 sees the HF script's column names; the registry reads the same data from the
# official CSV (tests/fixtures/flan/story_cloze holds CSV names)
STORY_CLOZE_HF_NAMES = {
    "input_sentence_1": "InputSentence1",
    "input_sentence_2": "InputSentence2",
    "input_sentence_3": "InputSentence3",
    "input_sentence_4": "InputSentence4",
    "sentence_quiz1": "RandomFifthSentenceQuiz1",
    "sentence_quiz2": "RandomFifthSentenceQuiz2",
    "answer_right_ending": "AnswerRightEnding",
}


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
    assert len(datasets) == 38 and not {plan.registry[d].cluster for d in datasets} & HELD_OUT
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
    templates = plan.templates[name]
    assert frame.height == len(templates) * 6
    with_choices = {t.index for t in templates if t.jinja is not None and t.jinja.answer_choices is not None}
    assert with_choices or not spec.has_options  # a classification dataset's prompts give their choices
    for tid, target, options in zip(frame["template_id"], frame["targets"], frame["options"].to_list(), strict=True):
        if tid in with_choices:
            assert target in options  # the template's own choices, rendered per example, hold the target
        else:
            assert options == []  # generation (F1, ROUGE)
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
    assert stats["render_shard"] == 38  # the training datasets only
    assert stats["train"] == stats["mix"] == 4
    assert stats["eval_result"] == len(plan.evaluations)  # one result file per (model, variant, dataset)
    groups = {(e.run, plan.registry[e.dataset].cluster) for e in plan.evaluations}
    assert stats["evaluate"] == len(groups)  # one model load per (model, cluster)
    # every eval shard is rendered from the dataset's P3 prompts, one (natural) variant per dataset
    blocks = [b for b in out.split("rule render_eval_shard:")[1:]]
    eval_inputs = {
        b.split("wildcards: dataset=", 1)[1].split(",", 1)[0]: b.split("input:", 1)[1].split("\n", 1)[0] for b in blocks
    }
    assert stats["render_eval_shard"] == len(blocks) == len(P3_FILES)
    for dataset, inputs in eval_inputs.items():
        assert inputs.rstrip().endswith(str(ROOT / P3_FILES[dataset])), (dataset, inputs)


def test_cluster_override_names_unknown_datasets(mirror: Path) -> None:
    from flanpipe.plan.checks import PlanError

    config = load_config(T0_CONFIG)
    config["data"]["local_mirror"] = str(mirror)
    config["clusters"] = {**config["clusters"], "not_a_dataset": "nli"}
    with pytest.raises(PlanError, match=r"config key clusters: unknown dataset\(s\) \['not_a_dataset'\]"):
        plan_experiment(config)


def test_p3_template_files_are_what_the_importer_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the files name their source relative to the checkout
    assert {Path(f).stem for f in P3_FILES.values()} == set(P3_IMPORTS)
    for name, entry in P3_IMPORTS.items():
        out = tmp_path / f"{name}.yaml"
        result = import_templates(
            "promptsource",
            "config/templates/t0/promptsource",
            entry["dataset"],
            out,
            field_map=entry.get("field_map"),
            verbatim=True,
            label=entry.get("label"),
            label_offset=entry.get("label_offset", 0),
        )
        assert not result.skipped and all(t.jinja is not None for t in result.templates), name
        assert out.read_text(encoding="utf-8") == (P3_DIR / f"{name}.yaml").read_text(encoding="utf-8"), name


def _reference(name: str, role: str) -> list[tuple[str, int, int, str, str, list[str]]]:
    """What plain jinja2 renders from the original P3-format templates on the raw source rows (promptsource's
    apply: choices split on ||| and stripped; the prompt split on ||| and each side stripped)."""
    entry = P3_IMPORTS[Path(P3_FILES[name]).stem]
    doc = load_promptsource_yaml(find_promptsource_file(P3_SOURCES, entry["dataset"]))
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    out = []
    for example_id, raw in enumerate(jsonl(FLAN_FIXTURES / name / f"{role}.jsonl")):
        if name == "story_cloze":
            raw = {hf: raw[csv] for hf, csv in STORY_CLOZE_HF_NAMES.items()}
        for template_id, t in enumerate(doc["templates"].values()):
            choices = [c.strip() for c in env.from_string(t["answer_choices"]).render(raw).split("|||")]
            inputs, targets = (
                p.strip() for p in env.from_string(t["jinja"]).render(raw, answer_choices=choices).split("|||")
            )
            out.append((role, example_id, template_id, inputs, targets, choices))
    return out


@pytest.mark.parametrize("name", sorted(P3_FILES))
def test_held_out_eval_shards_are_p3_prompts_as_jinja2_renders_them(name: str, plan, tmp_path: Path) -> None:  # noqa: ANN001
    spec = plan.registry[name]
    assert spec.cluster in HELD_OUT and Path(spec.templates).resolve() == ROOT / P3_FILES[name]
    assert all(t.kind == "jinja" for t in plan.templates[name])
    paths = {role: tmp_path / f"{role}.parquet" for role in ("validation", "test")}
    for role, path in paths.items():
        ingest_split(spec, role, path)
    render_eval_shard(spec, paths, tmp_path / "eval.parquet")
    frame = pl.read_parquet(tmp_path / "eval.parquet")
    got = sorted(frame.select("split", "example_id", "template_id", "inputs", "targets", "options").iter_rows())
    want = sorted(_reference(name, "validation") + _reference(name, "test"))
    assert got == want  # prompts and per-example answer_choices exactly as promptsource renders them
    # gold: the target's position among the rendered choices is the source label (rank classification)
    offset = P3_IMPORTS[Path(P3_FILES[name]).stem].get("label_offset", 0)
    label_column = next(c for c in ("label", "answer", "AnswerRightEnding") if c in jsonl(paths_raw(name))[0])
    for role in ("validation", "test"):
        labels = [int(raw[label_column]) - offset for raw in jsonl(FLAN_FIXTURES / name / f"{role}.jsonl")]
        for _, example_id, _, _, targets, choices in (r for r in got if r[0] == role):
            assert choices.index(targets) == labels[example_id], (role, example_id)


def paths_raw(name: str) -> Path:
    return FLAN_FIXTURES / name / "test.jsonl"


def test_t0_plans_one_eval_variant_per_p3_prompt(plan) -> None:  # noqa: ANN001
    evaluated = {e.dataset for e in plan.evaluations}
    assert evaluated == set(P3_FILES)  # every held-out dataset is scored with P3's prompts
    assert {e.variant for e in plan.evaluations} == {"natural"}  # as written: no with/without-options pair


def test_template_files_name_unknown_datasets(mirror: Path) -> None:
    from flanpipe.plan.checks import PlanError

    config = load_config(T0_CONFIG)
    config["data"]["local_mirror"] = str(mirror)
    config["templates"]["files"] = {**config["templates"]["files"], "not_a_dataset": "config/templates/t0/p3/rte.yaml"}
    with pytest.raises(PlanError, match=r"config key templates.files: unknown dataset\(s\) \['not_a_dataset'\]"):
        plan_experiment(config)
