"""Instruction templates: pure data in ``config/templates/*.yaml``, rendered with Polars expressions.

A template is a pair of patterns (inputs, targets) with ``{field}`` placeholders naming canonical fields,
plus ``{options_}`` for FLAN's options block. Patterns are parsed by a small regex and turned into
``pl.concat_str`` expressions: nothing in a template file is ever evaluated as code, and rendering a
million examples is a handful of vectorized string concatenations, not a Python loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import polars as pl

from flanpipe.io import atomic_path, read_yaml
from flanpipe.registry import DatasetSpec
from flanpipe.vocab import RENDER_MODES, RenderMode

if TYPE_CHECKING:
    from flanpipe.formats import FormatMix
    from flanpipe.jinja_templates import JinjaSpec

OPTIONS_PLACEHOLDER = "options_"
TemplateKind = Literal["pattern", "jinja"]  # jinja: promptsource templates kept verbatim (flanpipe.jinja_templates)
MAX_TURNED_AROUND = 3  # FLAN: "up to three" templates that turn the task around
# What rendering accepts: an instruction mode, or "lm" (not an instruction mode but the base model's
# pretraining text: the input fields, no answer). The names are flanpipe.vocab's.
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
    jinja: JinjaSpec | None = None  # kind "jinja" only; inputs/targets are then empty


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


def load_templates(path: str | os.PathLike[str]) -> list[Template]:
    """Read a template file; structural problems name the file and template index."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("templates"), list):
        raise TemplateError(f"{path}: expected a mapping with a 'templates' list")
    if not raw["templates"]:
        raise TemplateError(f"{path}: the template list is empty; a dataset needs at least one template")
    out: list[Template] = []
    for i, t in enumerate(raw["templates"]):
        if not isinstance(t, dict):
            raise TemplateError(f"{path}: template {i}: expected a mapping with 'inputs' and 'targets'")
        if t.get("kind", "pattern") == "jinja":
            from flanpipe.jinja_templates import load_entry

            out.append(load_entry(path, i, t))
            continue
        if t.get("kind", "pattern") != "pattern":
            raise TemplateError(f"{path}: template {i}: kind {t['kind']!r} is not 'pattern' or 'jinja'")
        unknown = set(t) - {"kind", "inputs", "targets", "turned_around"}
        if unknown:
            raise TemplateError(f"{path}: template {i}: unknown key(s) {sorted(unknown)}")
        for key in ("inputs", "targets"):
            if not isinstance(t.get(key), str) or not t[key].strip():
                raise TemplateError(f"{path}: template {i}: '{key}' must be a non-empty string")
        if not isinstance(t.get("turned_around", False), bool):
            raise TemplateError(f"{path}: template {i}: 'turned_around' must be true or false")
        out.append(Template(i, t["inputs"], t["targets"], bool(t.get("turned_around", False))))
    return out


def validate_templates(templates: Sequence[Template], spec: DatasetSpec, path: str | os.PathLike[str]) -> None:
    """Check every placeholder against the dataset's fields, before any job runs."""
    fields = set(spec.fields)
    turned = [t.index for t in templates if t.turned_around]
    n_turned = len(turned)
    if n_turned > MAX_TURNED_AROUND:
        raise TemplateError(
            f"{path}: {n_turned} turned-around templates (templates {turned}) for dataset {spec.name!r}; "
            f"FLAN allows at most {MAX_TURNED_AROUND}"
        )
    if n_turned == len(templates):
        raise TemplateError(f"{path}: every template is turned around; at least one must do the task itself")
    first: dict[tuple[str, str], int] = {}
    for t in templates:
        if t.kind == "jinja":
            from flanpipe.jinja_templates import validate

            validate(t, spec, path)
            continue
        if (t.inputs, t.targets) in first:
            raise TemplateError(
                f"{path}: template {t.index} repeats template {first[t.inputs, t.targets]} of dataset {spec.name!r}; "
                "a copy doubles that template's share of the examples (and counts twice in the template ablation)"
            )
        first[t.inputs, t.targets] = t.index
        for key in ("inputs", "targets"):
            try:
                names = placeholders(getattr(t, key))
            except ValueError as e:
                raise TemplateError(f"{path}: template {t.index} ({key}): {e}") from None
            for name in names:
                if name == OPTIONS_PLACEHOLDER:
                    if not spec.has_options:
                        raise TemplateError(
                            f"{path}: template {t.index} ({key}): {{options_}} used but dataset "
                            f"{spec.name!r} has no options"
                        )
                elif name not in fields:
                    raise TemplateError(
                        f"{path}: template {t.index} ({key}): field {name!r} is not a field of dataset "
                        f"{spec.name!r} (fields: {sorted(fields)})"
                    )
        check_template_task(t, path, spec.name)


def check_template_task(t: Template, path: str | os.PathLike[str], dataset: str) -> None:
    """A template must do its task: one that does the task itself (not turned around) answers with
    ``{answer}`` and never shows it in the prompt (that would train on the gold label); no template's
    target is a constant (it would train on one string); the options block belongs in the prompt."""
    try:
        inputs, targets = placeholders(t.inputs), placeholders(t.targets)
    except ValueError:
        return  # reported with its position by validate_templates
    where = f"{path}: template {t.index} of dataset {dataset!r}"
    if not targets:
        raise TemplateError(
            f"{where} (targets): {t.targets!r} has no placeholder, so every example would train on that constant "
            'string; write e.g. targets: "{answer}"'
        )
    if OPTIONS_PLACEHOLDER in targets:
        raise TemplateError(f"{where} (targets): {{options_}} belongs in 'inputs' (the prompt), not the target")
    if t.turned_around:
        return
    if "answer" in inputs:
        raise TemplateError(
            f"{where} (inputs): {{answer}} in the prompt of a template that does the task itself puts the gold "
            "label into the prompt; move it to 'targets', or mark the template 'turned_around: true' if it "
            "asks for another field given the answer"
        )
    if "answer" not in targets:
        raise TemplateError(
            f"{where} (targets): {t.targets!r} does not contain {{answer}}; a template that does the task "
            "itself must answer with it (mark it 'turned_around: true' if it asks for another field)"
        )


def load_validated(spec: DatasetSpec) -> list[Template]:
    if not os.path.isfile(spec.templates):
        raise TemplateError(
            f"{spec.templates}: template file of dataset {spec.name!r} not found (set 'templates' of its entry in "
            f"{spec.defined_in or 'the registry'}; the default is config/templates/{spec.name}.yaml)"
        )
    templates = load_templates(spec.templates)
    validate_templates(templates, spec, spec.templates)
    return templates


def select_templates(templates: Sequence[Template], num_templates: int | None) -> list[Template]:
    """All templates, or (template-count ablation) the first ``k`` that do the task itself."""
    if num_templates is None:
        return list(templates)
    natural = [t for t in templates if not t.turned_around]
    if not 1 <= num_templates <= len(natural):
        raise TemplateError(
            f"{num_templates} templates asked for, but the file has {len(natural)} that do the task itself; "
            f"choose 1 to {len(natural)}"
        )
    return natural[:num_templates]


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


def instruction_free_templates(spec: DatasetSpec, mode: InstructionMode) -> list[Template]:
    """Paper Table 3 ablations: the inputs with no instruction, optionally prefixed by the dataset name.

    Mode "lm" is plain text for pretraining a base model: the input fields as the target, no label.
    """
    input_fields = [f for f in spec.fields if f not in ("answer", spec.options_field)]
    body = "\n".join("{" + f + "}" for f in input_fields)
    if mode == "lm":
        return [Template(0, "", body)]
    if spec.has_options:
        body += "\n\n{options_}"
    if mode == "dataset_name":
        body = f"[{spec.cluster}: {spec.name}]\n" + body
    return [Template(0, body, "{answer}")]


def templates_for_mode(
    templates: Sequence[Template], spec: DatasetSpec, mode: InstructionMode, num_templates: int | None
) -> list[Template]:
    if mode not in INSTRUCTION_MODES:
        raise ValueError(f"unknown instruction mode {mode!r}; choose one of {INSTRUCTION_MODES}")
    if mode == "natural":
        try:
            return select_templates(templates, num_templates)
        except TemplateError as e:
            raise TemplateError(f"{spec.templates}: dataset {spec.name!r}: {e}") from None
    return instruction_free_templates(spec, mode)


def _rendered_columns(
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


def render_train(lf: pl.LazyFrame, spec: DatasetSpec, chosen: Sequence[Template]) -> pl.LazyFrame:
    """Each example gets exactly one template, round-robin over example ids (FLAN's code cycles through
    the templates example by example): example i gets template i mod k, whichever rows were dropped.

    Row-wise expressions only (a when/then per template), so the streaming engine renders the split
    instead of collecting it, as a whole-column int_range(len) made it do. Peak RSS on one WMT-like
    file: 1M rows 1.4 -> 0.9 GB, 4M rows 3.5 -> 2.1 GB (8M: 3.3 GB; Polars' sink itself still grows
    ~0.3 GB per million rows, hence the SLURM profile's memory for this rule).
    """
    position = pl.col("example_id") % len(chosen)
    template_id = pl.lit(chosen[-1].index, pl.Int32)
    for i, t in reversed(list(enumerate(chosen[:-1]))):
        template_id = pl.when(position == i).then(pl.lit(t.index, pl.Int32)).otherwise(template_id)
    if any(t.kind == "jinja" for t in chosen):
        from flanpipe.jinja_templates import render_mixed

        return render_mixed(lf, spec, "train", template_id, chosen)
    return lf.select(_rendered_columns(spec, "train", template_id, chosen))


def fewshot_prefix(
    exemplars: pl.LazyFrame, spec: DatasetSpec, template: Template, options_in_prompt: bool = True
) -> str:
    """k solved examples under the same template, each "inputs\ntargets", separated by blank lines."""
    if template.kind == "jinja":
        from flanpipe.jinja_templates import render_template

        df = render_template(exemplars, spec, "train", template)
    else:
        df = exemplars.select(_rendered_columns(spec, "train", pl.lit(template.index), [template], options_in_prompt))
    rows = df.select(pl.concat_str([pl.col("inputs"), pl.lit("\n"), pl.col("targets")])).collect().to_series()
    return "".join(f"{r}\n\n" for r in rows)


def render_eval(
    lf: pl.LazyFrame,
    spec: DatasetSpec,
    split: str,
    chosen: Sequence[Template],
    max_examples: int | None,
    *,
    options_in_prompt: bool = True,
    exemplars: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Every example under every template that does the task (turned-around ones are not scored).

    With ``exemplars`` (few-shot), the same k exemplars, rendered under the scored template, precede
    every example's inputs.
    """
    scored = [t for t in chosen if not t.turned_around]
    base = lf.head(max_examples) if max_examples else lf
    frames = []
    for t in scored:
        if t.kind == "jinja":  # rendered as written: its own choices, whatever options_in_prompt says
            from flanpipe.jinja_templates import render_template

            frame = render_template(base, spec, split, t)
        else:
            frame = base.select(_rendered_columns(spec, split, pl.lit(t.index), [t], options_in_prompt))
        if exemplars is not None:
            prefix = fewshot_prefix(exemplars, spec, t, options_in_prompt)
            frame = frame.with_columns(pl.concat_str([pl.lit(prefix), pl.col("inputs")]).alias("inputs"))
        frames.append(frame)
    return pl.concat(frames)


def fewshot_exemplars(train: pl.LazyFrame, shots: int, seed: int) -> pl.LazyFrame:
    """A seeded choice of ``shots`` training examples (fixed per dataset, so templates compare fairly)."""
    return train.sort(pl.col("example_id").hash(seed)).head(shots)


def render_shard(
    spec: DatasetSpec,
    canonical: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mode: InstructionMode = "natural",
    num_templates: int | None = None,
    formats: FormatMix | None = None,
) -> dict[str, object]:
    """Render the training split of one dataset into its templated shard (``formats``: Flan 2022's mixture
    of zero-/few-shot and options/no-options prompts, flanpipe.formats; natural mode only)."""
    chosen = templates_for_mode(load_validated(spec), spec, mode, num_templates)
    if formats is not None and not formats.is_flan and mode == "natural":
        from flanpipe.formats import render_train_formats

        lf = render_train_formats(pl.scan_parquet(canonical), spec, chosen, formats)
    else:
        lf = render_train(pl.scan_parquet(canonical), spec, chosen)
    with atomic_path(out_path) as tmp:
        lf.sink_parquet(tmp)
    rows = pl.scan_parquet(out_path).select(pl.len()).collect().item()
    return {"dataset": spec.name, "rows": rows, "templates": [t.index for t in chosen], "mode": mode}


def render_eval_shard(
    spec: DatasetSpec,
    canonical: Mapping[str, str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    mode: InstructionMode = "natural",
    max_examples: int | None = 200,
    options_in_prompt: bool = True,
    shots: int = 0,
    train: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> dict[str, object]:
    """Render validation and test splits under every scored template into one eval shard.

    ``shots > 0`` needs the canonical ``train`` split to draw exemplars from.
    """
    chosen = templates_for_mode(load_validated(spec), spec, mode, None)
    exemplars = None
    if shots:
        if train is None:
            raise ValueError(f"dataset {spec.name!r}: a {shots}-shot eval shard needs the train split")
        exemplars = fewshot_exemplars(pl.scan_parquet(train), shots, seed)
    frames = [
        render_eval(
            pl.scan_parquet(p),
            spec,
            split,
            chosen,
            max_examples,
            options_in_prompt=options_in_prompt,
            exemplars=exemplars,
        )
        for split, p in canonical.items()
    ]
    with atomic_path(out_path) as tmp:
        pl.concat(frames).sink_parquet(tmp)
    return {"dataset": spec.name, "splits": list(canonical), "mode": mode, "options": options_in_prompt, "shots": shots}


def preview(spec: DatasetSpec, canonical: str | os.PathLike[str], n: int) -> str:
    """Human-readable rendering of the first ``n`` examples under each template."""
    templates = load_validated(spec)
    lf = pl.scan_parquet(canonical).head(n)
    blocks: list[str] = []
    for t in templates:
        if t.kind == "jinja":
            from flanpipe.jinja_templates import render_template

            df = render_template(lf, spec, "train", t).collect()
        else:
            df = lf.select(_rendered_columns(spec, "train", pl.lit(t.index), [t])).collect()
        tag = " (turned around)" if t.turned_around else ""
        for inp, tgt in zip(df["inputs"], df["targets"], strict=True):
            blocks.append(f"--- {spec.name} template {t.index}{tag}\n[inputs]\n{inp}\n[targets]\n{tgt}")
    return "\n\n".join(blocks)
