"""Importers: promptsource/P3 templates.yaml and FLAN PATTERNS files -> our template files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from dag import write

from flanpipe.cli import main
from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.flan_import import import_flan, read_flan_patterns
from flanpipe.data.importers import import_templates
from flanpipe.data.promptsource_import import (
    Conversion,
    check_equivalent,
    convert_template,
    import_promptsource,
    load_promptsource_yaml,
    sandbox,
    synthesize_records,
)
from flanpipe.data.template_import import TemplateImportError, Unconvertible, parse_field_map
from flanpipe.data.templates import load_templates, render_train, validate_templates

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
PS_ROOT = FIXTURES / "promptsource"
ENTAIL = "toy_suite/toy_entail"
FLAN = FIXTURES / "flan_patterns.py"
UUID = "0b1f6a52-1111-4c2e-9a01-0000000000{:02d}"


def skipped_ids(result) -> dict[str, str]:
    return {s.source.split()[0]: s.reason for s in result.skipped}


# ------------------------------------------------------------------------------------------ promptsource


def test_promptsource_converts_plain_substitutions_and_skips_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "toy_entail.yaml"
    result = import_templates("promptsource", PS_ROOT, ENTAIL, out)

    got = [(t.inputs, t.targets, t.turned_around) for t in load_templates(out)]
    assert got == [
        ('{premise}\n\nGiven the passage above, is the claim "{hypothesis}" supported?', "{answer}", False),
        (
            "Passage: {premise}\nStatement: {hypothesis}\n"
            "Does the passage back the statement? Choose from: {options_}.",
            "{answer}",
            False,
        ),
        ('Answer yes or no {{braces stay}}: does "{premise}" mean that "{hypothesis}"?', "{answer}", False),
        (
            'Write a statement for which "is it supported by the passage?" gets the answer {answer}.\n'
            "Passage: {premise}",
            "{hypothesis}",
            True,
        ),
    ]
    reasons = skipped_ids(result)
    assert set(reasons) == {UUID.format(i) for i in (4, 5, 6, 7, 9, 10)}
    assert "{% for %}" in reasons[UUID.format(4)]
    assert "{% if %}" in reasons[UUID.format(5)]
    assert "filter 'upper'" in reasons[UUID.format(6)]
    assert "True ||| False" in reasons[UUID.format(7)] and "yes ||| no" in reasons[UUID.format(7)]
    assert "not the task turned around" in reasons[UUID.format(9)]
    assert "'|||'" in reasons[UUID.format(10)]
    assert result.summary()["converted"] == 4 and result.summary()["skipped"] == 6

    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Imported by `flanpipe templates import --from promptsource` from ")
    assert "toy_suite/toy_entail/templates.yaml" in text.splitlines()[0]
    assert '"word loop"' in text and "yes ||| no" in text  # skips and the expected options are documented


def test_imported_file_validates_and_renders_against_a_registry_spec(tmp_path: Path) -> None:
    out = tmp_path / "toy_entail.yaml"
    import_templates("promptsource", PS_ROOT, ENTAIL, out)
    spec = DatasetSpec(
        name="toy_entail",
        cluster="nli",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"premise": "premise", "hypothesis": "hypothesis", "answer": "label"},
        metric="accuracy",
        templates=out,
        options=("yes", "no"),
    )
    templates = load_templates(out)
    validate_templates(templates, spec, out)
    lf = pl.LazyFrame({"example_id": [0, 1], "premise": ["Rain fell.", "It was dry."], "hypothesis": ["Wet"] * 2})
    df = render_train(lf.with_columns(answer=pl.Series(["yes", "no"])), spec, templates).collect()
    assert df["inputs"][1].endswith("Choose from: OPTIONS:\n- yes\n- no.")  # FLAN's block replaces "yes, no"
    assert df["targets"].to_list() == ["yes", "no"]


def test_per_example_answer_choices_and_directory_lookup(tmp_path: Path) -> None:
    result = import_promptsource(PS_ROOT, "toy_choice")
    assert [(t.inputs, t.targets) for t in result.templates] == [
        ("Situation: {situation}\nWhich is more likely to happen next? {options_}?", "{answer}")
    ]
    assert "per-example choices" in result.skipped[0].reason
    assert any("options_field" in n for n in result.notes)
    # a templates.yaml given directly works too; its dataset/subset keys must match --dataset
    direct = PS_ROOT / "toy_choice" / "templates.yaml"
    assert len(import_promptsource(direct, "toy_choice").templates) == 1
    with pytest.raises(TemplateImportError, match="holds templates for 'toy_choice', not 'other'"):
        import_promptsource(direct, "other")
    with pytest.raises(TemplateImportError, match=r"no templates for dataset 'nope'.*toy_suite/toy_entail"):
        import_promptsource(PS_ROOT, "nope")


def test_sample_records_field_map_and_options(tmp_path: Path) -> None:
    sample = write(
        tmp_path / "sample.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"premise": "A cat sat on the mat.", "hypothesis": "A cat sat.", "label": 0},
                {"premise": "Snow {is} cold.", "hypothesis": "Snow is hot.", "label": 1},
                {"premise": "Unlabelled test row.", "hypothesis": "?", "label": -1},  # P3's -1: left out
            ]
        ),
    )
    fmap = parse_field_map(["premise=text", "hypothesis=claim"])
    result = import_promptsource(PS_ROOT, ENTAIL, field_map=fmap, sample=sample)
    assert result.templates[0].inputs == '{text}\n\nGiven the passage above, is the claim "{claim}" supported?'
    assert len(result.templates) == 4

    # --options decides which wording of the choices survives
    result = import_promptsource(PS_ROOT, ENTAIL, options=["True", "False"])
    assert [t.source.split()[0] for t in result.templates] == [UUID.format(7)]
    assert "yes ||| no" in skipped_ids(result)[UUID.format(1)]


def test_sample_whitespace_exposes_a_strip_difference(tmp_path: Path) -> None:
    # promptsource strips the rendered input; our pattern keeps a field value's own leading spaces
    sample = write(tmp_path / "s.jsonl", json.dumps({"premise": "  padded", "hypothesis": "h", "label": 0}))
    result = import_promptsource(PS_ROOT, ENTAIL, sample=sample)
    reasons = skipped_ids(result)
    assert "where the Jinja original renders" in reasons[UUID.format(1)]  # premise is first: stripped
    assert UUID.format(2) not in reasons  # premise is not at an edge there


def test_sample_lacking_a_field_skips_everything_with_a_clear_error(tmp_path: Path) -> None:
    sample = write(tmp_path / "s.jsonl", json.dumps({"premise": "p", "label": 0}))
    with pytest.raises(TemplateImportError, match="no template of 'toy_suite/toy_entail'.*'hypothesis' is undefined"):
        import_promptsource(PS_ROOT, ENTAIL, sample=sample)


def test_check_equivalent_rejects_an_unfaithful_conversion() -> None:
    env = sandbox()
    jinja = "{{ a }} and {{ b }} ||| {{ answer_choices[label] }}"
    good = convert_template(env, jinja, "x ||| y", {})
    assert (good.inputs, good.targets) == ("{a} and {b}", "{answer}")
    records = [{"a": "<a>", "b": "<b>", "label": i} for i in (0, 1)]
    assert check_equivalent(env, good, jinja, "x ||| y", records, {}) == 2
    swapped = Conversion("{b} and {a}", "{answer}", "label", None, True)
    with pytest.raises(Unconvertible, match="where the Jinja original renders"):
        check_equivalent(env, swapped, jinja, "x ||| y", records, {})


@pytest.mark.parametrize(
    ("jinja", "reason"),
    [
        ("{{ a[:5] }} ||| {{ b }}", "indexing/slicing"),
        ("{{ a.title() }} ||| {{ b }}", "a call"),
        ("{{ a.text }} ||| {{ b }}", "attribute access '.text'"),
        ("{% set x = a %}{{ x }} ||| {{ b }}", "{% set %}"),
        ("{{ answer_choices }} ||| {{ b }}", "Python list"),
        ("{{ a }} ||| {{ b }} ||| {{ c }}", "more than one '|||'"),
        ("{{ a }} |||   ", "target side is empty"),
        ("{% if label == 1 %}{{ a }}{% endif %} ||| {{ b }}", "{% if %}"),
        ("{{ a }} ||| {{ answer_choices[label] }}", "defines none"),
    ],
)
def test_unconvertible_jinja(jinja: str, reason: str) -> None:
    with pytest.raises(Unconvertible) as e:
        convert_template(sandbox(), jinja, None if "defines none" in reason else "x ||| y", {})
    assert reason in str(e.value)


def test_answer_choices_render_in_the_sandbox() -> None:
    env = sandbox()
    jinja = "{{ a }} ||| {{ answer_choices[label] }}"
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }} ||| no"
    convert_template(env, jinja, escape, {})  # parsing is harmless; rendering is where the sandbox acts
    with pytest.raises(Unconvertible, match="unsafe"):
        synthesize_records(env, jinja, escape, "label")
    # promptsource's own filters (choice, most_frequent, ...) are known; any other is not
    assert len(synthesize_records(env, jinja, "{{ x | choice }} ||| no", "label")) == 2
    with pytest.raises(Unconvertible, match="No filter named 'shuffle'"):
        synthesize_records(env, jinja, "{{ x | shuffle }} ||| no", "label")


def test_unsafe_yaml_tags_are_refused_not_executed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = write(
        tmp_path / "evil" / "templates.yaml",
        'dataset: evil\ntemplates:\n  x: !!python/object/apply:os.system ["echo pwned"]\n',
    )
    with pytest.raises(TemplateImportError, match=r"evil/templates.yaml:3: .*python/object/apply:os.system"):
        load_promptsource_yaml(bad)
    assert "pwned" not in capfd.readouterr().out


def test_promptsource_structural_errors_name_file_and_template(tmp_path: Path) -> None:
    f = write(
        tmp_path / "d" / "templates.yaml",
        "dataset: d\ntemplates:\n  u1: !Template\n    id: u1\n    name: broken\n    jinja: 3\n",
    )
    with pytest.raises(TemplateImportError, match=r"d/templates.yaml: template u1 \"broken\": 'jinja' must be"):
        import_promptsource(f, "d")


# ------------------------------------------------------------------------------------------ FLAN


def test_flan_patterns_map_directly_and_file_is_never_executed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "toy_nli.yaml"
    result = import_templates("flan", FLAN, "toy_nli", out, turned_around_from=3)
    loaded = load_templates(out)
    assert [t.turned_around for t in loaded] == [False, False, False, True]
    assert loaded[0].inputs == '{premise}\n\nDoes the passage above show that "{hypothesis}" is true?\n\n{options_}'
    assert loaded[2].inputs == 'Read this: {premise}\n\nCould one conclude "{hypothesis}"? {{curly}} {options_}'
    assert loaded[3].targets == "{hypothesis}"
    assert result.skipped == []
    assert out.read_text(encoding="utf-8").startswith("# Imported by `flanpipe templates import --from flan` from ")
    assert "pwned" not in capfd.readouterr().out  # the module-level os.system never ran


def test_flan_hints_turned_around_and_field_map() -> None:
    result = import_flan(FLAN, "toy_nli")
    assert not any(t.turned_around for t in result.templates)
    assert any("PATTERNS['toy_nli'][3]" in n and "looks turned around" in n for n in result.notes)
    result = import_flan(FLAN, "toy_reviews", field_map={"text": "sentence"}, turned_around_from=1)
    assert [(t.inputs, t.targets) for t in result.templates][1] == ("Write a {answer} product review.", "{sentence}")


def test_flan_non_literal_is_rejected_with_file_and_line(capfd: pytest.CaptureFixture[str]) -> None:
    line = next(i for i, s in enumerate(FLAN.read_text().splitlines(), 1) if '("{premise}", __import__' in s)
    with pytest.raises(TemplateImportError) as e:
        read_flan_patterns(FLAN, "toy_evil")
    msg = str(e.value)
    assert msg.startswith(f"{FLAN}:{line}: PATTERNS['toy_evil'] template 1:")
    assert "__import__('os').system('echo pwned')" in msg and "never executed" in msg
    assert "pwned" not in capfd.readouterr().out


def test_flan_errors_name_file_dataset_and_index(tmp_path: Path) -> None:
    with pytest.raises(TemplateImportError, match=r"flan_patterns.py:\d+: PATTERNS\['toy_bad_brace'\] template 0"):
        import_flan(FLAN, "toy_bad_brace")
    with pytest.raises(TemplateImportError, match=r"has no dataset 'missing'; it has \['toy_bad_brace'"):
        import_flan(FLAN, "missing")
    with pytest.raises(TemplateImportError, match="--turned-around-from 0"):
        import_flan(FLAN, "toy_nli", turned_around_from=0)
    bad = write(tmp_path / "p.py", 'PATTERNS = {"d": [("{a}", "{b}", "{c}")]}\nPATTERNS = {}\n')
    with pytest.raises(TemplateImportError, match=r"p.py: PATTERNS is assigned 2 times \(lines \[1, 2\]\)"):
        import_flan(bad, "d")
    bad = write(tmp_path / "q.py", 'PATTERNS = {"d": [("{a}", "{b}", "{c}")]}\n')
    with pytest.raises(TemplateImportError, match=r"q.py:1: PATTERNS\['d'\] template 0: expected an \(inputs, targ"):
        import_flan(bad, "d")
    bad = write(tmp_path / "r.py", 'PATTERNS = dict(d=[("{a}", "{b}")])\n')
    with pytest.raises(TemplateImportError, match="r.py:1: PATTERNS must be a dict literal"):
        import_flan(bad, "d")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_templates_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "imported.yaml"
    main(["templates", "import", "--from", "promptsource", str(PS_ROOT), "--dataset", ENTAIL, "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["converted"] == 4 and summary["skipped"] == 6 and summary["out"] == str(out)
    assert len(load_templates(out)) == 4

    out2 = tmp_path / "flan.yaml"
    argv = ["templates", "import", "--from", "flan", str(FLAN), "--dataset", "toy_reviews", "--out", str(out2)]
    main([*argv, "--field-map", "text=sentence", "--turned-around-from", "1"])
    assert json.loads(capsys.readouterr().out)["turned_around"] == 1

    before = out2.read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as e:  # errors are one clean line naming the culprit, no traceback
        argv = ["templates", "import", "--from", "flan", str(FLAN), "--dataset", "toy_evil", "--out", str(out2)]
        main([*argv, "--force"])
    assert e.value.code == 2
    assert "flan_patterns.py" in capsys.readouterr().err
    assert out2.read_text(encoding="utf-8") == before  # a failed import leaves the old file alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flan.yaml", "imported.yaml"]  # no temp files left


def test_field_map_takes_list_entries_and_cli_imports_verbatim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_field_map(["choice1=options[0]", "ctx=context"]) == {"choice1": "options[0]", "ctx": "context"}
    with pytest.raises(TemplateImportError, match=r"'options\[x\]' is not a usable field name"):
        parse_field_map(["choice1=options[x]"])
    out = tmp_path / "v.yaml"
    argv = ["templates", "import", "--from", "promptsource", str(PS_ROOT), "--dataset", "toy_jinja", "--verbatim"]
    main([*argv, "--field-map", "ctx=context", "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["converted"] == 4
    text = out.read_text(encoding="utf-8")
    assert text.count("kind: jinja") == 4 and 'variables: {"ctx": "context"}' in text
