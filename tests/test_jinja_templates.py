"""The Jinja template kind: P3 templates imported verbatim render exactly as promptsource's apply does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import polars as pl
import pytest

from flanpipe.cli import main
from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.importers import import_templates
from flanpipe.data.jinja_templates import (
    MAX_RANGE,
    GuardedSandbox,
    RenderLimitError,
    compile_template,
    load_entry,
    render_rows,
)
from flanpipe.data.patterns import TemplateError
from flanpipe.data.promptsource_import import import_promptsource, load_promptsource_yaml
from flanpipe.data.template_import import TemplateImportError
from flanpipe.data.templates import (
    load_templates,
    load_validated,
    preview,
    render_eval,
    render_shard,
    render_train,
    validate_templates,
)

PS_ROOT = Path(__file__).parent / "fixtures" / "importers" / "promptsource"
SOURCE = PS_ROOT / "toy_jinja" / "templates.yaml"

# source records in promptsource's column names (label indexes endings); invented text
RECORDS: list[dict[str, Any]] = [
    {"ctx": "A man lifts a kettle", "activity_label": "making tea", "endings": ["pours water", " sings "], "label": 0},
    {"ctx": "The dog sees a ball", "activity_label": "", "endings": ["chases it", "sleeps", "barks"], "label": 2},
    {"ctx": "Pipes ||| inside text", "activity_label": "plumbing work", "endings": ["a | b", "c"], "label": 1},
    {"ctx": "She opens the book", "activity_label": "reading", "endings": ["reads", "closes it"], "label": 1},
]


def spec_for(templates: Path) -> DatasetSpec:
    return DatasetSpec(
        name="toy_jinja",
        cluster="commonsense",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"ctx": "ctx", "activity_label": "activity_label", "endings": "endings", "answer": "label"},
        metric="accuracy",
        templates=templates,
        options_field="endings",
        answer_is_index=True,
    )


def canonical(records: list[dict[str, Any]]) -> pl.DataFrame:
    """What ingest makes of RECORDS: the gold ending's text as ``answer``, an example id per row."""
    return pl.DataFrame(
        {
            "example_id": list(range(len(records))),
            "ctx": [r["ctx"] for r in records],
            "activity_label": [r["activity_label"] for r in records],
            "endings": [r["endings"] for r in records],
            "answer": [r["endings"][r["label"]] for r in records],
        }
    )


def reference_apply(jinja: str, answer_choices: str | None, record: dict[str, Any]) -> tuple[str, str, list[str]]:
    """promptsource's documented apply with a plain jinja2 Environment: the oracle the sandbox must match."""
    env = jinja2.Environment()
    ctx = dict(record)
    choices: list[str] = []
    if answer_choices is not None:
        choices = [c.strip() for c in env.from_string(answer_choices).render(**ctx).split("|||")]
        ctx["answer_choices"] = choices
    esc = {k: v.replace("|||", "\x01") if isinstance(v, str) else v for k, v in ctx.items()}
    parts = [p.replace("\x01", "|||").strip() for p in env.from_string(jinja).render(**esc).split("|||")]
    assert len(parts) == 2
    return parts[0], parts[1], choices


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    out = tmp_path / "toy_jinja.yaml"
    import_templates("promptsource", PS_ROOT, "toy_jinja", out, keep_jinja=True)
    return out


def test_import_keeps_plain_substitutions_as_patterns_and_the_rest_verbatim(imported: Path) -> None:
    templates = load_templates(imported)
    assert [t.kind for t in templates] == ["pattern", "jinja", "jinja", "jinja"]
    assert (templates[0].inputs, templates[0].targets) == ("{ctx}\n\nWhat happens next?", "{answer}")
    doc = load_promptsource_yaml(SOURCE)["templates"]
    sources = [v for v in doc.values() if v["name"] != "turned around" and v["name"] != "plain next"]
    for t, src in zip(templates[1:], sources, strict=True):
        assert t.jinja is not None
        assert (t.jinja.jinja, t.jinja.answer_choices, t.jinja.label) == (src["jinja"], src["answer_choices"], "label")
    result = import_promptsource(PS_ROOT, "toy_jinja", keep_jinja=True)
    assert [s.source.split()[0][-2:] for s in result.skipped] == ["05"]  # original_task false
    # without --jinja the same file keeps only the plain substitution
    assert len(import_promptsource(PS_ROOT, "toy_jinja").templates) == 1


def test_every_construct_renders_exactly_as_plain_jinja2(imported: Path) -> None:
    spec = spec_for(imported)
    templates = load_validated(spec)
    df = canonical(RECORDS)
    doc = {v["name"]: v for v in load_promptsource_yaml(SOURCE)["templates"].values()}
    for t in templates:
        src = doc["plain next"] if t.kind == "pattern" else doc[t.jinja.name]  # type: ignore[union-attr]
        shard = render_eval(df.lazy(), spec, "validation", [t], None).collect()
        for row, rec in zip(shard.iter_rows(named=True), RECORDS, strict=True):
            inputs, targets, choices = reference_apply(src["jinja"], src["answer_choices"], rec)
            assert (row["inputs"], row["targets"]) == (inputs, targets), (t.index, rec)
            if t.kind == "jinja":
                assert row["options"] == choices  # per-template choices, rendered per example
            else:  # the pattern kind lists the registry's options_field as ingested, unstripped
                assert [o.strip() for o in row["options"]] == choices
            assert targets in choices  # rank classification scores the gold among them
    # spot checks that the constructs did something
    rows = render_eval(df.lazy(), spec, "validation", templates, None).collect()
    by = {(r["template_id"], r["example_id"]): r for r in rows.iter_rows(named=True)}
    assert by[1, 0]["inputs"].startswith("Topic: Making Tea\n")
    assert not by[1, 1]["inputs"].startswith("Topic")
    assert by[2, 1]["targets"] == "3" and by[2, 1]["options"] == ["1", "2", "3"]
    assert by[1, 2]["inputs"].startswith("Topic: Plumbing Work\nPipes ||| inside text")  # escaped, not split


def test_train_shard_dispatches_per_template_round_robin(imported: Path, tmp_path: Path) -> None:
    spec = spec_for(imported)
    templates = load_validated(spec)
    many = canonical(RECORDS * 3).with_columns(pl.int_range(12).alias("example_id"))
    out = render_train(many.lazy(), spec, templates).collect()
    assert out["example_id"].to_list() == list(range(12))
    assert out["template_id"].to_list() == [i % 4 for i in range(12)]
    assert out["inputs"].null_count() == 0 and out["targets"].null_count() == 0
    assert out.row(0, named=True)["inputs"] == "A man lifts a kettle\n\nWhat happens next?"  # pattern path
    # the same through render_shard, from Parquet to Parquet
    canonical_path = tmp_path / "train.parquet"
    many.write_parquet(canonical_path)
    info = render_shard(spec, canonical_path, tmp_path / "shard.parquet")
    assert info["rows"] == 12
    assert pl.read_parquet(tmp_path / "shard.parquet").equals(out)
    text = preview(spec, canonical_path, 1)
    assert "template 3" in text and "A MAN LIFTS A KETTLE" in text


def test_nested_source_shapes_via_variables(tmp_path: Path) -> None:
    """SQuAD's ``answers.text[0]``: the source shape is rebuilt from canonical fields."""
    path = tmp_path / "squadish.yaml"
    path.write_text(
        "templates:\n"
        "  - kind: jinja\n"
        "    name: nested\n"
        '    jinja: "{{ context }}\\nQ: {{ question }}{% if answers.text %} |||'
        ' {{ answers.text[0] }}{% endif %}"\n'
        "    variables: {answers: {text: [answer]}}\n",
        encoding="utf-8",
    )
    spec = DatasetSpec(
        name="squadish",
        cluster="reading_comprehension",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"context": "context", "question": "question", "answer": "answers.text"},
        metric="squad_f1",
        templates=path,
    )
    templates = load_validated(spec)
    df = pl.DataFrame({"example_id": [0], "context": ["Ants dig."], "question": ["Who digs?"], "answer": ["Ants"]})
    row = render_rows(df, spec, "train", templates, [0]).row(0, named=True)
    expected = reference_apply(templates[0].jinja.jinja, None, {**df.row(0, named=True), "answers": {"text": ["Ants"]}})  # type: ignore[union-attr]
    assert (row["inputs"], row["targets"], row["options"]) == expected


ESCAPES = [
    "{{ ''.__class__.__mro__ }} ||| x",
    "{{ cycler.__init__.__globals__ }} ||| x",
    "{{ ctx['__class__'] }} ||| x",
    "{{ ctx | attr('__class__') }} ||| x",
    "{% include 'other.yaml' %} ||| x",
    "{% for k in ctx._private %}{% endfor %} ||| x",
]


@pytest.mark.parametrize("jinja", ESCAPES)
def test_sandbox_escapes_are_refused_at_import_and_load(jinja: str, tmp_path: Path) -> None:
    root = tmp_path / "ps"
    (root / "evil").mkdir(parents=True)
    quoted = jinja.replace("'", "''")
    (root / "evil" / "templates.yaml").write_text(
        "dataset: evil\ntemplates:\n  u-1: !Template\n    id: u-1\n    name: escape attempt\n"
        f"    jinja: '{quoted}'\n    answer_choices: null\n",
        encoding="utf-8",
    )
    with pytest.raises(TemplateImportError, match=r"evil/templates.yaml: template u-1 \"escape attempt\".*refused"):
        import_promptsource(root, "evil", keep_jinja=True)
    raw = {"kind": "jinja", "name": "escape attempt", "jinja": jinja}
    with pytest.raises(TemplateError, match=r"f.yaml: template 3 \"escape attempt\" \(jinja\): refused by the sandbox"):
        load_entry("f.yaml", 3, raw)


def _bypass(jinja: str, answer_choices: str | None = None) -> Any:
    """A template object built without load_entry's static check, to prove the render-time guard."""
    from flanpipe.data.jinja_templates import JinjaSpec
    from flanpipe.data.patterns import Template

    return Template(0, "", "", kind="jinja", jinja=JinjaSpec(jinja, answer_choices, None, {}, "sneaky"))


@pytest.mark.parametrize(
    ("jinja", "why"),
    [
        ("{{ ctx.__class__.__mro__ }} ||| x", "refused by the sandbox"),
        ("{{ ctx.format.__globals__ }} ||| x", "refused by the sandbox"),
        ("{% for i in range(10**7) %}{% endfor %} ||| x", "refused by the sandbox"),
        ("{{ 'a' * 10**8 }} ||| x", "refused by the sandbox"),
        ("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %} ||| x", "longer than"),
        ("{{ ctx }} no separator", "separators"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }} ||| x", "does not render"),  # unbounded recursion
    ],
)
def test_render_time_guards_name_file_template_and_example(jinja: str, why: str) -> None:
    spec = spec_for(Path("toy.yaml"))
    df = canonical(RECORDS[:1])
    with pytest.raises(
        TemplateError, match=rf"toy.yaml: template 0 \"sneaky\": dataset 'toy_jinja', example_id 0: .*{why}"
    ):
        render_rows(df, spec, "train", [_bypass(jinja)], [0], GuardedSandbox(row_seconds=0.5))


def test_guarded_sandbox_pieces() -> None:
    env = GuardedSandbox()
    assert "lipsum" not in env.globals  # process-wide randomness; every other promptsource global is there
    assert {"range", "zip", "namespace", "dict", "cycler", "joiner"} <= set(env.globals)
    env.start_row(0)
    assert env.from_string("{{ range(3) | list }}").render() == "[0, 1, 2]"
    with pytest.raises(RenderLimitError):
        env.from_string("{{ range(n) | list }}").render(n=MAX_RANGE + 1)
    # the choice filter is deterministic per (template, example) seed
    c = compile_template(env, _bypass("{{ endings | choice }} ||| x"))
    picks = set()
    for _ in range(5):
        env.start_row(42)
        picks.add(c.body.render(endings=["a", "b", "c", "d"]))
    assert len(picks) == 1


def test_validation_names_unknown_variables(imported: Path, tmp_path: Path) -> None:
    spec = spec_for(imported)
    bad = {**spec.fields}
    bad.pop("activity_label")
    narrowed = DatasetSpec(**{**spec.__dict__, "fields": bad})
    with pytest.raises(
        TemplateError, match=r"template 1 \"topic conditional\" \(jinja\): variable\(s\) \['activity_label'\]"
    ):
        validate_templates(load_templates(imported), narrowed, imported)


def test_cli_import_jinja(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.yaml"
    main(
        [
            "templates",
            "import",
            "--from",
            "promptsource",
            str(PS_ROOT),
            "--dataset",
            "toy_jinja",
            "--out",
            str(out),
            "--jinja",
        ]
    )
    assert '"converted": 4' in capsys.readouterr().out
    assert [t.kind for t in load_templates(out)].count("jinja") == 3


def test_bench_templates_renders_the_same_text_both_ways() -> None:
    from flanpipe.bench.templates import bench_templates

    result = bench_templates(300)
    assert result["same_text"] is True
    assert result["pattern_rows_per_s"] > 0 and result["jinja_rows_per_s"] > 0  # type: ignore[operator]


def test_verbatim_import_keeps_every_original_task_template_as_written(tmp_path: Path) -> None:
    out = tmp_path / "verbatim.yaml"
    result = import_templates("promptsource", PS_ROOT, "toy_jinja", out, verbatim=True)
    templates = load_validated(spec_for(out))
    assert [t.kind for t in templates] == ["jinja"] * 4  # the plain substitution too (T0 scores prompts as written)
    assert [s.source.split()[0][-2:] for s in result.skipped] == ["05"]  # original_task false
    doc = {v["name"]: v for v in load_promptsource_yaml(SOURCE)["templates"].values()}
    shard = render_eval(canonical(RECORDS).lazy(), spec_for(out), "test", templates[:1], None).collect()
    for row, rec in zip(shard.iter_rows(named=True), RECORDS, strict=True):
        assert (row["inputs"], row["targets"], row["options"]) == reference_apply(
            doc["plain next"]["jinja"], doc["plain next"]["answer_choices"], rec
        )


def test_label_offset_and_list_entries_rebuild_the_source_record(tmp_path: Path) -> None:
    """WinoGrande's shape: option1/option2 are entries of a list field, answer "1"/"2" counts from 1."""
    path = tmp_path / "t.yaml"
    path.write_text(
        "templates:\n  - kind: jinja\n"
        '    jinja: "{{ ctx }} ||| {% if answer | int == 1 %}{{ option1 }}{% else %}{{ option2 }}{% endif %}"\n'
        '    answer_choices: "{{ option1 }} ||| {{ option2 }}"\n'
        "    label: answer\n    label_offset: 1\n"
        '    variables: {option1: "endings[0]", option2: "endings[1]"}\n',
        encoding="utf-8",
    )
    spec = spec_for(path)
    shard = render_eval(canonical(RECORDS).lazy(), spec, "test", load_validated(spec), None).collect()
    # answer = gold index + 1: "1" picks option1 (endings[0]), anything else option2
    assert shard["targets"].to_list() == [r["endings"][0 if r["label"] == 0 else 1].strip() for r in RECORDS]
    assert shard["options"].to_list() == [[e.strip() for e in r["endings"][:2]] for r in RECORDS]
    path.write_text(path.read_text(encoding="utf-8").replace("    label: answer\n", ""), encoding="utf-8")
    with pytest.raises(
        TemplateError, match=r"t\.yaml: template 0: 'label_offset' must be an integer, with 'label' set"
    ):
        load_templates(path)


def test_a_target_outside_its_answer_choices_is_an_error_naming_template_and_example(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        'templates:\n  - kind: jinja\n    jinja: "{{ ctx }} ||| {{ activity_label }}"\n'
        "    answer_choices: \"{{ endings | join(' ||| ') }}\"\n",
        encoding="utf-8",
    )
    spec = spec_for(path)
    with pytest.raises(
        TemplateError, match=r"t\.yaml: template 0: dataset 'toy_jinja', example_id 0: target 'making tea'"
    ):
        labelled = [r for r in RECORDS if r["activity_label"]]  # an empty target is its own error (round 3)
        render_eval(canonical(labelled).lazy(), spec, "test", load_validated(spec), None).collect()
