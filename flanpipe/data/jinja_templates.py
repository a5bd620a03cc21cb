"""The second template kind: promptsource/P3 Jinja, rendered verbatim, row by row, in a guarded sandbox.

A ``{field}`` pattern (flanpipe.data.templates) is a column expression; a Jinja template with conditionals,
indexing (``answers.text[0]``, ``endings[label]``), filters and per-example ``answer_choices`` is a small
program, so it is rendered one row at a time (``render_rows``). The shard renderer dispatches per template:
pattern templates stay on the vectorised Polars path, Jinja templates come here.

Rendering follows promptsource's ``Template.apply`` (written from its documented behaviour, not copied):

1. ``answer_choices`` (itself Jinja) is rendered with the example, split on ``|||``, each choice stripped;
2. the template is rendered with the example plus ``answer_choices`` (that list);
3. the output is split on ``|||`` and each part stripped: part 0 is the inputs, part 1 the targets.
   ``|||`` inside example text is escaped before rendering so it cannot split the output.

P3's template environment: promptsource renders with a plain ``jinja2.Environment`` plus the global ``zip``
and the filters ``choice`` (a random element), ``most_frequent`` (the list of the most frequent items, ties
kept) and ``highlight`` (an HTML span, for its browser); templates also call jinja's own ``range``,
``namespace`` and the ``random`` filter. The sandbox offers all of these (``PROMPTSOURCE_FILTERS``,
``GLOBALS``), so P3's templates import and render as written.

Differences from promptsource, on purpose: ``choice`` and ``random`` draw from a generator seeded per
(template, example) (``start_row``), not from the process-wide ``random``, so a shard renders the same text
every time; jinja's ``lipsum`` is left out (no promptsource template calls it, and it draws from the
process-wide ``random``, which no per-example seed reaches); variable text is not truncated (tokenization
enforces lengths); an output that is not exactly "inputs ||| targets" is an error naming the template and
example.

What the sandbox enforces (``GuardedSandbox``, an ``ImmutableSandboxedEnvironment``, never a plain one):

- at load/validation time (``unsafe_constructs``): no attribute or item whose name starts with ``_``
  (``''.__class__``, ``x['__globals__']``, ``x|attr('__init__')``), no include/import/extends, and every
  free variable must be a field, a declared variable, ``answer_choices`` or one of the globals
  (``GLOBALS``: promptsource's ``range``, ``zip``, ``namespace``, ``dict``, ``cycler``, ``joiner``, plus
  ``enumerate``); ``lipsum`` is removed;
- at render time: jinja's sandbox refuses unsafe attributes and calls (``SecurityError``); collections are
  immutable; ``range`` yields at most ``MAX_RANGE`` items; ``*`` cannot build a string/list longer than
  ``MAX_OUTPUT_CHARS`` and ``**`` exponents are bounded; every call, attribute, item and ``range`` step
  checks a wall-clock deadline of ``ROW_SECONDS`` per row, and the output is capped at ``MAX_OUTPUT_CHARS``.
  A loop over a row's own list is bounded by the data.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from jinja2 import StrictUndefined, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flanpipe.core.registry import REFERENCES, DatasetSpec
from flanpipe.data.patterns import SHARD_SCHEMA, Template, TemplateError, rendered_columns

SEPARATOR = "|||"
CHOICES = "answer_choices"
MAX_RANGE = 10_000
MAX_OUTPUT_CHARS = 1_000_000
MAX_EXPONENT = 256
ROW_SECONDS = 1.0
# promptsource's environment: jinja's default globals (less lipsum) plus zip; enumerate is flanpipe's own
GLOBALS = ("range", "zip", "enumerate", "namespace", "dict", "cycler", "joiner")
PROMPTSOURCE_FILTERS = ("choice", "most_frequent", "highlight", "random")  # "random": jinja's, re-seeded
_PIPE_ESCAPE = "\ue0f1\ue0f2\ue0f1"  # private-use code points: upper/title/trim leave them alone
_ENTRY_KEYS = {"kind", "name", "jinja", "answer_choices", "label", "label_offset", "variables", "turned_around"}
INDEXED_FIELD = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)\[(?P<index>\d+)\]$")  # a variable shape "options[0]"


def _arrow_types() -> dict[str, Any]:
    """The shard's columns as Arrow types; pyarrow loads here, when Jinja rows are rendered (~120 ms with
    numpy), not in every render job that imports this module."""
    import pyarrow as pa

    return {
        "dataset": pa.large_string(),
        "cluster": pa.large_string(),
        "split": pa.large_string(),
        "example_id": pa.int64(),
        "template_id": pa.int32(),
        "turned_around": pa.bool_(),
        "inputs": pa.large_string(),
        "targets": pa.large_string(),
        "options": pa.large_list(pa.large_string()),
    }


class RenderLimitError(SecurityError):
    """A row's render ran past its wall-clock budget or built an oversized value."""


@dataclass(frozen=True)
class JinjaSpec:
    """A promptsource template kept verbatim.

    ``variables`` rebuilds the source record's shape from canonical fields (``{answers: {text: [answer]}}``
    makes ``answers.text[0]`` the canonical ``answer``; ``{answers: {text: references}}`` gives the list of
    every acceptable answer, as Quoref's ``answers.text | choice`` expects; ``options[0]`` is one entry of a
    list field, as SuperGLUE COPA's ``choice1``); ``label`` names the variable that receives the gold
    answer's index in the dataset's options (P3 indexes ``answer_choices`` with the source label), plus
    ``label_offset`` where the source counts from 1 (WinoGrande's ``answer`` "1"/"2").
    """

    jinja: str
    answer_choices: str | None = None
    label: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    label_offset: int = 0


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """promptsource's ``most_frequent``: every item of the highest count, in first-seen order (so
    ``answers.text | most_frequent | choice`` picks among the tied majority answers); None for no items."""
    if not items:
        return None
    counts = Counter(items).most_common()  # equal counts keep first-seen order
    return [item for item, n in counts if n == counts[0][1]]


def _highlight(text: Any) -> str:
    """promptsource's ``highlight`` (its browser marks substituted text): the same HTML span."""
    return "<span style='color: #F08080'>" + str(text) + "</span>"


class GuardedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment plus a per-row deadline, a bounded ``range`` and bounded ``*``/``**``.

    Not thread-safe: the deadline and the random stream belong to the row being rendered.
    """

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, row_seconds: float = ROW_SECONDS) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.row_seconds = row_seconds
        self.deadline = float("inf")
        self.row_seed = 0
        self.rng = random.Random(0)
        self.globals.pop("lipsum", None)  # process-wide randomness (see the module doc)
        self.globals.update(range=self._range, zip=zip, enumerate=enumerate)  # namespace/dict/cycler/joiner: jinja's
        self.filters.update(
            choice=self._choice, random=self._choice, most_frequent=_most_frequent, highlight=_highlight
        )

    def start_row(self, seed: int) -> None:
        """A row begins: its deadline starts and its random stream is reseeded, so every draw of the row
        (answer choices first, then the template, in render order) is a function of ``seed`` alone."""
        self.deadline = time.monotonic() + self.row_seconds
        self.row_seed = seed
        self.rng = random.Random(seed)

    def _choice(self, items: Sequence[Any]) -> Any:
        """promptsource's ``choice`` and jinja's ``random``: one element, drawn from the row's stream."""
        self.check_deadline()
        return self.rng.choice(list(items))

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitError(f"render took longer than {self.row_seconds}s for one row")

    def _range(self, *args: int) -> Iterator[int]:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise RenderLimitError(f"range of {len(r)} items (at most {MAX_RANGE})")
        for i in r:
            self.check_deadline()
            yield i

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.check_deadline()
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise RenderLimitError(f"exponent {right} (at most {MAX_EXPONENT})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise RenderLimitError(f"'*' would build {len(seq) * n} items (at most {MAX_OUTPUT_CHARS})")
        return super().call_binop(context, operator, left, right)


# --------------------------------------------------------------------------------------------------------
# loading and static checks


def _where(path: str | os.PathLike[str], t: Template) -> str:
    name = f' "{t.jinja.name}"' if t.jinja is not None and t.jinja.name else ""
    return f"{path}: template {t.index}{name}"


def load_entry(path: str | os.PathLike[str], index: int, raw: Mapping[str, Any]) -> Template:
    """One ``kind: jinja`` entry of a template file; structure and safety are checked here."""
    where = f"{path}: template {index}" + (f' "{raw["name"]}"' if isinstance(raw.get("name"), str) else "")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise TemplateError(f"{where}: unknown key(s) {sorted(unknown)} for a jinja template")
    if not isinstance(raw.get("jinja"), str) or not raw["jinja"].strip():
        raise TemplateError(f"{where}: 'jinja' must be a non-empty string")
    for key in ("answer_choices", "label", "name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise TemplateError(f"{where}: {key!r} must be a string")
    variables = raw.get("variables") or {}
    if not isinstance(variables, dict):
        raise TemplateError(f"{where}: 'variables' must map Jinja variable names to fields")
    if not isinstance(raw.get("turned_around", False), bool):
        raise TemplateError(f"{where}: 'turned_around' must be true or false")
    offset = raw.get("label_offset", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or (offset and raw.get("label") is None):
        raise TemplateError(f"{where}: 'label_offset' must be an integer, with 'label' set")
    spec = JinjaSpec(
        raw["jinja"], raw.get("answer_choices"), raw.get("label"), variables, raw.get("name") or "", offset
    )
    t = Template(index, "", "", bool(raw.get("turned_around", False)), kind="jinja", jinja=spec)
    env = GuardedSandbox()
    for what, source in (("jinja", spec.jinja), ("answer_choices", spec.answer_choices)):
        if source is None:
            continue
        try:
            tree = env.parse(source)
        except JinjaError as e:
            raise TemplateError(f"{where} ({what}): Jinja does not parse: {e}") from None
        bad = unsafe_constructs(tree)
        if bad:
            raise TemplateError(f"{where} ({what}): refused by the sandbox: {'; '.join(bad)}")
    return t


def unsafe_constructs(tree: nodes.Template) -> list[str]:
    """What the static check refuses: private/dunder attributes and items, and loading other templates."""
    bad: list[str] = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name, nodes.Include)):
        line = f"line {node.lineno}"
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            bad.append(f"{line}: attribute '.{node.attr}'")
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            if isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
                bad.append(f"{line}: item [{node.arg.value!r}]")
        elif isinstance(node, nodes.Filter) and node.name == "attr":
            bad.append(f"{line}: filter 'attr' (write the attribute instead)")
        elif isinstance(node, nodes.Name) and node.name.startswith("_"):
            bad.append(f"{line}: name {node.name!r}")
        elif isinstance(node, nodes.Include):
            bad.append(f"{line}: include")
    for kind in (nodes.Import, nodes.FromImport, nodes.Extends):
        for node in tree.find_all(kind):
            bad.append(f"line {node.lineno}: {kind.__name__.lower()}")
    return bad


def _shape_fields(shape: Any) -> Iterator[Any]:
    if isinstance(shape, str):
        m = INDEXED_FIELD.match(shape)
        yield m["field"] if m else shape
    elif isinstance(shape, list):
        for s in shape:
            yield from _shape_fields(s)
    elif isinstance(shape, dict):
        for s in shape.values():
            yield from _shape_fields(s)
    else:
        yield shape


def validate(t: Template, spec: DatasetSpec, path: str | os.PathLike[str]) -> None:
    """Free variables, variable shapes and the label against the dataset, before any job runs."""
    assert t.jinja is not None
    j, where = t.jinja, _where(path, t)
    fields = set(spec.fields)
    for var, shape in j.variables.items():
        for f in _shape_fields(shape):
            if f not in fields and f != REFERENCES:
                raise TemplateError(
                    f"{where}: variable {var!r} uses {f!r}, not a field of dataset {spec.name!r} "
                    f"(fields: {sorted(fields)})"
                )
    if j.label is not None and not spec.has_options:
        raise TemplateError(f"{where}: 'label: {j.label}' needs options, and dataset {spec.name!r} has none")
    known = fields | set(j.variables) | {CHOICES, *GLOBALS} | ({j.label} if j.label else set())
    env = GuardedSandbox()
    for what, source in (("jinja", j.jinja), ("answer_choices", j.answer_choices)):
        if source is None:
            continue
        free = meta.find_undeclared_variables(env.parse(source))
        unknown = sorted(free - known)
        if unknown:
            raise TemplateError(
                f"{where} ({what}): variable(s) {unknown} are not fields of dataset {spec.name!r} "
                f"(fields: {sorted(fields)}); map them under 'variables' or set 'label'"
            )
    if CHOICES in meta.find_undeclared_variables(env.parse(j.jinja)) and j.answer_choices is None:
        raise TemplateError(f"{where}: uses answer_choices but defines none")
    check_static_text(j, f"{where} of dataset {spec.name!r}")
    if j.label is not None and j.answer_choices is not None and _is_literal(j.answer_choices) and spec.options:
        n = len(j.answer_choices.split(SEPARATOR))
        if n != len(spec.options):  # the label is the gold's index in the registry's options
            raise TemplateError(
                f"{where} (answer_choices): {n} literal choices, but 'label: {j.label}' indexes dataset "
                f"{spec.name!r}'s {len(spec.options)} options {list(spec.options)}: they must be the same labels, in "
                "the same order"
            )


def _is_literal(source: str) -> bool:
    """Jinja source with no expression, statement or comment: it renders as itself."""
    return not any(mark in source for mark in ("{{", "{%", "{#"))


def check_static_text(j: JinjaSpec, where: str) -> None:
    """What the source text alone decides, checked while planning: a template without ``|||`` can never
    render "inputs ||| targets", and literal answer_choices must be distinct, non-empty choices (a repeated
    choice makes the gold of that label ambiguous)."""
    if SEPARATOR not in j.jinja:
        raise TemplateError(
            f"{where}: the template has no '{SEPARATOR}', so it can never render \"inputs {SEPARATOR} targets\" "
            f"(promptsource separates the prompt from its target with '{SEPARATOR}')"
        )
    if j.answer_choices is not None and _is_literal(j.answer_choices):
        problem = choices_problem([c.strip() for c in j.answer_choices.split(SEPARATOR)])
        if problem:
            raise TemplateError(f"{where} (answer_choices): {problem}")


def choices_problem(choices: Sequence[str]) -> str | None:
    """Why a rendered list of answer choices cannot be ranked (a repeated or empty choice), or None."""
    repeated = sorted(c for c, n in Counter(choices).items() if n > 1)
    if repeated:
        return f"choice(s) {repeated} repeated in {list(choices)}: the gold of a repeated label is ambiguous"
    if "" in choices:
        return f"a choice renders empty in {list(choices)}"
    return None


# --------------------------------------------------------------------------------------------------------
# rendering


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PIPE_ESCAPE)
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    return value


def _build(shape: Any, row: Mapping[str, Any]) -> Any:
    if shape == REFERENCES and row.get(REFERENCES) is None:  # a one-answer source: the answer is the list
        return [row["answer"]]
    if isinstance(shape, str):
        m = INDEXED_FIELD.match(shape)
        return row[m["field"]][int(m["index"])] if m else row[shape]
    if isinstance(shape, list):
        return [_build(s, row) for s in shape]
    return {k: _build(v, row) for k, v in shape.items()}


def context(row: Mapping[str, Any], j: JinjaSpec, spec: DatasetSpec) -> dict[str, Any]:
    """The record promptsource would see, rebuilt from one canonical row."""
    ctx = {f: row.get(f) for f in spec.fields}
    ctx.update({var: _build(shape, row) for var, shape in j.variables.items()})
    if j.label is not None:
        options = list(spec.options) if spec.options is not None else list(row.get(spec.options_field) or [])
        answer = row.get("answer")
        if answer not in options:
            raise ValueError(f"answer {answer!r} is not one of the options {options} (label {j.label!r})")
        ctx[j.label] = options.index(answer) + j.label_offset
    return _escape(ctx)


@dataclass
class Compiled:
    """One Jinja template compiled once per shard."""

    template: Template
    body: Any
    choices: Any | None


def compile_template(env: GuardedSandbox, t: Template) -> Compiled:
    assert t.jinja is not None
    choices = env.from_string(t.jinja.answer_choices) if t.jinja.answer_choices is not None else None
    return Compiled(t, env.from_string(t.jinja.jinja), choices)


def _unescape(s: str) -> str:
    return s.replace(_PIPE_ESCAPE, SEPARATOR)


def apply(env: GuardedSandbox, c: Compiled, ctx: dict[str, Any], seed: int) -> tuple[str, str, list[str]] | None:
    """promptsource's apply: choices first, then the template; both split on ``|||`` and stripped.

    None for a row P3 drops: one whose prompt renders empty (a conditional template that has nothing to ask of
    this example; P3's shards keep only rows with a non-empty prompt). An empty target, or repeated or empty
    answer choices, cannot be trained on or scored: errors."""
    env.start_row(seed)
    ctx = dict(ctx)
    choices: list[str] = []
    if c.choices is not None:
        choices = [_unescape(x).strip() for x in c.choices.render(ctx).split(SEPARATOR)]
        if problem := choices_problem(choices):
            raise ValueError(f"answer_choices: {problem}")
        ctx[CHOICES] = choices
    text = c.body.render(ctx)
    env.check_deadline()
    if len(text) > MAX_OUTPUT_CHARS:
        raise RenderLimitError(f"output of {len(text)} characters (at most {MAX_OUTPUT_CHARS})")
    parts = [_unescape(p).strip() for p in text.split(SEPARATOR)]
    if parts == [""] or (len(parts) == 2 and not parts[0]):
        return None
    if len(parts) != 2:
        raise ValueError(f"renders {len(parts) - 1} '|||' separators, not one between inputs and targets")
    if not parts[1]:
        raise ValueError(
            f"the target renders empty (prompt {parts[0][:80]!r}): the example would train on a bare EOS or be "
            "scored against ''"
        )
    return parts[0], parts[1], choices


def _seed(template_index: int, example_id: int) -> int:
    digest = hashlib.blake2b(f"{template_index}:{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def render_rows(
    df: pl.DataFrame,
    spec: DatasetSpec,
    split: str,
    templates: Sequence[Template],
    template_ids: Sequence[int],
    env: GuardedSandbox | None = None,
) -> pl.DataFrame:
    """Row-wise (it must be: each template is a program): row i under template ``template_ids[i]``.

    Errors name the template file, template, dataset and example id.
    """
    env = env or GuardedSandbox()
    compiled = {t.index: compile_template(env, t) for t in templates}
    out: dict[str, list[Any]] = {k: [] for k in SHARD_SCHEMA}
    dropped: dict[int, list[int]] = {}
    for row, tid in zip(df.iter_rows(named=True), template_ids, strict=True):
        c = compiled[tid]
        try:
            ctx = context(row, c.template.jinja, spec)
            rendered = apply(env, c, ctx, _seed(tid, row["example_id"]))
        except Exception as e:  # noqa: BLE001 -- source Jinja may fail in any way; the sandbox keeps it harmless
            kind = "refused by the sandbox" if isinstance(e, SecurityError) else "does not render"
            raise TemplateError(
                f"{_where(spec.templates, c.template)}: dataset {spec.name!r}, example_id {row['example_id']}: "
                f"{kind}: {e}"
            ) from None
        if rendered is None:
            dropped.setdefault(tid, []).append(row["example_id"])
            continue
        inputs, targets, choices = rendered
        out["dataset"].append(spec.name)
        out["cluster"].append(spec.cluster)
        out["split"].append(split)
        out["example_id"].append(row["example_id"])
        out["template_id"].append(tid)
        out["turned_around"].append(c.template.turned_around)
        out["inputs"].append(inputs)
        out["targets"].append(targets)
        out["options"].append(choices)
    for tid, ids in sorted(dropped.items()):  # into the render job's log: counted, never silent
        print(
            f"{_where(spec.templates, compiled[tid].template)}: dataset {spec.name!r} ({split}): dropped {len(ids)} "
            f"of the rows it rendered, whose prompt renders empty, as P3 drops them (example_ids {ids[:10]}"
            f"{' ...' if len(ids) > 10 else ''})",
            file=sys.stderr,
        )
    # through Arrow: Polars' Python constructor builds one Series per inner options list (half the time)
    import pyarrow as pa

    types = _arrow_types()
    arrow = pa.table({k: pa.array(v, type=types[k]) for k, v in out.items()})
    return pl.from_arrow(arrow).cast(SHARD_SCHEMA)  # type: ignore[union-attr,return-value]


def render_mixed(
    lf: pl.LazyFrame, spec: DatasetSpec, split: str, template_id: pl.Expr, chosen: Sequence[Template]
) -> pl.LazyFrame:
    """Rows whose template is a pattern stay vectorised; rows whose template is Jinja are collected and
    rendered row-wise; the two meet again in example order."""
    jinja = [t for t in chosen if t.kind == "jinja"]
    pattern = [t for t in chosen if t.kind != "jinja"]
    jinja_ids = [t.index for t in jinja]
    tagged = lf.with_columns(template_id.cast(pl.Int32).alias("__template_id"))
    parts: list[pl.LazyFrame] = []
    if pattern:
        rest = tagged.filter(~pl.col("__template_id").is_in(jinja_ids))
        parts.append(rest.select(rendered_columns(spec, split, pl.col("__template_id"), pattern)))
    rows = tagged.filter(pl.col("__template_id").is_in(jinja_ids)).collect()
    parts.append(render_rows(rows, spec, split, jinja, rows["__template_id"].to_list()).lazy())
    return pl.concat(parts).sort("example_id", "template_id", maintain_order=True)


def render_template(lf: pl.LazyFrame, spec: DatasetSpec, split: str, t: Template) -> pl.LazyFrame:
    """Every row of ``lf`` under one Jinja template (evaluation, preview, few-shot exemplars)."""
    df = lf.collect()
    return render_rows(df, spec, split, [t], [t.index] * df.height).lazy()
