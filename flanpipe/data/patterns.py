"""The pattern template kind: ``{field}`` patterns rendered as Polars expressions, and what every kind shares.

A template is a pair of patterns (inputs, targets) with ``{field}`` placeholders naming canonical fields,
plus ``{options_}`` for FLAN's options block. Patterns are parsed by a small regex and turned into
``pl.concat_str`` expressions: nothing in a template file is ever evaluated as code, and rendering a
million examples is a handful of vectorized string concatenations, not a Python loop.

The layering: this module (the ``Template`` record, the shard schema, the pattern kind) is imported by
``flanpipe.data.jinja_templates`` (the Jinja kind) and ``flanpipe.data.formats`` (prompt formats), and
``flanpipe.data.templates`` (loading, validation, dispatch by kind) imports all three.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from flanpipe.core.registry import DatasetSpec
from flanpipe.core.vocab import RENDER_MODES, RenderMode

OPTIONS_PLACEHOLDER = "options_"
# jinja: promptsource templates kept verbatim (flanpipe.data.jinja_templates)
TemplateKind = Literal["pattern", "jinja"]
MAX_TURNED_AROUND = 3  # FLAN: "up to three" templates that turn the task around
# What rendering accepts: an instruction mode, or "lm" (not an instruction mode but the base model's
# pretraining text: the input fields, no answer). The names are flanpipe.core.vocab's.
InstructionMode = RenderMode
INSTRUCTION_MODES = RENDER_MODES

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

SHARD_SCHEMA = {
    "dataset": pl.Utf8,
    "cluster": pl.Utf8,
    "split": pl.Utf8,
    "example_id": pl.Int64,
    "template_id": pl.Int32,
    "turned_around": pl.Boolean,
    "inputs": pl.Utf8,
    "targets": pl.Utf8,
    "options": pl.List(pl.Utf8),
}


class TemplateError(ValueError):
    """A template file is wrong; the message names the file, the template's index and the culprit."""


@dataclass(frozen=True)
class Template:
    """One (inputs, targets) pattern pair; ``index`` is its position in the file (its template id)."""

    index: int
    inputs: str
    targets: str
    turned_around: bool = False
    kind: TemplateKind = "pattern"
    jinja: Any = None  # kind "jinja" only (a flanpipe.data.jinja_templates.JinjaSpec); inputs/targets then empty


Piece = tuple[Literal["text", "field"], str]


def parse_pattern(pattern: str) -> list[Piece]:
    """Split a pattern into literal text and field references; ``{{``/``}}`` are literal braces."""
    pieces: list[Piece] = []
    pos = 0
    for m in _TOKEN.finditer(pattern):
        if m.start() > pos:
            pieces.append(("text", pattern[pos : m.start()]))
        tok = m.group(0)
        if tok in ("{{", "}}"):
            pieces.append(("text", tok[0]))
        elif tok in ("{", "}"):
            raise ValueError(f"unbalanced {tok!r} at character {m.start()} (write {tok * 2} for a literal brace)")
        else:
            name = m.group(1)
            if not _NAME.match(name):
                raise ValueError(f"invalid placeholder {tok!r}: placeholders are plain field names")
            pieces.append(("field", name))
        pos = m.end()
    if pos < len(pattern):
        pieces.append(("text", pattern[pos:]))
    return pieces


def placeholders(pattern: str) -> list[str]:
    return [v for k, v in parse_pattern(pattern) if k == "field"]


def options_expr(spec: DatasetSpec) -> pl.Expr:
    """The options as a List(Utf8) expression (empty list when the dataset has none)."""
    if spec.options is not None:
        return pl.lit(pl.Series([list(spec.options)], dtype=pl.List(pl.Utf8))).first()
    if spec.options_field is not None:
        return pl.col(spec.options_field)
    return pl.lit(pl.Series([[]], dtype=pl.List(pl.Utf8))).first()


def options_block(options: pl.Expr) -> pl.Expr:
    """FLAN's block: ``OPTIONS:\\n- a\\n- b``."""
    return pl.concat_str([pl.lit("OPTIONS:\n- "), options.list.join("\n- ")])


def pattern_expr(pattern: str, options_text: pl.Expr) -> pl.Expr:
    parts = [
        pl.lit(v) if k == "text" else (options_text if v == OPTIONS_PLACEHOLDER else pl.col(v).cast(pl.Utf8))
        for k, v in parse_pattern(pattern)
    ]
    return pl.concat_str(parts) if parts else pl.lit("")


def rendered_columns(
    spec: DatasetSpec, split: str, template_id: pl.Expr, chosen: Sequence[Template], options_in_prompt: bool = True
) -> list[pl.Expr]:
    """Shard columns for rows whose template id is given by ``template_id``.

    ``options_in_prompt=False`` renders ``{options_}`` as nothing (FLAN's "no options" evaluation); the
    ``options`` column still lists them, since rank classification scores them either way.
    """
    opts = options_expr(spec)
    block = options_block(opts) if options_in_prompt else pl.lit("")

    def choose(attr: str) -> pl.Expr:
        expr: pl.Expr | pl.When | pl.Then | None = None
        for t in chosen:
            e = pattern_expr(getattr(t, attr), block)
            if not options_in_prompt and attr == "inputs" and OPTIONS_PLACEHOLDER in placeholders(t.inputs):
                e = e.str.strip_chars_end()
            cond = template_id == t.index
            expr = pl.when(cond).then(e) if expr is None else expr.when(cond).then(e)  # type: ignore[union-attr]
        return expr.otherwise(None)  # type: ignore[union-attr]

    turned = pl.lit(False)
    for t in chosen:
        if t.turned_around:
            turned = turned | (template_id == t.index)
    return [
        pl.lit(spec.name).alias("dataset"),
        pl.lit(spec.cluster).alias("cluster"),
        pl.lit(split).alias("split"),
        pl.col("example_id").cast(pl.Int64),
        template_id.cast(pl.Int32).alias("template_id"),
        turned.alias("turned_around"),
        choose("inputs").alias("inputs"),
        choose("targets").alias("targets"),
        opts.cast(pl.List(pl.Utf8)).alias("options"),
    ]


def fewshot_exemplars(train: pl.LazyFrame, shots: int, seed: int) -> pl.LazyFrame:
    """A seeded choice of ``shots`` training examples (fixed per dataset, so templates compare fairly)."""
    return train.sort(pl.col("example_id").hash(seed)).head(shots)


def solved_example_list(rendered: pl.LazyFrame | pl.DataFrame) -> list[str]:
    """Rendered exemplars, each "inputs\ntargets\n\n": a few-shot prefix is their concatenation."""
    rows = rendered.select(pl.concat_str([pl.col("inputs"), pl.lit("\n"), pl.col("targets")]))
    rows = rows.collect() if isinstance(rows, pl.LazyFrame) else rows
    return [f"{r}\n\n" for r in rows.to_series()]


def pattern_fewshot_exemplars(
    exemplars: pl.LazyFrame, spec: DatasetSpec, template: Template, options_in_prompt: bool = True
) -> list[str]:
    """k solved examples under one pattern template, one string each (``solved_example_list``)."""
    columns = rendered_columns(spec, "train", pl.lit(template.index), [template], options_in_prompt)
    return solved_example_list(exemplars.select(columns))
