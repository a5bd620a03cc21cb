"""Bad input never costs a cluster run.

Every bad input below fails where it is cheapest: the config, registry, templates, model configs, the
tokenizer and the parallel layout when the DAG is built (validate_config / plan_experiment, which
rules/common.smk calls, and the DAG's own checks), bad data in the first rule that reads it (ingest).
Each case asserts that the message names its culprit: the key path, file, dataset, template index,
field or the arithmetic. Where a file would be written, nothing partial is left behind.

Where each check runs (new cases go to the file of their stage, under tests/bad_inputs/):

- schema (a file is loaded: YAML, config schema, registry entries, template files, model configs):
  sections 1-2 and the first half of 3 here; ``bad_inputs/test_bad_schema.py``
- plan (``plan_experiment`` / ``flanpipe.plan.checks`` when the DAG is built; an ablation's own checks when
  its target is asked for): the rest of 3, 5 and 6 here; ``bad_inputs/test_bad_plan.py``
- data (the first job that reads a split: ingest): section 4 here; ``bad_inputs/test_bad_data.py``
- run (what jobs and commands write: atomic outputs, file modes, refusing to overwrite): section 7
  here; ``bad_inputs/test_bad_run.py``

This module also holds the helpers the files under tests/bad_inputs/ import.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from dag import ROOT, snakemake, write
from dag import write_jsonl as jsonl

from flanpipe.core.io import atomic_path
from flanpipe.core.registry import RegistryError, load_registry
from flanpipe.data.ingest import DataError, check_local_source, ingest_split
from flanpipe.data.patterns import TemplateError
from flanpipe.plan.checks import PlanError
from flanpipe.plan.config import ConfigError, check_world, load_config, validate_config
from flanpipe.plan.experiments import plan_experiment

TINY = ROOT / "config" / "models" / "tiny.yaml"

NLI_TEMPLATES = """templates:
  - {inputs: "P: {premise}\\nH: {hypothesis}\\n\\n{options_}", targets: "{answer}"}
  - {inputs: "Does {premise} entail {hypothesis}?", targets: "{answer}"}
"""
QA_TEMPLATES = 'templates:\n  - {inputs: "Q: {question}", targets: "{answer}"}\n'


# ----------------------------------------------------------------------------------------- helpers


def leftovers(directory: Path) -> list[str]:
    """Temp files/dirs atomic_path would leave if it did not clean up (hidden, '.tmp' in the name)."""
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name)


def registry_dir(tmp_path: Path, *, nli_templates: str = NLI_TEMPLATES, extra: str = "") -> Path:
    """A small registry: nli (2 datasets, one with options), closed_book_qa (1), and its templates."""
    write(tmp_path / "t" / "nli.yaml", nli_templates)
    write(tmp_path / "t" / "qa.yaml", QA_TEMPLATES)
    return write(
        tmp_path / "reg" / "main.yaml",
        f"""datasets:
  nli_a:
    cluster: nli
    source: {{type: local, format: jsonl, path: "{tmp_path}/data/nli_a/{{split}}.jsonl"}}
    fields: {{premise: p, hypothesis: h, answer: label}}
    options: ["yes", "no"]
    metric: accuracy
    templates: {tmp_path}/t/nli.yaml
  qa:
    cluster: closed_book_qa
    source: {{type: local, format: jsonl, path: "{tmp_path}/data/qa/{{split}}.jsonl"}}
    fields: {{question: q, answer: a}}
    metric: exact_match
    templates: {tmp_path}/t/qa.yaml
{extra}""",
    )


def raw_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A config a tiny model can run, over the tmp registry; ``overrides`` replace top-level sections."""
    cfg: dict[str, Any] = {
        "registry": [str(tmp_path / "reg" / "*.yaml")],
        "held_out": ["nli"],
        "model": str(TINY),
        "tokenizer": {"vocab_size": 1024},
        "lengths": {"inputs": 192, "targets": 48, "pack": 256},
        "train": {"micro_batch_size": 4, "global_batch_size": 8},
    }
    cfg.update(overrides)
    return cfg


def plan(tmp_path: Path, **overrides: Any):
    return plan_experiment(validate_config(raw_config(tmp_path, **overrides)))


def dry_run(workdir: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """``snakemake -n --configfile bad.yaml`` in a fresh directory (the real DAG build)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write(workdir / "bad.yaml", yaml.safe_dump(config))
    return snakemake(
        "-s", ROOT / "Snakefile", "-d", workdir, "--configfile", "bad.yaml", "-n", *args, cwd=workdir, timeout=300
    )


def assert_failed_before_any_job(r: subprocess.CompletedProcess[str], workdir: Path, *culprits: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for c in culprits:
        assert c in out, (c, out[-3000:])
    assert "Job stats" not in out and "rule ingest:" not in out  # no job was planned, let alone run
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def default_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


# --------------------------------------------------------------------------- 1. the config [schema]


@pytest.mark.parametrize(
    ("bad", "culprit"),
    [
        ({"train": {"tensor_parallel": 2}}, "config key train.tensor_parallel: unknown key"),
        ({"ablations": {"scale": {"models": ["m"], "chekpoints": {}}}}, "config key ablations.scale.chekpoints"),
        ({"mixture": {"cap": "lots"}}, "config key mixture.cap: 'lots' is not of type 'integer'"),
        ({"held_out": "nli"}, "config key held_out: 'nli' is not of type 'array'"),
        ({"data": {"bad_rows": "ignore"}}, "config key data.bad_rows: 'ignore' is not one of ['fail', 'drop']"),
    ],
)
def test_config_unknown_key_or_wrong_type_names_key_path(bad: dict, culprit: str) -> None:
    cfg = {"registry": ["r.yaml"], "held_out": ["nli"], "model": "m.yaml", **bad}
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert culprit in str(e.value)


def test_config_missing_required_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"config key model: required key is missing"):
        validate_config({"registry": ["r.yaml"], "held_out": ["nli"]})
    with pytest.raises(ConfigError, match=r"config key ablations\.clusters\.order: required key is missing"):
        validate_config(
            {
                "registry": ["r"],
                "held_out": ["nli"],
                "model": "m",
                "ablations": {"clusters": {"held_out": ["nli"], "counts": [1]}},
            }
        )


def test_config_file_names_file_and_key(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", yaml.safe_dump({**default_config(), "mixture": {"cpa": 3}}))
    with pytest.raises(ConfigError, match=rf"{bad}: config key mixture\.cpa: unknown key"):
        load_config(bad)
    broken = write(tmp_path / "broken.yaml", "registry: [a]\nheld_out: [nli\nmodel: m\n")
    with pytest.raises(ValueError, match=rf"{broken}:\d+:\d+: invalid YAML"):
        load_config(broken)


def test_dag_build_fails_on_unknown_key_before_any_job(tmp_path: Path) -> None:
    cfg = default_config()
    cfg["mixture"]["cpa"] = 3
    r = dry_run(tmp_path / "w", cfg)
    assert_failed_before_any_job(r, tmp_path / "w", "config key mixture.cpa: unknown key")


# ----------------------------------------------------------------------- 2. template files [schema]


def test_template_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    registry_dir(
        tmp_path, nli_templates='templates:\n  - {inputs: "{premise}", targets: "{answer}"}\n  - inputs: [oops\n'
    )
    with pytest.raises(ValueError, match=rf"{tmp_path}/t/nli\.yaml:4:1: invalid YAML"):
        plan(tmp_path)


def test_template_placeholder_naming_missing_field(tmp_path: Path) -> None:
    registry_dir(
        tmp_path,
        nli_templates='templates:\n  - {inputs: "{premise}", targets: "{answer}"}\n'
        '  - {inputs: "{premise} / {hypothesis}", targets: "{answr}"}\n',
    )
    with pytest.raises(TemplateError) as e:
        plan(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path}/t/nli.yaml: template 1 (targets): field 'answr'" in msg
    assert "dataset 'nli_a'" in msg and "'hypothesis', 'premise'" in msg


def test_template_options_placeholder_without_options(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    write(
        tmp_path / "t" / "qa.yaml",
        'templates:\n  - {inputs: "Q: {question}", targets: "{answer}"}\n'
        '  - {inputs: "{question}\\n{options_}", targets: "{answer}"}\n',
    )
    with pytest.raises(
        TemplateError,
        match=rf"{tmp_path}/t/qa\.yaml: template 1 \(inputs\): \{{options_\}} used but dataset 'qa' has no options",
    ):
        plan(tmp_path)


def test_template_list_empty(tmp_path: Path) -> None:
    registry_dir(tmp_path, nli_templates="templates: []\n")
    with pytest.raises(TemplateError, match=rf"{tmp_path}/t/nli\.yaml: the template list is empty"):
        plan(tmp_path)


def test_template_more_than_three_turned_around(tmp_path: Path) -> None:
    turned = '  - {inputs: "Write a premise for {hypothesis}", targets: "{premise}", turned_around: true}\n'
    registry_dir(tmp_path, nli_templates=NLI_TEMPLATES + turned * 4)
    with pytest.raises(TemplateError) as e:
        plan(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path}/t/nli.yaml: 4 turned-around templates (templates [2, 3, 4, 5])" in msg
    assert "dataset 'nli_a'" in msg and "at most 3" in msg


def test_template_file_missing_names_dataset_and_registry(tmp_path: Path) -> None:
    reg = registry_dir(tmp_path)
    (tmp_path / "t" / "qa.yaml").unlink()
    with pytest.raises(TemplateError, match=rf"{tmp_path}/t/qa\.yaml: template file of dataset 'qa' not found .*{reg}"):
        plan(tmp_path)


# ------------------------------------------------ 3. the registry [schema; held-out clusters: plan]


def test_dataset_in_two_clusters_across_files(tmp_path: Path) -> None:
    main = registry_dir(tmp_path)
    other = write(
        tmp_path / "reg" / "zz_other.yaml",
        "datasets:\n  qa:\n    cluster: commonsense\n    source: {type: hf, path: some/qa}\n"
        "    fields: {question: q, answer: a}\n    metric: exact_match\n",
    )
    with pytest.raises(RegistryError) as e:
        plan(tmp_path)
    msg = str(e.value)
    assert (
        f"{other}: dataset 'qa' is already defined in {main} (cluster 'closed_book_qa' there, 'commonsense' here)"
        in msg
    )


def test_dataset_twice_in_one_file_names_both_lines(tmp_path: Path) -> None:
    dup = """  nli_a:
    cluster: sentiment
    source: {type: hf, path: x/y}
    fields: {sentence: s, answer: label}
    metric: accuracy
"""
    reg = registry_dir(tmp_path, extra=dup)
    with pytest.raises(
        RegistryError, match=rf"{reg}:15: dataset 'nli_a' is defined twice in this file \(first at line 2\)"
    ):
        load_registry([reg])


def test_held_out_unknown_cluster(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError, match=r"config key held_out: unknown cluster 'nlii'; the registry has \['closed_book_qa', 'nli'\]"
    ):
        plan(tmp_path, held_out=["nlii"])


def test_ablation_held_out_unknown_cluster(tmp_path: Path) -> None:
    """Would otherwise plan an ablation with nothing to evaluate, silently. The error is the ablation's own:
    the main DAG still plans (README: an ablation is checked when its target is asked for)."""
    registry_dir(tmp_path)
    p = plan(tmp_path, ablations={"clusters": {"held_out": ["sentiment"], "order": ["closed_book_qa"], "counts": [1]}})
    assert "heldout_nli" in p.runs
    with pytest.raises(
        PlanError, match=r"config key ablations\.clusters\.held_out: unknown cluster\(s\) \['sentiment'\]"
    ):
        p.check_ablation("clusters")


def test_held_out_cluster_leaving_no_training_data(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(PlanError) as e:
        plan(tmp_path, held_out=["nli"], overlaps={"nli": ["closed_book_qa"]})
    assert (
        "config key held_out: holding out 'nli' removes clusters ['closed_book_qa', 'nli'] and leaves no training data"
        in str(e.value)
    )


def test_local_source_missing_fails_dag_build(tmp_path: Path) -> None:
    """The ingest rule's input function checks the file while the DAG is built (no rule makes it)."""
    reg = registry_dir(tmp_path)
    for split in ("train", "validation", "test"):
        jsonl(tmp_path / "data" / "qa" / f"{split}.jsonl", [{"q": "a?", "a": "b"}])
    spec = load_registry([reg])["nli_a"]
    with pytest.raises(DataError) as e:
        check_local_source(spec, "train")
    msg = str(e.value)
    assert f"dataset 'nli_a' (train): source file {tmp_path}/data/nli_a/train.jsonl does not exist" in msg
    assert f"fetch or create it as the comments at the dataset's entry in {reg} describe" in msg
    # through the real DAG: `snakemake -n` fails while building it, naming the same
    r = dry_run(tmp_path / "w", raw_config(tmp_path))
    assert_failed_before_any_job(
        r, tmp_path / "w", f"source file {tmp_path}/data/nli_a/", "dataset 'nli_a'", "No rule creates it"
    )


def test_hf_source_offline_names_dataset_hub_id_and_what_to_do(tmp_path: Path) -> None:
    """No mocks: a hub id that is in no cache, with HF_DATASETS_OFFLINE=1, through the CLI in a fresh process."""
    write(
        tmp_path / "reg" / "hf.yaml",
        "datasets:\n  hub_qa:\n    cluster: closed_book_qa\n"
        "    source: {type: hf, path: flanpipe-tests/no-such-dataset}\n"
        "    fields: {question: q, answer: a}\n    metric: exact_match\n",
    )
    cfg = write(
        tmp_path / "cfg.yaml", yaml.safe_dump(raw_config(tmp_path, registry=[str(tmp_path / "reg" / "hf.yaml")]))
    )
    out = tmp_path / "out" / "train.parquet"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [sys.executable, "-m", "flanpipe.cli", "--config", str(cfg), "ingest", "hub_qa", "train", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode != 0
    for culprit in (
        "dataset 'hub_qa' (train)",
        "'flanpipe-tests/no-such-dataset'",
        "HF_DATASETS_OFFLINE=1 is set",
        "snakemake --until download",
        str(tmp_path / "hf"),
    ):
        assert culprit in r.stderr, (culprit, r.stderr[-2000:])
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------- 4. data [data]


@pytest.fixture
def toy(tmp_path: Path):
    """(spec of nli_a, its train file, an output path) over the tmp registry."""
    reg = registry_dir(tmp_path)
    return (
        load_registry([reg])["nli_a"],
        tmp_path / "data" / "nli_a" / "train.jsonl",
        tmp_path / "out" / "train.parquet",
    )


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.parent.exists() or not leftovers(out.parent)


def test_data_missing_column(toy) -> None:
    spec, raw, out = toy
    jsonl(raw, [{"p": "a", "hyp": "b", "label": 0}])
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    msg = str(e.value)
    assert f"dataset 'nli_a' split 'train' ({raw}): source column(s) not found for field(s) hypothesis <- 'h'" in msg
    assert "['p', 'hyp', 'label']" in msg and spec.defined_in in msg
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["empty file", "empty parquet"])
def test_data_empty_split(toy, kind: str) -> None:
    spec, raw, out = toy
    if kind == "empty file":
        write(raw, "\n")
        expected = f"dataset 'nli_a' split 'train' ({raw}): the split is empty"
    else:
        from dataclasses import replace

        from flanpipe.core.registry import SourceSpec

        raw = raw.with_suffix(".parquet")
        raw.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(
            {"p": [], "h": [], "label": []}, schema={"p": pl.Utf8, "h": pl.Utf8, "label": pl.Int64}
        ).write_parquet(raw)
        spec = replace(
            spec, source=SourceSpec(type="local", format="parquet", path=str(raw.parent / "{split}.parquet"))
        )
        expected = f"dataset 'nli_a' split 'train' ({raw}): the split is empty (0 rows)"
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    assert expected in str(e.value)
    assert_nothing_written(out)


def test_data_labels_outside_options_fail_or_drop_counted(toy) -> None:
    spec, raw, out = toy
    # integer labels index the options: 7 is outside ['yes', 'no']
    jsonl(raw, [{"p": "a", "h": "b", "label": 0}, {"p": "c", "h": "d", "label": 7}, {"p": "g", "h": "h", "label": 1}])
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    msg = str(e.value)
    assert (
        f"dataset 'nli_a' split 'train' ({raw}): 1 bad row(s) of 3 {{'null answer': 1}}; first at example_id 1: " in msg
    )
    assert "null answer (source answer '7'; options ['yes', 'no'])" in msg and "data.bad_rows: drop" in msg
    assert_nothing_written(out)
    # text labels are matched against the option texts
    rows = [
        {"p": "a", "h": "b", "label": "yes"},
        {"p": "c", "h": "d", "label": None},
        {"p": "e", "h": "f", "label": "maybe"},
        {"p": "g", "h": "h", "label": "no"},
    ]
    jsonl(raw, rows)
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    msg = str(e.value)
    assert "2 bad row(s) of 4 {'null answer': 1, 'answer not in options': 1}; first at example_id 1: null answer" in msg
    assert_nothing_written(out)
    # data.bad_rows: drop keeps the good rows and counts every dropped one by reason (never silently)
    report = ingest_split(spec, "train", out, policy="drop")
    assert report["rows"] == 2 and report["dropped"] == {"answer not in options": 1, "null answer": 1}
    assert pl.read_parquet(out)["example_id"].to_list() == [0, 3]


def test_data_null_fields_fail_or_drop_counted(toy) -> None:
    spec, raw, out = toy
    jsonl(
        raw,
        [
            {"p": "a", "h": "b", "label": 0},
            {"p": None, "h": "d", "label": 1},
            {"p": "e", "h": None, "label": 1},
            {"p": None, "h": "h", "label": 0},
        ],
    )
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    assert "3 bad row(s) of 4 {'null premise': 2, 'null hypothesis': 1}; first at example_id 1: null premise." in str(
        e.value
    )
    assert_nothing_written(out)
    report = ingest_split(spec, "train", out, policy="drop")
    assert report["rows"] == 1 and report["dropped"] == {"null premise": 2, "null hypothesis": 1}


def test_data_every_row_bad_is_an_error_even_when_dropping(toy) -> None:
    spec, raw, out = toy
    jsonl(raw, [{"p": None, "h": "b", "label": 0}])
    with pytest.raises(
        DataError, match=r"split 'train' .*every row is bad \{'null premise': 1\}; nothing would remain"
    ):
        ingest_split(spec, "train", out, policy="drop")
    assert_nothing_written(out)


def test_data_non_utf8_names_line_and_offset(toy) -> None:
    spec, raw, out = toy
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(b'{"p": "a", "h": "b", "label": 0}\n{"p": "caf\xe9", "h": "b", "label": 1}\n')
    with pytest.raises(DataError) as e:
        ingest_split(spec, "train", out)
    assert f"dataset 'nli_a' split 'train': {raw} is not valid UTF-8 at line 2 (byte offset 43" in str(e.value)
    assert_nothing_written(out)


def test_data_malformed_json_line(toy) -> None:
    spec, raw, out = toy
    write(raw, '{"p": "a", "h": "b", "label": 0}\n{"p": "c", "h": "d", "label": 1\n')
    with pytest.raises(DataError, match=rf"{raw} is not valid JSONL at line 2, character \d+: Expecting ',' delimiter"):
        ingest_split(spec, "train", out)
    assert_nothing_written(out)


# ------------------------------------------ 5. tokenizer and packing [plan; truncation counts: run]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SentencePiece .model (byte fallback: >= 259 pieces)."""
    from flanpipe.data.tokenize import train_tokenizer

    d = tmp_path_factory.mktemp("spm")
    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(300)]
    pl.DataFrame({"inputs": words, "targets": [w.upper() for w in words]}).write_parquet(d / "shard.parquet")
    return train_tokenizer([d / "shard.parquet"], d / "spm.model", vocab_size=320, sample_size=1000, seed=0)


def model_file(tmp_path: Path, name: str = "small.yaml", **changes: Any) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(changes)
    return write(tmp_path / "models" / name, yaml.safe_dump(cfg))


def test_given_tokenizer_larger_than_model_vocab_fails_at_plan(tmp_path: Path, spm_model: Path) -> None:
    from flanpipe.data.tokenize import piece_count

    n = piece_count(spm_model)
    assert n >= 259
    registry_dir(tmp_path)
    small = model_file(tmp_path, vocab_size=256)
    with pytest.raises(PlanError) as e:
        plan(tmp_path, model=str(small), tokenizer={"model": str(spm_model)})
    msg = str(e.value)
    assert f"config key tokenizer.model: tokenizer {spm_model} (tokenizer.model) has {n} pieces" in msg
    assert f"model config {small} (model) has vocab_size = 256 ({n} > 256)" in msg
    # the same tokenizer fits the tiny model's 1024 ids
    assert plan(tmp_path, tokenizer={"model": str(spm_model)}).runs


def test_tokenizer_to_train_larger_than_model_vocab(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=rf"config key tokenizer\.vocab_size: .* 32000 pieces but model config {TINY} \(model\) "
        r"has vocab_size = 1024",
    ):
        plan(tmp_path, tokenizer={"vocab_size": 32000})


def test_given_tokenizer_not_a_sentencepiece_model(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    junk = write(tmp_path / "junk.model", "this is not a protobuf\n" * 10)
    with pytest.raises(PlanError, match=rf"config key tokenizer\.model: {junk} is not a SentencePiece \.model file"):
        plan(tmp_path, tokenizer={"model": str(junk)})
    with pytest.raises(PlanError, match=r"config key tokenizer\.model: SentencePiece model .*nowhere\.model not found"):
        plan(tmp_path, tokenizer={"model": str(tmp_path / "nowhere.model")})


def test_pack_length_smaller_than_inputs_plus_targets(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"config key lengths\.pack: 200 is smaller than lengths\.inputs \+ lengths\.targets = 192 \+ 48 = 240",
    ):
        validate_config(raw_config(tmp_path, lengths={"inputs": 192, "targets": 48, "pack": 200}))


def test_pack_length_longer_than_model_positions(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=r"config key lengths\.pack: packed rows of 512 tokens are longer than max_position_embeddings = 256 "
        rf"of model config {TINY}",
    ):
        plan(tmp_path, lengths={"inputs": 400, "targets": 100, "pack": 512})


def test_option_cap_longer_than_model_positions(tmp_path: Path) -> None:
    """eval.option_tokens caps an option beside a full input: 192 + 100 tokens do not fit 256 positions."""
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=r"config key eval\.option_tokens: an option of 100 tokens beside a full input of lengths\.inputs = 192 "
        rf"is 292 tokens, longer than max_position_embeddings = 256 of model config {TINY}",
    ):
        plan(tmp_path, eval={"option_tokens": 100})
    assert plan(tmp_path, eval={"option_tokens": 64}).runs  # 192 + 64 = 256 fits


def test_long_examples_truncated_and_counted_in_packing_json(tmp_path: Path, spm_model: Path) -> None:
    from flanpipe.data.packing import pack_to_indexed_dataset
    from flanpipe.data.tokenize import encode_examples, open_tokenizer

    sp = open_tokenizer(spm_model)
    long = " ".join(f"w{i}" for i in range(200))
    enc = encode_examples(sp, [long, "w1", long], ["X1", long, "Y2"], inputs_length=16, targets_length=8)
    assert enc.truncated_inputs == 2 and enc.truncated_targets == 1
    assert enc.lengths.max() <= 16 + 8
    stats = pack_to_indexed_dataset(enc, 24, tmp_path / "packed")
    written = json.loads((tmp_path / "packed" / "packing.json").read_text())
    assert written == stats
    assert written["truncated_inputs"] == 2 and written["truncated_targets"] == 1 and written["examples"] == 3
    with pytest.raises(ValueError, match=r"pack_length 20 < inputs_length 16 \+ targets_length 8 = 24"):
        pack_to_indexed_dataset(enc, 20, tmp_path / "packed2")
    assert not (tmp_path / "packed2").exists()


# -------------------------------------------------------------- 6. model and parallel layout [plan]


def test_heads_not_divisible_by_tp(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(PlanError) as e:
        plan(tmp_path, train={"tensor_model_parallel_size": 3, "micro_batch_size": 4, "global_batch_size": 8})
    msg = str(e.value)
    assert f"model config {TINY} (model) does not split over TP x PP = 3 x 1" in msg
    assert "num_attention_heads = 4 is not divisible by TP = 3 (4 % 3 = 1)" in msg
    assert "vocab_size = 1024 is not divisible by TP = 3 (1024 % 3 = 1)" in msg


def test_layers_not_divisible_by_pp(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError,
        match=rf"model config {TINY} \(model\) does not split over TP x PP = 1 x 3: "
        r"num_layers = 4 is not divisible by PP = 3 \(4 % 3 = 1\)",
    ):
        plan(tmp_path, train={"pipeline_model_parallel_size": 3, "micro_batch_size": 4, "global_batch_size": 8})


def test_ablation_model_checked_when_its_runs_are_requested(tmp_path: Path) -> None:
    """A scale-ablation model that does not split fails the DAG only for the ablation's jobs."""
    registry_dir(tmp_path)
    odd = model_file(tmp_path, "odd.yaml", num_attention_heads=2, hidden_size=128, num_layers=3)
    p = plan(
        tmp_path,
        train={"pipeline_model_parallel_size": 2, "micro_batch_size": 4, "global_batch_size": 8},
        model=str(model_file(tmp_path, "even.yaml")),
        ablations={"scale": {"models": [str(odd)]}},
    )
    p.check_run("heldout_nli")  # the main run is fine
    with pytest.raises(
        PlanError,
        match=rf"model config {odd} \(ablations\.scale\.models\) does not split over TP x PP = 1 x 2: num_layers = 3",
    ):
        p.check_run("heldout_nli__odd")


def test_model_config_file_missing_or_wrong(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(PlanError, match=rf"config key model: model config file {tmp_path}/nope\.yaml not found"):
        plan(tmp_path, model=str(tmp_path / "nope.yaml"))
    typo = model_file(tmp_path, "typo.yaml", num_heads=4)
    with pytest.raises(
        PlanError, match=rf"config key model: model config {typo}: unknown model config keys: \['num_heads'\]"
    ):
        plan(tmp_path, model=str(typo))


def test_global_batch_not_divisible_by_micro_batch(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"config key train\.global_batch_size: 12 is not divisible by train\.micro_batch_size 8 \(12 % 8 = 4\)",
    ):
        validate_config(raw_config(tmp_path, train={"micro_batch_size": 8, "global_batch_size": 12}))


def test_world_must_be_tp_x_pp_x_dp(tmp_path: Path) -> None:
    cfg = validate_config(
        raw_config(
            tmp_path,
            train={
                "tensor_model_parallel_size": 2,
                "pipeline_model_parallel_size": 2,
                "micro_batch_size": 2,
                "global_batch_size": 8,
            },
        )
    )
    assert check_world(cfg, 8) == 2  # 8 = 2 x 2 x DP 2; 8 = micro 2 x DP 2 x 2 accumulation steps
    with pytest.raises(
        ConfigError, match=r"world size 6 \(set-resources\) is not a multiple of .* = 2 x 2 = 4 \(6 % 4 = 2\)"
    ):
        check_world(cfg, 6, "set-resources")
    with pytest.raises(ConfigError) as e:
        check_world(cfg, 12)
    assert "train.global_batch_size: 8 is not a multiple of train.micro_batch_size x DP = 2 x 3 = 6 (8 % 6 = 2)" in str(
        e.value
    )
    assert "DP = world / (TP x PP) = 12 / (2 x 2) = 3" in str(e.value)
    # interleaved: 8 rows / (micro 2 x DP 2) = 2 micro-batches, a multiple of PP 2: fine; at DP 4: 1, not
    interleaved = validate_config({**cfg, "train": {**cfg["train"], "virtual_pipeline_model_parallel_size": 2}})
    assert check_world(interleaved, 8) == 2
    with pytest.raises(ConfigError, match=r"virtual_pipeline_model_parallel_size: .* 8 / \(2 x 4\) = 1, .* PP = 2"):
        check_world(interleaved, 16)


def test_dag_build_checks_world_from_the_profile(tmp_path: Path) -> None:
    """3 training ranks at TP = PP = 1 make DP 3: the default's global batch 8 / (micro 1 x 3) fails."""
    r = dry_run(tmp_path / "w", default_config(), "--set-resources", "train:tasks=3")
    assert_failed_before_any_job(
        r,
        tmp_path / "w",
        "train.global_batch_size: 8 is not a multiple of train.micro_batch_size x DP = 1 x 3 = 3",
        "set-resources train:tasks",
    )


def base_checkpoint(tmp_path: Path, model: Path) -> Path:
    from flanpipe.core.model_config import load_model_config

    d = tmp_path / "base"
    (d / "checkpoint").mkdir(parents=True)
    write(d / "model.json", json.dumps(load_model_config(model).to_dict()))
    for name in ("metadata.json", "common.pt"):  # what dist_checkpointing.save leaves (besides the shards)
        write(d / "checkpoint" / name, "{}")
    return d


def test_base_checkpoint_architecture_differs(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    ckpt = base_checkpoint(tmp_path, ROOT / "config" / "models" / "micro.yaml")
    with pytest.raises(PlanError) as e:
        plan(tmp_path, base={"checkpoint": str(ckpt)})
    msg = str(e.value)
    assert (
        f"config key base.checkpoint: the checkpoint's architecture {ckpt}/model.json differs from "
        f"model config {TINY} (model)" in msg
    )
    assert "num_layers: 2 vs 4" in msg and "hidden_size: 64 vs 128" in msg and "vocab_size" not in msg
    # the matching architecture plans, with the checkpoint as the base every run is tuned from
    p = plan(tmp_path, base={"checkpoint": str(base_checkpoint(tmp_path / "ok", TINY))})
    assert p.runs["heldout_nli"].init == "base-tiny"


def test_base_checkpoint_missing(tmp_path: Path) -> None:
    registry_dir(tmp_path)
    with pytest.raises(
        PlanError, match=rf"config key base\.checkpoint: base checkpoint dir {tmp_path}/gone does not exist"
    ):
        plan(tmp_path, base={"checkpoint": str(tmp_path / "gone")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        PlanError, match=rf"config key base\.checkpoint: model config file {tmp_path}/empty/model\.json not found"
    ):
        plan(tmp_path, base={"checkpoint": str(tmp_path / "empty")})


# ------------------------------------------------ 7. interrupted jobs leave nothing plausible [run]


def test_atomic_path_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "d" / "x.parquet"
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt  # Ctrl-C / a signal turned into an exception mid-write
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "dir", directory=True) as tmp:
        (tmp / "tokens.bin").write_bytes(b"\0" * 100)
        raise RuntimeError("disk full")
    assert not (tmp_path / "dir").exists() and leftovers(tmp_path) == []


def test_killed_writer_leaves_no_output(tmp_path: Path) -> None:
    """SIGKILL (no cleanup possible) mid-write: the output path never exists; a rerun then writes it."""
    out = tmp_path / "results" / "x.json"
    code = (
        "import sys, time\nfrom flanpipe.core.io import atomic_path\n"
        f"with atomic_path({str(out)!r}) as tmp:\n"
        "    tmp.write_text('{\"partial\": ')\n    print('writing', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    assert all(name.startswith(".") for name in leftovers(tmp_path))  # a hidden temp, never the output's name
    from flanpipe.core.io import write_json

    write_json(out, {"done": True})
    assert json.loads(out.read_text()) == {"done": True}


def interrupt_after_partial_write(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> None:
    """Make ``cls.method(path)`` write half a file and then be interrupted."""

    def partial(self, path, *args, **kwargs):  # noqa: ANN001, ARG001
        Path(path).write_bytes(b"PAR1 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, method, partial)


def test_interrupted_ingest_leaves_nothing(toy, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, raw, out = toy
    jsonl(raw, [{"p": "a", "h": "b", "label": 0}])
    interrupt_after_partial_write(monkeypatch, pl.LazyFrame, "sink_parquet")  # ingest streams to its file
    with pytest.raises(KeyboardInterrupt):
        ingest_split(spec, "train", out)
    assert_nothing_written(out)


def test_interrupted_render_shard_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flanpipe.data.templates import render_shard

    spec = load_registry([registry_dir(tmp_path)])["nli_a"]
    canonical = tmp_path / "canon.parquet"
    pl.DataFrame(
        {"example_id": [0, 1], "premise": ["a", "b"], "hypothesis": ["c", "d"], "answer": ["yes", "no"]}
    ).write_parquet(canonical)
    out = tmp_path / "shards" / "nli_a" / "train" / "natural-all.parquet"
    interrupt_after_partial_write(monkeypatch, pl.LazyFrame, "sink_parquet")
    with pytest.raises(KeyboardInterrupt):
        render_shard(spec, canonical, out)
    assert_nothing_written(out)


def test_interrupted_mixture_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flanpipe.data.mixing import MixtureConfig, build_mixture

    shard = tmp_path / "shard.parquet"
    pl.DataFrame(
        {
            "dataset": ["a"] * 4,
            "cluster": ["c"] * 4,
            "split": ["train"] * 4,
            "example_id": list(range(4)),
            "template_id": [0] * 4,
            "turned_around": [False] * 4,
            "inputs": ["x y"] * 4,
            "targets": ["z"] * 4,
            "options": [[]] * 4,
        },
        schema_overrides={"options": pl.List(pl.Utf8)},
    ).write_parquet(shard)
    out = tmp_path / "mixtures" / "run"
    import pyarrow.parquet as pq

    def interrupted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ARG001
        raise KeyboardInterrupt  # the writer has opened its file: half a mixture is on disk

    monkeypatch.setattr(pq.ParquetWriter, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_mixture(
            {"a": shard},
            MixtureConfig(),
            out / "mixture.parquet",
            out / "mixture.json",
            budget_tokens=100,
            inputs_length=16,
            targets_length=8,
        )
    assert_nothing_written(out / "mixture.parquet")
    assert not (out / "mixture.json").exists()
    assert not list(out.glob(".shuffle-*")), "the shuffle's scatter files must go too"


def test_interrupted_packing_leaves_nothing(tmp_path: Path, spm_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flanpipe.data import packing
    from flanpipe.data.tokenize import encode_examples, open_tokenizer

    enc = encode_examples(open_tokenizer(spm_model), ["w1 w2"] * 50, ["X"] * 50, inputs_length=16, targets_length=8)
    real = packing._fill_rows

    def fill_then_die(*args, **kwargs):  # noqa: ANN002, ANN003
        real(*args, **kwargs)
        raise KeyboardInterrupt  # killed while the .bin files are half written

    monkeypatch.setattr(packing, "_fill_rows", fill_then_die)
    out = tmp_path / "packed" / "run"
    with pytest.raises(KeyboardInterrupt):
        packing.pack_to_indexed_dataset(enc, 24, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_copy_of_default_config_still_plans() -> None:
    """The checks above reject nothing the shipped default needs."""
    cfg = load_config(ROOT / "config" / "config.yaml")
    p = plan_experiment(copy.deepcopy(cfg))
    for run in p.runs:
        p.check_run(run)
    assert check_world(cfg, 1) == 1
