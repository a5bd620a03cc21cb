"""Registry loading, template parsing/validation and Polars rendering."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dag import write

from flanpipe.core.registry import FLAN_OVERLAPS, RegistryError, load_registry, training_datasets
from flanpipe.data.patterns import TemplateError, parse_pattern
from flanpipe.data.templates import load_templates, render_eval, render_train, templates_for_mode, validate_templates


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    write(
        tmp_path / "t" / "nli_a.yaml",
        'templates:\n  - {inputs: "P: {premise}\\nH: {hypothesis}\\n\\n{options_}", targets: "{answer}"}\n'
        '  - {inputs: "Does {premise} entail {hypothesis}?\\n{options_}", targets: "{answer}"}\n'
        '  - {inputs: "Write a sentence that {answer} follows from {premise}", targets: "{hypothesis}",'
        " turned_around: true}\n",
    )
    write(tmp_path / "t" / "qa.yaml", 'templates:\n  - {inputs: "Q: {question}", targets: "{answer}"}\n')
    return write(
        tmp_path / "reg.yaml",
        f"""
datasets:
  nli_a:
    cluster: nli
    source: {{type: local, format: jsonl, path: "data/nli_a/{{split}}.jsonl"}}
    fields: {{premise: p, hypothesis: h, answer: label}}
    options: ["yes", "no"]
    metric: accuracy
    templates: {tmp_path}/t/nli_a.yaml
  para:
    cluster: paraphrase
    source: {{type: local, path: "data/para/{{split}}.jsonl"}}
    fields: {{question: q, answer: a}}
    metric: exact_match
    templates: {tmp_path}/t/qa.yaml
  qa:
    cluster: closed_book_qa
    source: {{type: local, path: "data/qa/{{split}}.jsonl"}}
    fields: {{question: q, answer: a}}
    metric: exact_match
    templates: {tmp_path}/t/qa.yaml
""",
    )


def test_registry_loads_and_overlap_rules(registry_file: Path) -> None:
    reg = load_registry([registry_file])
    assert set(reg) == {"nli_a", "para", "qa"}
    assert reg["nli_a"].options == ("yes", "no")
    # Holding out NLI also removes paraphrase (FLAN's overlap rule).
    assert training_datasets(reg, ["nli"], FLAN_OVERLAPS) == ["qa"]
    assert training_datasets(reg, ["closed_book_qa"], FLAN_OVERLAPS) == ["nli_a", "para"]


def test_registry_rejects_duplicates_and_unknown_clusters(registry_file: Path, tmp_path: Path) -> None:
    copy = write(tmp_path / "reg2.yaml", registry_file.read_text())
    with pytest.raises(RegistryError, match="'nli_a' is already defined in .*reg.yaml"):
        load_registry([registry_file, copy])
    reg = load_registry([registry_file])
    with pytest.raises(RegistryError, match="unknown cluster 'sentimentt'"):
        training_datasets(reg, ["sentimentt"])
    with pytest.raises(RegistryError, match="leaves no training data"):
        training_datasets({k: v for k, v in reg.items() if k != "qa"}, ["nli"])


def test_registry_schema_error_names_key(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "datasets:\n  x:\n    cluster: nli\n    source: {type: ftp, path: a}\n")
    with pytest.raises(RegistryError, match=r"bad.yaml: at datasets/x"):
        load_registry([bad])


def test_parse_pattern_literal_braces_and_errors() -> None:
    assert parse_pattern("a {{x}} {y}") == [
        ("text", "a "),
        ("text", "{"),
        ("text", "x"),
        ("text", "}"),
        ("text", " "),
        ("field", "y"),
    ]
    with pytest.raises(ValueError, match="unbalanced"):
        parse_pattern("oops {y")
    with pytest.raises(ValueError, match="invalid placeholder"):
        parse_pattern("{a.__class__}")


def test_bad_template_field_fails_naming_file_index_field(registry_file: Path, tmp_path: Path) -> None:
    spec = load_registry([registry_file])["nli_a"]
    bad = write(
        tmp_path / "bad.yaml",
        'templates:\n  - {inputs: "{premise}", targets: "{answer}"}\n  - {inputs: "{premis}", targets: "{answer}"}\n',
    )
    with pytest.raises(TemplateError, match=r"bad.yaml: template 1 \(inputs\): field 'premis'"):
        validate_templates(load_templates(bad), spec, bad)
    qa = load_registry([registry_file])["qa"]
    opts = write(tmp_path / "opts.yaml", 'templates:\n  - {inputs: "{question}\\n{options_}", targets: "{answer}"}\n')
    with pytest.raises(TemplateError, match="has no options"):
        validate_templates(load_templates(opts), qa, opts)
    yaml_err = write(tmp_path / "err.yaml", "templates:\n  - inputs: [unclosed\n")
    with pytest.raises(ValueError, match=r"err.yaml:\d+:\d+: invalid YAML"):
        load_templates(yaml_err)


def canonical_frame() -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "example_id": list(range(5)),
            "premise": [f"p{i}" for i in range(5)],
            "hypothesis": [f"h{i}" for i in range(5)],
            "answer": ["yes", "no", "yes", "no", "yes"],
        }
    )


def test_render_train_round_robin_and_options_block(registry_file: Path) -> None:
    spec = load_registry([registry_file])["nli_a"]
    templates = templates_for_mode(load_templates(spec.templates), spec, "natural", None)
    df = render_train(canonical_frame(), spec, templates).collect()
    assert df["template_id"].to_list() == [0, 1, 2, 0, 1]  # round-robin: example i gets template i mod k
    assert df["inputs"][0] == "P: p0\nH: h0\n\nOPTIONS:\n- yes\n- no"
    assert df["targets"][0] == "yes"
    assert df["inputs"][2] == "Write a sentence that yes follows from p2" and df["targets"][2] == "h2"
    assert df["turned_around"].to_list() == [False, False, True, False, False]
    assert df["options"][0].to_list() == ["yes", "no"]
    # the template follows the example id, not the row position: dropping a bad row (id 1) moves no
    # other example to another template
    kept = render_train(canonical_frame().filter(pl.col("example_id") != 1), spec, templates).collect()
    assert kept["template_id"].to_list() == [0, 2, 0, 1]
    # a subset of templates (num_templates / the templates ablation) cycles through its own indices
    two = render_train(canonical_frame(), spec, [templates[0], templates[2]]).collect()
    assert two["template_id"].to_list() == [0, 2, 0, 2, 0]


def test_render_eval_every_scored_template(registry_file: Path) -> None:
    spec = load_registry([registry_file])["nli_a"]
    templates = load_templates(spec.templates)
    df = render_eval(canonical_frame(), spec, "validation", templates, max_examples=3).collect()
    assert df.height == 2 * 3  # turned-around template is not scored
    assert sorted(set(df["template_id"])) == [0, 1]


def test_instruction_ablation_modes(registry_file: Path) -> None:
    spec = load_registry([registry_file])["nli_a"]
    templates = load_templates(spec.templates)
    (nt,) = templates_for_mode(templates, spec, "no_template", None)
    (dn,) = templates_for_mode(templates, spec, "dataset_name", None)
    df = render_train(canonical_frame().head(1), spec, [nt]).collect()
    assert df["inputs"][0] == "p0\nh0\n\nOPTIONS:\n- yes\n- no"
    df = render_train(canonical_frame().head(1), spec, [dn]).collect()
    assert df["inputs"][0].startswith("[nli: nli_a]\np0")
    assert [t.index for t in templates_for_mode(templates, spec, "natural", 1)] == [0]


def test_eval_variants_no_options_and_fewshot(registry_file: Path) -> None:
    from flanpipe.data.patterns import fewshot_exemplars

    spec = load_registry([registry_file])["nli_a"]
    templates = load_templates(spec.templates)
    noopts = render_eval(canonical_frame(), spec, "test", templates, 2, options_in_prompt=False).collect()
    assert noopts["inputs"][0] == "P: p0\nH: h0"  # the block and the blank line before it are gone
    assert noopts["options"][0].to_list() == ["yes", "no"]  # still scored by rank classification
    train = canonical_frame().with_columns(pl.col("premise") + "_train")
    ex = fewshot_exemplars(train, 2, seed=0)
    shot = render_eval(canonical_frame(), spec, "test", templates, 1, exemplars=ex).collect()
    first = shot.filter(pl.col("template_id") == 0)["inputs"][0]
    chosen = ex.collect()
    # Two solved exemplars under the same template, then the query.
    assert first.count("OPTIONS:") == 3 and first.endswith("P: p0\nH: h0\n\nOPTIONS:\n- yes\n- no")
    for prem, ans in zip(chosen["premise"], chosen["answer"], strict=True):
        assert f"P: {prem}\n" in first and f"- no\n{ans}\n\n" in first
