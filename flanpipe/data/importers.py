"""``flanpipe templates import``: the one entry point over both importers (promptsource_import, flan_import).

Both sources are read strictly as data, never run; each importer's docstring says how.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from flanpipe.data.flan_import import import_flan
from flanpipe.data.promptsource_import import import_promptsource
from flanpipe.data.template_import import ImportResult, Source, TemplateImportError, write_template_file


def import_templates(
    kind: Source,
    source: str | os.PathLike[str],
    dataset: str,
    out: str | os.PathLike[str],
    *,
    field_map: Mapping[str, str] | None = None,
    sample: str | os.PathLike[str] | None = None,
    options: Sequence[str] | None = None,
    turned_around_from: int | None = None,
    force: bool = False,
    keep_jinja: bool = False,
    verbatim: bool = False,
    label: str | None = None,
    label_offset: int = 0,
) -> ImportResult:
    """``flanpipe templates import``: read one dataset's templates from ``source``, write ``out``.

    An existing ``out`` is often a hand-written template file: it is replaced only with ``force``."""
    if Path(out).exists() and not force:
        raise TemplateImportError(
            f"{out}: file exists (perhaps hand-written templates); refusing to overwrite it. "
            "Pass --force to replace it, or choose another --out"
        )
    if kind == "promptsource":
        if turned_around_from is not None:
            raise TemplateImportError("--turned-around-from is for --from flan (promptsource has original_task)")
        result = import_promptsource(
            source,
            dataset,
            field_map=field_map,
            sample=sample,
            options=options,
            keep_jinja=keep_jinja,
            verbatim=verbatim,
            label=label,
            label_offset=label_offset,
        )
    elif kind == "flan":
        if sample is not None or options is not None or keep_jinja or verbatim or label or label_offset:
            raise TemplateImportError(
                "--sample/--options/--jinja/--verbatim/--label/--label-offset are for --from promptsource "
                "(FLAN patterns need no check)"
            )
        result = import_flan(source, dataset, field_map=field_map, turned_around_from=turned_around_from)
    else:
        raise TemplateImportError(f"unknown source format {kind!r}; choose promptsource or flan")
    write_template_file(result, out)
    return result
