"""What both template importers (promptsource_import, flan_import) share: the imported-template types,
pattern helpers, the import's finishing rules and the template file it writes.

Turned-around rule (promptsource metadata ``original_task``): true or missing -> a template that does the
task; false -> kept as ``turned_around: true`` only if it is the task inverted, i.e. the gold answer is in
the inputs (``{answer}`` in inputs, not in targets) and an input field is the target ("Write a {answer}
review" -> "{sentence}"); any other non-original task is skipped. At most ``MAX_TURNED_AROUND`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flanpipe.core.io import atomic_path
from flanpipe.data.jinja_templates import INDEXED_FIELD, JinjaSpec
from flanpipe.data.templates import (
    MAX_TURNED_AROUND,
    OPTIONS_PLACEHOLDER,
    Piece,
    TemplateError,
    load_templates,
    parse_pattern,
    placeholders,
)

log = logging.getLogger(__name__)

ANSWER = "answer"
Source = Literal["promptsource", "flan"]


class TemplateImportError(ValueError):
    """The source cannot be imported; the message names the file and the template (uuid/name or index)."""


class Unconvertible(Exception):
    """This one template cannot be imported faithfully; it is skipped with the message as the reason."""


@dataclass(frozen=True)
class ImportedTemplate:
    source: str  # how the source names it, for the comment above it in the output file
    inputs: str
    targets: str
    turned_around: bool = False
    jinja: JinjaSpec | None = None  # --jinja: kept verbatim as a `kind: jinja` template (inputs/targets empty)

    def key(self) -> tuple[Any, ...]:
        j = self.jinja
        variables = json.dumps(j.variables, sort_keys=True) if j else ""  # shapes nest: compare them as text
        extra = (j.jinja, j.answer_choices, j.label, j.label_offset, variables) if j else ()
        return (self.inputs, self.targets, *extra)


@dataclass(frozen=True)
class SkippedTemplate:
    source: str
    reason: str


@dataclass
class ImportResult:
    kind: Source
    path: Path
    dataset: str
    templates: list[ImportedTemplate]
    skipped: list[SkippedTemplate]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "from": self.kind,
            "source": str(self.path),
            "dataset": self.dataset,
            "converted": len(self.templates),
            "turned_around": sum(t.turned_around for t in self.templates),
            "skipped": len(self.skipped),
            "skipped_templates": [{"template": s.source, "reason": s.reason} for s in self.skipped],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------------------
# shared helpers


def parse_field_map(items: Iterable[str]) -> dict[str, str]:
    """``old=new`` pairs renaming source variables to our canonical field names (registry ``fields`` keys);
    for templates kept as Jinja, ``new`` may be one entry of a list field, ``choice1=options[0]``, and
    ``old`` a nested path, ``answers.text=references`` (P3's list of answers -> every reference)."""
    out: dict[str, str] = {}
    for item in items:
        old, sep, new = (s.strip() for s in item.partition("="))
        if not sep or not all(part.isidentifier() for part in old.split(".")):
            raise TemplateImportError(f"--field-map {item!r}: expected old=new with old a variable name (or a.b)")
        try:
            ok = parse_pattern("{" + new + "}") == [("field", new)]
        except ValueError:
            ok = False
        if INDEXED_FIELD.match(new):
            ok = True
        if not ok or new == OPTIONS_PLACEHOLDER:
            raise TemplateImportError(f"--field-map {item!r}: {new!r} is not a usable field name")
        if old in out:
            raise TemplateImportError(f"--field-map: {old!r} is mapped twice")
        out[old] = new
    return out


def merge_pieces(pieces: Iterable[Piece]) -> list[Piece]:
    """Join adjacent text pieces and drop empty ones, so two piece lists compare by meaning."""
    out: list[Piece] = []
    for kind, value in pieces:
        if kind == "text" and not value:
            continue
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


def pieces_to_pattern(pieces: Sequence[Piece]) -> str:
    """The inverse of ``parse_pattern``: literal braces are doubled so text stays text."""
    return "".join(
        value.replace("{", "{{").replace("}", "}}") if kind == "text" else "{" + value + "}" for kind, value in pieces
    )


def checked_pattern(pieces: Sequence[Piece]) -> str:
    """Emit a pattern and prove ``parse_pattern`` reads back exactly these pieces."""
    pattern = pieces_to_pattern(pieces)
    if merge_pieces(parse_pattern(pattern)) != merge_pieces(pieces):  # raises ValueError on a bad field name
        raise ValueError(f"pattern {pattern!r} does not read back as written")
    return pattern


def is_task_inverted(inputs: str, targets: str) -> bool:
    """FLAN's "turned around" shape: the gold answer is given, an input field is asked for."""
    ins, outs = set(placeholders(inputs)), set(placeholders(targets))
    return ANSWER in ins and ANSWER not in outs and bool(outs - {ANSWER, OPTIONS_PLACEHOLDER})


def dedupe(templates: list[ImportedTemplate], skipped: list[SkippedTemplate]) -> list[ImportedTemplate]:
    """Two sources wording that convert to the same pattern would only double one template's weight."""
    seen: dict[tuple[Any, ...], str] = {}
    out = []
    for t in templates:
        key = t.key()
        if key in seen:
            skipped.append(SkippedTemplate(t.source, f"converts to the same patterns as {seen[key]}"))
        else:
            seen[key] = t.source
            out.append(t)
    return out


def finish_import(
    kind: Source,
    path: Path,
    dataset: str,
    templates: list[ImportedTemplate],
    skipped: list[SkippedTemplate],
    notes: list[str],
) -> ImportResult:
    """Dedupe, cap turned-around templates at FLAN's three, order natural-first, log every skip."""
    templates = dedupe(templates, skipped)
    natural = [t for t in templates if not t.turned_around]
    turned = [t for t in templates if t.turned_around]
    for t in turned[MAX_TURNED_AROUND:]:
        skipped.append(SkippedTemplate(t.source, f"more than {MAX_TURNED_AROUND} turned-around templates"))
    for s in skipped:
        log.warning("%s: skipped template %s: %s", path, s.source, s.reason)
    if not natural:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:10])
        raise TemplateImportError(
            f"{path}: no template of {dataset!r} that does the task could be imported ({reasons})"
        )
    return ImportResult(kind, path, dataset, natural + turned[:MAX_TURNED_AROUND], skipped, notes)


# --------------------------------------------------------------------------------------------------------
# output


def _comment(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _quoted(s: str) -> str:
    """A YAML double-quoted scalar on one line, like the hand-written template files."""
    return yaml.safe_dump(s, default_style='"', width=float("inf"), allow_unicode=True).rstrip("\n")


def format_template_file(result: ImportResult) -> str:
    """Our template file: a header naming the source and every skip, one comment per template."""
    s = result.summary()
    lines = [
        f"# Imported by `flanpipe templates import --from {result.kind}` from {_comment(str(result.path))}",
        f"# (source dataset {_comment(result.dataset)}): {s['converted']} template(s) imported "
        f"({s['turned_around']} turned around), {s['skipped']} skipped.",
    ]
    lines += [f"# {_comment(n)}" for n in result.notes]
    if result.skipped:
        lines.append("# Skipped:")
        lines += [f"#   {_comment(sk.source)}: {_comment(sk.reason)}" for sk in result.skipped]
    lines.append("templates:")
    for t in result.templates:
        lines.append(f"  # {_comment(t.source)}")
        if t.jinja is not None:
            lines += _jinja_entry(t.jinja)
            continue
        lines.append(f"  - inputs: {_quoted(t.inputs)}")
        lines.append(f"    targets: {_quoted(t.targets)}")
        if t.turned_around:
            lines.append("    turned_around: true")
    return "\n".join(lines) + "\n"


def _jinja_entry(j: JinjaSpec) -> list[str]:
    lines = ["  - kind: jinja"]
    if j.name:
        lines.append(f"    name: {_quoted(j.name)}")
    lines.append(f"    jinja: {_quoted(j.jinja)}")
    if j.answer_choices is not None:
        lines.append(f"    answer_choices: {_quoted(j.answer_choices)}")
    if j.label is not None:
        lines.append(f"    label: {_quoted(j.label)}")
    if j.label_offset:
        lines.append(f"    label_offset: {j.label_offset}")
    if j.variables:  # JSON is YAML flow style, and shapes may nest ({"answers": {"text": "references"}})
        lines.append("    variables: " + json.dumps(dict(j.variables), ensure_ascii=False))
    return lines


def _readback_key(inputs: str, targets: str, turned: bool, j: JinjaSpec | None) -> tuple[Any, ...]:
    extra = (j.jinja, j.answer_choices, j.label, j.label_offset, dict(j.variables)) if j is not None else ()
    return (inputs, targets, turned, *extra)


def write_template_file(result: ImportResult, out: str | os.PathLike[str]) -> Path:
    """Write atomically; the file must load with ``load_templates`` as exactly these templates first."""
    final = Path(out)
    with atomic_path(final) as tmp:
        tmp.write_text(format_template_file(result), encoding="utf-8")
        try:
            loaded = [_readback_key(t.inputs, t.targets, t.turned_around, t.jinja) for t in load_templates(tmp)]
        except (TemplateError, ValueError) as e:
            raise TemplateImportError(f"{final}: the imported file does not load: {e}") from None
        if loaded != [_readback_key(t.inputs, t.targets, t.turned_around, t.jinja) for t in result.templates]:
            raise TemplateImportError(f"{final}: the imported file does not read back as written")
    return final
