"""P3's own template environment: promptsource's filters and globals in the guarded sandbox.

The P3-format file below is written here (own wording, made-up uuids); each original-task template uses one
piece of promptsource's environment: its filters ``choice``, ``most_frequent``, ``highlight``, jinja's
``random`` filter, and the globals ``zip``, ``range``, ``namespace``, ``dict``, ``cycler``, ``joiner``.
A Quoref-like layout: context, question and a list of acceptable answers (``answers.text``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from flanpipe.core.registry import REFERENCES, DatasetSpec, SourceSpec
from flanpipe.data.importers import import_templates
from flanpipe.data.jinja_templates import GuardedSandbox, compile_template, render_rows
from flanpipe.data.patterns import TemplateError
from flanpipe.data.templates import load_validated, render_eval, render_train

TEMPLATES = {
    "choice": "Q: {{question}}\nContext: {{context}} ||| {{answers.text | choice}}",
    "most_frequent": "{{context}}\n{{question}} ||| {{answers.text | most_frequent | choice}}",
    "random": "Answer from the passage. {{question}} {{context}} ||| {{answers.text | random}}",
    "highlight": "{{question | highlight}} ||| {{answers.text[0]}}",
    "namespace": (
        "{% set ns = namespace(n=0) %}{% for a in answers.text %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{question}} ({{ns.n}} known answers) ||| {{answers.text[0]}}"
    ),
    "zip range": (
        "{% for i, a in zip(range(1, 9), answers.text) %}{{i}}) {{a}}\n{% endfor %}"
        "Which is right for: {{question}} ||| {{answers.text[0]}}"
    ),
    "dict cycler joiner": (
        "{% set c = cycler('odd', 'even') %}{% set j = joiner('; ') %}{% set d = dict(q=question) %}"
        "{% for a in answers.text %}{{ j() }}{{ c.next() }}:{{ a }}{% endfor %}"
        " -- {{ d.q }} ||| {{answers.text[0]}}"
    ),
}
INVERTED = "{{answers.text[0]}} is the answer. Write the question. ||| {{question}}"


def p3_file(root: Path) -> Path:
    """A promptsource templates.yaml: one original-task template per piece, plus one that is not."""
    lines = ["dataset: toy_quoref", "templates:"]
    entries = [*TEMPLATES.items(), ("inverted", INVERTED)]
    for i, (name, jinja) in enumerate(entries):
        uuid = f"e0e0e0e0-0000-4000-8000-{i:012d}"
        quoted = jinja.replace("'", "''").replace("\n", "\\n")
        lines += [
            f"  {uuid}: !Template",
            "    answer_choices: null",
            f"    id: {uuid}",
            f'    jinja: "{quoted}"' if "\n" in jinja else f"    jinja: '{quoted}'",
            "    metadata: !TemplateMetadata",
            "      choices_in_prompt: false",
            f"      original_task: {'false' if name == 'inverted' else 'true'}",
            f"    name: {name}",
            "    reference: ''",
        ]
    path = root / "toy_quoref" / "templates.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def spec_for(templates: Path) -> DatasetSpec:
    return DatasetSpec(
        name="toy_quoref",
        cluster="extractive_qa",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"context": "context", "question": "question", "answer": "answers.text"},
        metric="f1",
        templates=templates,
    )


def canonical() -> pl.DataFrame:
    """What ingest makes of a list answer: the first as ``answer``, all as ``references``."""
    refs = [["the bridge", "a bridge", "the bridge"], ["Ada"], ["1890", "in 1890"]]
    return pl.DataFrame(
        {
            "example_id": [0, 1, 2],
            "context": ["They met on the bridge.", "Ada wrote it.", "It opened in 1890."],
            "question": ["Where did they meet?", "Who wrote it?", "When did it open?"],
            "answer": [r[0] for r in refs],
            REFERENCES: refs,
        }
    )


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    root = tmp_path / "ps"
    p3_file(root)
    out = tmp_path / "toy_quoref.yaml"
    result = import_templates(
        "promptsource", root, "toy_quoref", out, keep_jinja=True, field_map={"answers.text": REFERENCES}
    )
    # every original-task template imports; only the one whose task is not the original is skipped
    assert [s.source.split('"')[1] for s in result.skipped] == ["inverted"], result.skipped
    return out


def test_every_original_task_template_using_the_environment_imports(imported: Path) -> None:
    templates = load_validated(spec_for(imported))
    assert [t.jinja.name for t in templates if t.jinja] == list(TEMPLATES)
    assert all(t.kind == "jinja" and t.jinja.variables == {"answers": {"text": REFERENCES}} for t in templates)


def test_each_filter_and_global_renders_as_promptsource_defines_it(imported: Path) -> None:
    spec = spec_for(imported)
    templates = {t.jinja.name: t for t in load_validated(spec) if t.jinja}
    df = canonical()

    def render(name: str) -> pl.DataFrame:
        return render_rows(df, spec, "train", [templates[name]], [templates[name].index] * df.height)

    refs = df[REFERENCES].to_list()
    for name in ("choice", "random"):  # one of the row's answers
        assert all(t in r for t, r in zip(render(name)["targets"], refs, strict=True)), name
    # most_frequent keeps the majority answer ("the bridge" twice), then choice draws among the tied ones
    assert render("most_frequent")["targets"].to_list() == ["the bridge", "Ada", render("most_frequent")["targets"][2]]
    assert render("most_frequent")["targets"][2] in ("1890", "in 1890")
    assert render("highlight")["inputs"][0] == "<span style='color: #F08080'>Where did they meet?</span>"
    assert render("namespace")["inputs"].to_list()[:2] == [
        "Where did they meet? (3 known answers)",
        "Who wrote it? (1 known answers)",
    ]
    assert render("zip range")["inputs"][2] == "1) 1890\n2) in 1890\nWhich is right for: When did it open?"
    assert render("dict cycler joiner")["inputs"][2] == "odd:1890; even:in 1890 -- When did it open?"


def test_random_draws_are_seeded_per_template_and_example(imported: Path) -> None:
    """promptsource draws with the process-wide random; here every row's draws come from a stream seeded by
    (template, example), so a shard renders the same text every time, in any order, in any process."""
    spec = spec_for(imported)
    chosen = [t for t in load_validated(spec) if t.jinja and t.jinja.name in ("choice", "random")]
    many = pl.DataFrame(
        {
            "example_id": list(range(200)),
            "context": ["c"] * 200,
            "question": ["q"] * 200,
            "answer": ["a0"] * 200,
            REFERENCES: [[f"a{i}" for i in range(6)]] * 200,
        }
    )
    first = render_train(many.lazy(), spec, chosen).collect()
    again = render_train(many.reverse().lazy(), spec, chosen).collect().sort("example_id")
    assert first["targets"].to_list() == again["targets"].to_list()
    assert first["targets"].n_unique() == 6  # the draws do differ from example to example


def test_the_sandbox_still_refuses_escapes_through_the_new_globals() -> None:
    env = GuardedSandbox()
    from flanpipe.data.jinja_templates import JinjaSpec
    from flanpipe.data.patterns import Template

    for jinja in (
        "{% set ns = namespace(a=1) %}{{ ns.__class__ }} ||| x",
        "{{ dict.__subclasses__() }} ||| x",
        "{{ cycler.__init__.__globals__ }} ||| x",
    ):
        t = Template(0, "", "", kind="jinja", jinja=JinjaSpec(jinja, None, None, {}, "escape"))
        c = compile_template(env, t)
        env.start_row(0)
        with pytest.raises(Exception, match="unsafe|not safely callable|access to attribute"):
            c.body.render({})
    with pytest.raises(TemplateError, match="refused by the sandbox"):
        from flanpipe.data.jinja_templates import load_entry

        load_entry("f.yaml", 0, {"kind": "jinja", "jinja": "{{ cycler.__init__ }} ||| x"})


def test_every_reference_is_a_right_answer_in_the_eval_shard(imported: Path) -> None:
    """Eval rows carry ``references``: the target rendered once per acceptable answer, so a template whose
    target is a random draw (P3's ``answers.text | choice``) is scored against every answer."""
    spec = spec_for(imported)
    templates = load_validated(spec)
    shard = render_eval(canonical().lazy(), spec, "test", templates, None).collect()
    expected: dict[int, list[Any]] = {0: ["the bridge", "a bridge"], 1: ["Ada"], 2: ["1890", "in 1890"]}
    for row in shard.iter_rows(named=True):
        assert sorted(row[REFERENCES]) == sorted(expected[row["example_id"]]), row
        assert row["targets"] in row[REFERENCES]
