"""FLAN's ``PATTERNS`` file -> our template files.

A FLAN ``PATTERNS`` file is read with ``ast.parse`` + ``ast.literal_eval``: never imported or executed, so a
non-literal anywhere in the requested entry is an error naming the file and line. FLAN patterns use our
``{field}``/``{options_}`` syntax already, so each is checked and copied; ``--turned-around-from K`` marks the
last templates as turned around, since the file does not say which are.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flanpipe.data.template_import import (
    ImportedTemplate,
    ImportResult,
    TemplateImportError,
    finish_import,
    is_task_inverted,
    pieces_to_pattern,
)
from flanpipe.data.templates import MAX_TURNED_AROUND, parse_pattern

_LITERAL_NODES = (ast.Constant, ast.Tuple, ast.List, ast.Load)


def _literal(path: Path, node: ast.expr, what: str) -> Any:
    """``ast.literal_eval`` with an error naming the file, the line of the offending node, and what it was."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        bad = next((n for n in ast.walk(node) if not isinstance(n, _LITERAL_NODES)), node)
        line = getattr(bad, "lineno", node.lineno)
        raise TemplateImportError(
            f"{path}:{line}: {what}: `{ast.unparse(bad)[:80]}` is not a literal "
            "(the file is read as data with ast.literal_eval, never executed)"
        ) from None


def _assigns_patterns(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "PATTERNS" for t in stmt.targets)
    return isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == "PATTERNS"


def read_flan_patterns(path: str | os.PathLike[str], dataset: str) -> list[tuple[int, str, str]]:
    """``PATTERNS[dataset]`` as (line, inputs, targets) triples, from the syntax tree alone."""
    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: file not found") from e
    try:
        tree = ast.parse(source, filename=str(p))
    except SyntaxError as e:
        raise TemplateImportError(f"{p}:{e.lineno}: not valid Python: {e.msg}") from None
    except (MemoryError, RecursionError):
        raise TemplateImportError(f"{p}: too deeply nested to parse") from None
    assigns = [s for s in tree.body if _assigns_patterns(s)]
    if not assigns:
        raise TemplateImportError(f"{p}: no top-level `PATTERNS = {{...}}` assignment")
    if len(assigns) > 1:
        raise TemplateImportError(
            f"{p}: PATTERNS is assigned {len(assigns)} times (lines {[s.lineno for s in assigns]})"
        )
    value = assigns[0].value
    if not isinstance(value, ast.Dict):
        raise TemplateImportError(f"{p}:{assigns[0].lineno}: PATTERNS must be a dict literal")
    entries: dict[str, ast.expr] = {}
    for k, v in zip(value.keys, value.values, strict=True):
        if k is None:
            raise TemplateImportError(f"{p}:{v.lineno}: PATTERNS: `**` unpacking is not a literal")
        name = _literal(p, k, "PATTERNS key")
        if not isinstance(name, str):
            raise TemplateImportError(f"{p}:{k.lineno}: PATTERNS keys must be dataset names (strings)")
        if name in entries:
            raise TemplateImportError(f"{p}:{k.lineno}: PATTERNS[{name!r}] is defined twice")
        entries[name] = v
    if dataset not in entries:
        raise TemplateImportError(f"{p}: PATTERNS has no dataset {dataset!r}; it has {sorted(entries)}")
    node = entries[dataset]
    if not isinstance(node, ast.List | ast.Tuple):
        raise TemplateImportError(f"{p}:{node.lineno}: PATTERNS[{dataset!r}] must be a list of (inputs, targets)")
    out = []
    for i, elt in enumerate(node.elts):
        what = f"PATTERNS[{dataset!r}] template {i}"
        pair = _literal(p, elt, what)
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise TemplateImportError(f"{p}:{elt.lineno}: {what}: expected an (inputs, targets) pair of strings")
        out.append((elt.lineno, pair[0], pair[1]))
    if not out:
        raise TemplateImportError(f"{p}:{node.lineno}: PATTERNS[{dataset!r}] is empty")
    return out


def _rename(pattern: str, field_map: Mapping[str, str]) -> str:
    return pieces_to_pattern([(k, field_map.get(v, v) if k == "field" else v) for k, v in parse_pattern(pattern)])


def import_flan(
    source: str | os.PathLike[str],
    dataset: str,
    *,
    field_map: Mapping[str, str] | None = None,
    turned_around_from: int | None = None,
) -> ImportResult:
    """FLAN patterns use our ``{field}``/``{options_}`` syntax already: check each and copy it over."""
    path = Path(source)
    rows = read_flan_patterns(path, dataset)
    k = turned_around_from
    if k is not None and not (1 <= k < len(rows) and len(rows) - k <= MAX_TURNED_AROUND):
        raise TemplateImportError(
            f"{path}: --turned-around-from {k}: PATTERNS[{dataset!r}] has {len(rows)} templates; need "
            f"1 <= K < {len(rows)} and at most {MAX_TURNED_AROUND} turned around"
        )
    templates: list[ImportedTemplate] = []
    notes: list[str] = []
    for i, (line, inputs, targets) in enumerate(rows):
        src = f"PATTERNS[{dataset!r}][{i}] (line {line})"
        pair = []
        for side, pattern in (("inputs", inputs), ("targets", targets)):
            if not pattern.strip():
                raise TemplateImportError(f"{path}:{line}: PATTERNS[{dataset!r}] template {i}: {side} is empty")
            try:
                pair.append(_rename(pattern, field_map or {}))
            except ValueError as e:
                raise TemplateImportError(f"{path}:{line}: PATTERNS[{dataset!r}] template {i} ({side}): {e}") from None
        turned = k is not None and i >= k
        if not turned and is_task_inverted(pair[0], pair[1]):
            notes.append(f"{src} looks turned around ({{answer}} -> input field); see --turned-around-from")
        templates.append(ImportedTemplate(src, pair[0], pair[1], turned))
    return finish_import("flan", path, dataset, templates, [], notes)
