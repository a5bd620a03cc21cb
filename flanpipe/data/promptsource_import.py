"""promptsource / P3 ``templates.yaml`` -> our template files, each conversion proven by rendering.

promptsource ``templates.yaml`` is read strictly as data, never run: it goes through a ``yaml.SafeLoader``
subclass that builds its two custom tags (``!Template``, ``!TemplateMetadata``) as plain dicts; every other
tag (``!!python/object``...) is refused. Jinja is only *parsed* (to decide whether a template is a plain
substitution) and only *rendered* in the guarded sandbox of the Jinja kind (jinja2's
``ImmutableSandboxedEnvironment`` with promptsource's filters and globals), to prove each conversion faithful.


promptsource -> ``{field}`` pattern (the Jinja AST is walked; nothing is matched with regexes):

- literal text -> the same text (``{``/``}`` doubled); ``{{ "const" }}`` -> its text
- ``{{ name }}`` -> ``{name}``, renamed by ``--field-map old=new``
- ``{{ answer_choices[label] }}`` -> ``{answer}``: our canonical ``answer`` column holds the gold option
  text, exactly what ``answer_choices[label]`` renders to
- ``{{ answer_choices | join(sep) }}`` -> ``{options_}``: FLAN's ``OPTIONS:`` block replaces the inline list.
  That is the one deliberate change of surface form; the check renders ``{options_}`` as ``sep.join(choices)``
  so that everything else must still match byte for byte.
- ``{{ answer_choices[0] }}`` with static answer choices -> that choice's text
- ``{% if label != -1 %}...{% endif %}`` (P3's guard for unlabelled test rows) -> its body, since every
  canonical row we render has a label
- anything else -- loops, other conditionals, ``{% set %}``, filters, attribute access, calls, slicing --
  cannot be expressed as a ``{field}`` pattern: the template is SKIPPED with the reason logged and counted,
  unless ``--jinja`` (``keep_jinja``) keeps it verbatim as a ``kind: jinja`` template (flanpipe.data.jinja_templates:
  rendered row-wise in a guarded sandbox, with its own per-example answer choices). With ``--jinja``, templates
  that would change surface form (``answer_choices | join`` -> ``{options_}``) or word their choices differently
  from the dataset's are kept verbatim too, and sandbox escapes stop the import naming file and template.

Every converted template is then rendered both ways on sample records (``--sample FILE.jsonl`` or records
synthesized from the template's variables, one per label value) and skipped unless the outputs agree.
promptsource strips each side of ``|||`` after rendering; the conversion strips the pattern's literal edges,
which agrees as long as field values carry no leading/trailing whitespace (a ``--sample`` with such values
exposes the difference and the template is skipped).

Answer choices: ``{answer}`` and ``{options_}`` render the dataset's registry options, one list per dataset,
while promptsource lets each template word its choices differently ("yes ||| no", "True ||| False").
Templates that use their choices must therefore agree on them: the list given with ``--options`` (your
registry's ``options:``), else the most common one in the file; the others are skipped. Per-example
choices (Jinja inside ``answer_choices``) correspond to a registry ``options_field``.

Turned-around rule (metadata ``original_task``): true or missing -> a template that does the task;
false -> kept as ``turned_around: true`` only if it is the task inverted, i.e. the gold answer is in the
inputs (``{answer}`` in inputs, not in targets) and an input field is the target ("Write a {answer} review"
-> "{sentence}"); any other non-original task is skipped. At most ``MAX_TURNED_AROUND`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from jinja2 import meta, nodes
from jinja2.exceptions import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flanpipe.core.io import StrictLoader
from flanpipe.data.jinja_templates import GLOBALS, GuardedSandbox, JinjaSpec, unsafe_constructs
from flanpipe.data.template_import import (
    ANSWER,
    ImportedTemplate,
    ImportResult,
    SkippedTemplate,
    TemplateImportError,
    Unconvertible,
    checked_pattern,
    finish_import,
    is_task_inverted,
    merge_pieces,
)
from flanpipe.data.templates import OPTIONS_PLACEHOLDER, Piece, pattern_expr, placeholders

log = logging.getLogger(__name__)

CHOICES = "answer_choices"  # promptsource's reserved variable
SEPARATOR = "|||"  # promptsource: inputs ||| targets (also between answer choices)
MAX_SAMPLE_RECORDS = 64  # enough to exercise a template; keeps the check instant
_OPTIONS_COLUMN = "__flanpipe_options_text__"

# --------------------------------------------------------------------------------------------------------
# promptsource: YAML


class PromptsourceLoader(StrictLoader):
    """The strict loader (duplicate keys are errors) that also knows promptsource's ``!Template``/
    ``!TemplateMetadata`` tags, built as dicts."""


def _construct_plain_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, f"expected a mapping after {node.tag}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


for _tag in ("!Template", "!TemplateMetadata"):
    PromptsourceLoader.add_constructor(_tag, _construct_plain_mapping)


def load_promptsource_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse one promptsource ``templates.yaml`` as pure data (unknown tags are errors, never code)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: file not found") from e
    loader = PromptsourceLoader(text)
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise TemplateImportError(f"{where}: not a promptsource templates file: {getattr(e, 'problem', e)}") from e
    finally:
        loader.dispose()
    if not isinstance(doc, dict) or not isinstance(doc.get("templates"), dict) or not doc["templates"]:
        raise TemplateImportError(f"{p}: expected a mapping with a non-empty 'templates' mapping (uuid -> !Template)")
    return doc


def _promptsource_name(doc: Mapping[str, Any]) -> str:
    subset = doc.get("subset")
    return f"{doc.get('dataset')}/{subset}" if subset else str(doc.get("dataset"))


def find_promptsource_file(source: str | os.PathLike[str], dataset: str) -> Path:
    """``source`` is a templates.yaml, or promptsource's templates root holding ``{dataset}[/{subset}]/``."""
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{root}: not found")
    path = root if root.is_file() else root / dataset / "templates.yaml"
    if not path.is_file():
        found = sorted(str(p.parent.relative_to(root)) for p in root.rglob("templates.yaml"))
        raise TemplateImportError(
            f"{root}: no templates for dataset {dataset!r} (looked for {path}); available: {found[:30]}"
        )
    return path


# --------------------------------------------------------------------------------------------------------
# promptsource: Jinja -> pattern


def sandbox() -> GuardedSandbox:
    """Where source Jinja is parsed and rendered: the guarded sandbox that renders the shards, so it knows
    promptsource's filters and globals (``choice``, ``most_frequent``, ``namespace``, ...; a template that
    calls them is kept, not skipped as unparsable) and refuses what the shards would refuse."""
    return GuardedSandbox()


@dataclass(frozen=True)
class Conversion:
    inputs: str
    targets: str
    label: str | None  # the variable that indexes answer_choices (or guards on it)
    join_sep: str | None  # separator of the answer_choices | join(...) that became {options_}
    uses_answer: bool


@dataclass
class _Walk:
    """State of one template's conversion."""

    choices: list[str] | None  # static answer choices; None when absent or per-example
    field_map: Mapping[str, str]
    label: str | None = None
    join_sep: str | None = None
    uses_answer: bool = False

    def set_label(self, name: str) -> None:
        if self.label not in (None, name):
            raise Unconvertible(f"answer_choices is indexed by both {self.label!r} and {name!r}")
        self.label = name


def static_choices(env: ImmutableSandboxedEnvironment, answer_choices: str | None) -> list[str] | None:
    """The choices when ``answer_choices`` is plain text ("yes ||| no"); None when absent or templated."""
    if answer_choices is None:
        return None
    body = env.parse(answer_choices).body
    if all(isinstance(n, nodes.Output) and all(isinstance(c, nodes.TemplateData) for c in n.nodes) for n in body):
        text = "".join(c.data for n in body for c in n.nodes)  # type: ignore[attr-defined]
        return [c.strip() for c in text.split(SEPARATOR)]
    return None


def _describe(expr: nodes.Node) -> str:
    if isinstance(expr, nodes.Filter):
        return f"filter '{expr.name}'"
    if isinstance(expr, nodes.Test):
        return f"test '{expr.name}'"
    if isinstance(expr, nodes.Getattr):
        return f"attribute access '.{expr.attr}'"
    if isinstance(expr, nodes.Call):
        return "a call"
    if isinstance(expr, nodes.Getitem):
        return "indexing/slicing"
    return f"a {type(expr).__name__} expression"


def _is_choices(expr: nodes.Node | None) -> bool:
    return isinstance(expr, nodes.Name) and expr.name == CHOICES


def _const(expr: nodes.Expr) -> Any:
    try:
        return expr.as_const()
    except nodes.Impossible:
        return None


def _convert_expr(expr: nodes.Expr, w: _Walk) -> Piece:
    """One ``{{ ... }}``: a field, {answer}, {options_} or literal text -- or Unconvertible."""
    where = f"line {expr.lineno}"
    if isinstance(expr, nodes.Name):
        if expr.name == CHOICES:
            raise Unconvertible(f"{where}: prints answer_choices as a Python list")
        name = w.field_map.get(expr.name, expr.name)
        if name == OPTIONS_PLACEHOLDER:
            raise Unconvertible(f"{where}: variable {expr.name!r} collides with the {{options_}} placeholder")
        return ("field", name)
    if isinstance(expr, nodes.Const) and isinstance(expr.value, str):
        return ("text", expr.value)
    if isinstance(expr, nodes.Getitem) and _is_choices(expr.node):
        if isinstance(expr.arg, nodes.Name):
            w.set_label(expr.arg.name)
            w.uses_answer = True
            return ("field", ANSWER)
        index = _const(expr.arg)
        if type(index) is not int:
            raise Unconvertible(f"{where}: answer_choices indexed by {_describe(expr.arg)}")
        if w.choices is None:
            raise Unconvertible(f"{where}: answer_choices[{index}] with per-example choices has no pattern form")
        if not -len(w.choices) <= index < len(w.choices):
            raise Unconvertible(f"{where}: answer_choices[{index}] is out of range ({len(w.choices)} choices)")
        return ("text", w.choices[index])
    if isinstance(expr, nodes.Filter) and expr.name == "join" and _is_choices(expr.node):
        sep = _const(expr.args[0]) if len(expr.args) == 1 else "" if not expr.args else None
        if expr.kwargs or expr.dyn_args or expr.dyn_kwargs or not isinstance(sep, str):
            raise Unconvertible(f"{where}: answer_choices | join(...) needs one constant separator")
        if w.join_sep not in (None, sep):
            raise Unconvertible(f"{where}: answer_choices is joined twice with different separators")
        w.join_sep = sep
        return ("field", OPTIONS_PLACEHOLDER)
    raise Unconvertible(f"{where}: {_describe(expr)} is not a plain substitution")


def _is_label_guard(node: nodes.If, w: _Walk) -> bool:
    """``{% if label != -1 %}`` (or ``>= 0``, ``> -1``): true for every valid label index, no else branch."""
    test = node.test
    if node.elif_ or node.else_ or not isinstance(test, nodes.Compare) or len(test.ops) != 1:
        return False
    if not isinstance(test.expr, nodes.Name):
        return False
    op, bound = test.ops[0].op, _const(test.ops[0].expr)
    if type(bound) is not int:
        return False
    if (op == "ne" and bound < 0) or (op == "ge" and bound <= 0) or (op == "gt" and bound < 0):
        w.set_label(test.expr.name)
        return True
    return False


_STATEMENTS = {"For": "for", "If": "if", "Assign": "set", "AssignBlock": "set", "FilterBlock": "filter"}


def _convert_body(body: Sequence[nodes.Node], w: _Walk) -> list[Piece]:
    out: list[Piece] = []
    for node in body:
        if isinstance(node, nodes.Output):
            for child in node.nodes:
                out.append(("text", child.data) if isinstance(child, nodes.TemplateData) else _convert_expr(child, w))
        elif isinstance(node, nodes.If) and _is_label_guard(node, w):
            out.extend(_convert_body(node.body, w))
        else:
            kind = _STATEMENTS.get(type(node).__name__, type(node).__name__.lower())
            raise Unconvertible(f"line {node.lineno}: control flow {{% {kind} %}} has no {{field}} pattern form")
    return out


def _split_sides(pieces: list[Piece]) -> tuple[list[Piece], list[Piece]]:
    """Cut at promptsource's ``|||`` and strip each side's literal edges, as promptsource strips its output."""
    sides: list[list[Piece]] = [[]]
    for kind, value in merge_pieces(pieces):
        if kind != "text":
            sides[-1].append((kind, value))
            continue
        for j, chunk in enumerate(value.split(SEPARATOR)):
            if j:
                sides.append([])
            sides[-1].append(("text", chunk))
    if len(sides) != 2:
        raise Unconvertible("no '|||' between input and target" if len(sides) == 1 else "more than one '|||'")
    stripped = []
    for side in sides:
        side = merge_pieces(side)
        if side and side[0][0] == "text":
            side[0] = ("text", side[0][1].lstrip())
        if side and side[-1][0] == "text":
            side[-1] = ("text", side[-1][1].rstrip())
        stripped.append(merge_pieces(side))
    return stripped[0], stripped[1]


def convert_template(
    env: ImmutableSandboxedEnvironment, jinja: str, answer_choices: str | None, field_map: Mapping[str, str]
) -> Conversion:
    """A promptsource Jinja template as (inputs, targets) patterns, or Unconvertible with the reason."""
    try:
        tree = env.parse(jinja)
        choices = static_choices(env, answer_choices)
    except JinjaError as e:
        raise Unconvertible(f"Jinja does not parse: {_first_line(e)}") from None
    w = _Walk(choices=choices, field_map=field_map)
    inputs, targets = _split_sides(_convert_body(tree.body, w))
    if not inputs:
        raise Unconvertible("the input side is empty")
    if not targets:
        raise Unconvertible("the target side is empty")
    if (w.uses_answer or w.join_sep is not None) and answer_choices is None:
        raise Unconvertible("uses answer_choices but the template defines none")
    try:
        return Conversion(checked_pattern(inputs), checked_pattern(targets), w.label, w.join_sep, w.uses_answer)
    except ValueError as e:
        raise Unconvertible(str(e)) from None


def render_promptsource(
    env: ImmutableSandboxedEnvironment, jinja: str, answer_choices: str | None, record: Mapping[str, Any]
) -> tuple[list[str] | None, list[str]]:
    """promptsource's ``Template.apply``: choices rendered and split first, then the template, split on |||."""
    ctx = dict(record)
    choices = None
    if answer_choices is not None:
        choices = [c.strip() for c in env.from_string(answer_choices).render(ctx).split(SEPARATOR)]
        ctx[CHOICES] = choices
    return choices, [part.strip() for part in env.from_string(jinja).render(ctx).split(SEPARATOR)]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def synthesize_records(
    env: ImmutableSandboxedEnvironment, jinja: str, answer_choices: str | None, label: str | None
) -> list[dict[str, Any]]:
    """One record per label value; every other variable gets a distinct text naming it, so a swap shows."""
    try:  # source Jinja may fail in any way (unknown filters, ...); the sandbox keeps it harmless
        names = set(meta.find_undeclared_variables(env.parse(jinja)))
        if answer_choices is not None:
            names |= meta.find_undeclared_variables(env.parse(answer_choices))
        base: dict[str, Any] = {n: f"<{n} value>" for n in sorted(names - {CHOICES, label or ""})}
        n_choices = 1
        if answer_choices is not None:
            n_choices = len(env.from_string(answer_choices).render(base).split(SEPARATOR))
    except Exception as e:
        raise Unconvertible(f"answer_choices does not render: {_first_line(e)}") from None
    if label is None:
        return [base]
    return [{**base, label: i} for i in range(n_choices)]


def check_equivalent(
    env: ImmutableSandboxedEnvironment,
    conv: Conversion,
    jinja: str,
    answer_choices: str | None,
    records: Sequence[Mapping[str, Any]],
    field_map: Mapping[str, str],
) -> int:
    """Render the Jinja original and our patterns (with the real Polars renderer) on every record.

    Returns how many records were compared; records whose label is not a valid choice index (P3's -1 for
    unlabelled rows) are left out, since our canonical rows always carry a label.
    """
    rows: list[dict[str, str | None]] = []
    expected: list[tuple[str, ...]] = []
    record_ids: list[int] = []
    for i, rec in enumerate(records):
        try:
            choices, parts = render_promptsource(env, jinja, answer_choices, rec)
        except Exception as e:  # source Jinja may fail in any way; the sandbox keeps it harmless
            raise Unconvertible(f"the Jinja original does not render on sample record {i}: {_first_line(e)}") from None
        row: dict[str, str | None] = {field_map.get(k, k): None if v is None else str(v) for k, v in rec.items()}
        if conv.label is not None:
            index = rec.get(conv.label)
            if type(index) is not int or index < 0 or (choices is not None and index >= len(choices)):
                continue
            if conv.uses_answer and choices is not None:
                row[ANSWER] = choices[index]
        if conv.join_sep is not None and choices is not None:
            row[_OPTIONS_COLUMN] = conv.join_sep.join(choices)
        rows.append(row)
        expected.append(tuple(parts))
        record_ids.append(i)
    if not rows:
        raise Unconvertible("no sample record has a valid label to check the conversion on")
    columns = sorted({k for r in rows for k in r})
    needed = {n for p in (conv.inputs, conv.targets) for n in placeholders(p)} - {OPTIONS_PLACEHOLDER}
    missing = sorted(needed - set(columns))
    if missing:
        raise Unconvertible(f"sample records lack field(s) {missing} (check --field-map)")
    df = pl.DataFrame(rows, schema={c: pl.Utf8 for c in columns}, orient="row")
    options = pl.col(_OPTIONS_COLUMN) if _OPTIONS_COLUMN in columns else pl.lit("")
    ours = df.select(
        pattern_expr(conv.inputs, options).alias("inputs"), pattern_expr(conv.targets, options).alias("targets")
    ).rows()
    for i, theirs, mine in zip(record_ids, expected, ours, strict=True):
        if theirs != mine:
            raise Unconvertible(
                f"on sample record {i} the pattern renders {mine!r} where the Jinja original renders {theirs!r}"
            )
    return len(rows)


def read_sample(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Up to MAX_SAMPLE_RECORDS JSON objects, one a line, in the source's own column names."""
    p = Path(path)
    records: list[dict[str, Any]] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: file not found") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TemplateImportError(f"{p}:{n}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise TemplateImportError(f"{p}:{n}: expected a JSON object per line")
        records.append(rec)
        if len(records) == MAX_SAMPLE_RECORDS:
            break
    if not records:
        raise TemplateImportError(f"{p}: no sample records")
    return records


def _turned_around(metadata: Any, conv: Conversion) -> bool:
    """The documented rule: original_task false is kept only when it is the task inverted."""
    original = metadata.get("original_task") if isinstance(metadata, dict) else None
    if original is not False:
        return False
    if is_task_inverted(conv.inputs, conv.targets):
        return True
    raise Unconvertible("original_task is false and it is not the task turned around")


def _choice_key(env: ImmutableSandboxedEnvironment, answer_choices: str) -> tuple[str, ...] | str:
    """What {answer}/{options_} stand for: a fixed list, or (per-example choices) the Jinja that makes them."""
    fixed = static_choices(env, answer_choices)
    return tuple(fixed) if fixed is not None else answer_choices


def _describe_choices(key: tuple[str, ...] | str) -> str:
    if isinstance(key, tuple):
        return " ||| ".join(key)
    return f"per-example {key!r}"


def import_promptsource(
    source: str | os.PathLike[str],
    dataset: str,
    *,
    field_map: Mapping[str, str] | None = None,
    sample: str | os.PathLike[str] | None = None,
    options: Sequence[str] | None = None,
    keep_jinja: bool = False,
    verbatim: bool = False,
    label: str | None = None,
    label_offset: int = 0,
) -> ImportResult:
    """Convert every faithfully convertible template of one promptsource dataset (see the module doc).

        ``verbatim`` (``--verbatim``): every template that does the original task is kept as written (``kind:
        jinja``), none converted to a pattern: P3's prompts exactly as T0 evaluates them, each scored over its
        own ``answer_choices``. ``label``: the variable holding the source label where the templates do not show it
    (``{% if answer | int == 1 %}``); ``label_offset``: that label counts from 1 (WinoGrande's "1"/"2").

        ``keep_jinja`` (``--jinja``): a template that is not a plain substitution, changes surface form
        (``answer_choices | join`` -> ``{options_}``) or words its choices differently is kept verbatim as a
        ``kind: jinja`` template instead of skipped; unsafe Jinja is refused with the file and template named.
        Long but flat: one pass over the file's templates, each either converted, kept or skipped with its reason.
    """
    fmap = dict(field_map or {})
    keep_jinja = keep_jinja or verbatim
    path = find_promptsource_file(source, dataset)
    doc = load_promptsource_yaml(path)
    if _promptsource_name(doc) != dataset:
        raise TemplateImportError(f"{path}: holds templates for {_promptsource_name(doc)!r}, not {dataset!r}")
    records = read_sample(sample) if sample is not None else None
    env = sandbox()
    kept: list[tuple[ImportedTemplate, tuple[str, ...] | str | None, dict[str, Any]]] = []
    skipped: list[SkippedTemplate] = []
    broken: list[SkippedTemplate] = []  # --verbatim: prompts of the original task that cannot be kept as written
    for key, t in doc["templates"].items():
        if not isinstance(t, dict):
            raise TemplateImportError(f"{path}: template {key}: expected a !Template mapping")
        src = f'{t.get("id", key)} "{t.get("name", "?")}"'
        jinja, answer_choices = t.get("jinja"), t.get("answer_choices")
        if not isinstance(jinja, str) or not jinja.strip():
            raise TemplateImportError(f"{path}: template {src}: 'jinja' must be a non-empty string")
        if answer_choices is not None and not isinstance(answer_choices, str):
            raise TemplateImportError(f"{path}: template {src}: 'answer_choices' must be a string or null")
        if keep_jinja:
            _refuse_unsafe(env, path, src, jinja, answer_choices)
        if verbatim:
            try:
                kept.append((verbatim_template(env, t, src, fmap, label_offset, label), None, t))
            except Unconvertible as e:
                (skipped if _turned(t) else broken).append(SkippedTemplate(src, str(e)))
            continue
        try:
            conv = convert_template(env, jinja, answer_choices, fmap)
            turned = _turned_around(t.get("metadata"), conv)
            recs = records if records is not None else synthesize_records(env, jinja, answer_choices, conv.label)
            check_equivalent(env, conv, jinja, answer_choices, recs, fmap)
            if keep_jinja and conv.join_sep is not None:
                raise Unconvertible("{options_} would replace its inline choices")
        except Unconvertible as e:
            if keep_jinja:
                try:
                    kept.append((verbatim_template(env, t, src, fmap), None, t))
                except Unconvertible as e2:
                    skipped.append(SkippedTemplate(src, str(e2)))
            else:
                skipped.append(SkippedTemplate(src, str(e)))
            continue
        uses_choices = conv.uses_answer or conv.join_sep is not None
        choice_key = _choice_key(env, answer_choices) if uses_choices and answer_choices is not None else None
        kept.append((ImportedTemplate(src, conv.inputs, conv.targets, turned), choice_key, t))

    if broken:  # --verbatim promises every prompt of the task as written: a missing one fails the import
        reasons = "; ".join(f"{b.source}: {b.reason}" for b in broken)
        raise TemplateImportError(
            f"{path}: --verbatim keeps every prompt of {dataset!r} that does the original task as written, but "
            f"{len(broken)} cannot be kept ({reasons}); nothing written. Fix or remove them in the source, or import "
            "without --verbatim (--jinja keeps what parses and lists what it skips)"
        )
    # {answer}/{options_} render ONE option list per dataset: keep the templates that agree on it.
    notes: list[str] = []
    keys = [k for _, k, _ in kept if k is not None]
    chosen: tuple[str, ...] | str | None = tuple(options) if options is not None else None
    if chosen is None and keys:
        chosen = Counter(keys).most_common(1)[0][0]  # ties: the first seen (Counter keeps insertion order)
    if chosen is not None:
        notes.append(
            f"answer choices: {_describe_choices(chosen)} -- {{answer}}/{{options_}} assume the registry's "
            + ("options: are exactly these, in this order" if isinstance(chosen, tuple) else "options_field")
        )
    templates: list[ImportedTemplate] = []
    for t, k, raw in kept:
        if k is not None and k != chosen and keep_jinja:  # its own wording of the choices, kept as written
            try:
                templates.append(verbatim_template(env, raw, t.source, fmap))
            except Unconvertible as e:
                skipped.append(SkippedTemplate(t.source, str(e)))
        elif k is not None and k != chosen:
            skipped.append(
                SkippedTemplate(
                    t.source,
                    f"answer choices {_describe_choices(k)} differ from the dataset's ({_describe_choices(chosen)})",
                )
            )
        else:
            templates.append(t)
    return finish_import("promptsource", path, dataset, templates, skipped, notes)


def _refuse_unsafe(
    env: ImmutableSandboxedEnvironment, path: Path, src: str, jinja: str, answer_choices: str | None
) -> None:
    """Sandbox escapes (dunder attributes, attr filter, includes) stop the import, naming file and template."""
    for what, text in (("jinja", jinja), ("answer_choices", answer_choices)):
        if text is None:
            continue
        try:
            bad = unsafe_constructs(env.parse(text))
        except JinjaError:
            continue  # a parse error is reported (and the template skipped) by the conversion
        if bad:
            raise TemplateImportError(f"{path}: template {src} ({what}): refused by the sandbox: {'; '.join(bad)}")


def _label_variable(tree: nodes.Template, free: set[str]) -> str | None:
    """The variable that indexes answer_choices (``answer_choices[label]``, ``answer_choices[answer | int - 1]``),
    if exactly one does; else P3's usual ``label`` when the template uses it (``endings[label]``)."""
    names = {
        name.name
        for n in tree.find_all(nodes.Getitem)
        if _is_choices(n.node)
        for name in ([n.arg] if isinstance(n.arg, nodes.Name) else n.arg.find_all(nodes.Name))
        if name.name in free
    }
    if len(names) == 1:
        return names.pop()
    return "label" if "label" in free else None


def variable_shapes(field_map: Mapping[str, str], free: set[str]) -> dict[str, Any]:
    """``--field-map`` as Jinja ``variables``: ``a=b`` renames a variable, ``a.x=b`` builds ``a`` as a
    mapping whose ``x`` is field ``b`` (``answers.text=references``: P3's ``answers.text`` is the list of
    every reference). Only the template's free variables; an identity rename is no variable."""
    shapes: dict[str, Any] = {}
    for old, new in sorted(field_map.items()):
        head, *rest = old.split(".")
        if head not in free or (not rest and new == head):
            continue
        if not rest:
            shapes[head] = new
            continue
        node = shapes.setdefault(head, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise Unconvertible(f"--field-map maps {head!r} both whole and by its parts")
        node[rest[-1]] = new
    return shapes


def _turned(t: Mapping[str, Any]) -> bool:
    """promptsource's metadata says the template does not do the original task."""
    metadata = t.get("metadata")
    return isinstance(metadata, dict) and metadata.get("original_task") is False


def verbatim_template(
    env: ImmutableSandboxedEnvironment,
    t: Mapping[str, Any],
    src: str,
    field_map: Mapping[str, str],
    label_offset: int = 0,
    label_name: str | None = None,
) -> ImportedTemplate:
    """A promptsource template kept as written; ``--field-map`` renames become its ``variables``.

    The variable indexing ``answer_choices`` becomes ``label``: at render time it receives the gold answer's
    index in the registry's options, so those must follow the source's label order.
    """
    if _turned(t):
        raise Unconvertible("original_task is false (turned-around cannot be checked for a Jinja template)")
    jinja, answer_choices = t["jinja"], t.get("answer_choices")
    try:
        tree = env.parse(jinja)
        free = set(meta.find_undeclared_variables(tree))
        if answer_choices is not None:
            free |= meta.find_undeclared_variables(env.parse(answer_choices))
    except JinjaError as e:
        raise Unconvertible(f"Jinja does not parse: {_first_line(e)}") from None
    if SEPARATOR not in jinja:
        raise Unconvertible(f"no '{SEPARATOR}' between prompt and target: it can never render both")
    label = label_name if label_name is not None and label_name in free else _label_variable(tree, free)
    free -= {CHOICES, label or "", *GLOBALS}
    variables = variable_shapes(field_map, free)
    name = t.get("name") if isinstance(t.get("name"), str) else ""
    offset = label_offset if label is not None else 0
    return ImportedTemplate(src, "", "", False, JinjaSpec(jinja, answer_choices, label, variables, name, offset))
