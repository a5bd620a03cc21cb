"""Instruction templates: pure data in ``config/templates/*.yaml``; loading, validation and rendering by kind.

Two kinds: ``{field}`` patterns (flanpipe.data.patterns, rendered as Polars expressions, never evaluated as
code) and ``kind: jinja`` promptsource templates (flanpipe.data.jinja_templates, a guarded sandbox, row-wise).
This module loads and validates template files and dispatches rendering by kind; the kinds and the
prompt formats (flanpipe.data.formats) never import it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import accumulate

import polars as pl

from flanpipe.core.io import atomic_path, read_yaml
from flanpipe.core.registry import REFERENCES, DatasetSpec
from flanpipe.data import jinja_templates
from flanpipe.data.formats import EXEMPLAR_ENDS, FormatMix, render_train_formats
from flanpipe.data.patterns import (  # noqa: F401 (re-exported: the pattern kind's names, as callers know them)
    INSTRUCTION_MODES,
    MAX_TURNED_AROUND,
    OPTIONS_PLACEHOLDER,
    SHARD_SCHEMA,
    InstructionMode,
    Piece,
    Template,
    TemplateError,
    TemplateKind,
    fewshot_exemplars,
    options_block,
    options_expr,
    parse_pattern,
    pattern_expr,
    pattern_fewshot_exemplars,
    placeholders,
    rendered_columns,
    solved_example_list,
)


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
            out.append(jinja_templates.load_entry(path, i, t))
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
            jinja_templates.validate(t, spec, path)
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
        return jinja_templates.render_mixed(lf, spec, "train", template_id, chosen)
    return lf.select(rendered_columns(spec, "train", template_id, chosen))


def fewshot_exemplar_texts(
    exemplars: pl.LazyFrame, spec: DatasetSpec, template: Template, options_in_prompt: bool = True
) -> list[str]:
    """k solved examples under the same template, each "inputs\ntargets\n\n": a k-shot prefix is their
    concatenation, and their lengths give the exemplar ends that let a too-long prompt drop exemplars."""
    if template.kind == "jinja":
        return solved_example_list(jinja_templates.render_template(exemplars, spec, "train", template))
    return pattern_fewshot_exemplars(exemplars, spec, template, options_in_prompt)


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
    every example's inputs, and ``EXEMPLAR_ENDS`` says where each ends, so that evaluation drops exemplars
    from the front of a prompt too long for lengths.inputs (tokenize.fit_exemplars) rather than its question.
    """
    scored = [t for t in chosen if not t.turned_around]
    base = lf.head(max_examples) if max_examples else lf
    frames = []
    for t in scored:
        if t.kind == "jinja":  # rendered as written: its own choices, whatever options_in_prompt says
            frame = check_gold_in_choices(jinja_templates.render_template(base, spec, split, t), spec, t)
        else:
            frame = base.select(rendered_columns(spec, split, pl.lit(t.index), [t], options_in_prompt))
        frame = with_references(frame, base, spec, split, t)
        if exemplars is not None:
            pieces = fewshot_exemplar_texts(exemplars, spec, t, options_in_prompt)
            frame = frame.with_columns(
                pl.concat_str([pl.lit("".join(pieces)), pl.col("inputs")]).alias("inputs"),
                pl.lit(pl.Series([list(accumulate(map(len, pieces)))], dtype=pl.List(pl.Int32)))
                .first()
                .alias(EXEMPLAR_ENDS),
            )
        frames.append(frame)
    return pl.concat(frames)


def with_references(
    frame: pl.LazyFrame, base: pl.LazyFrame, spec: DatasetSpec, split: str, t: Template
) -> pl.LazyFrame:
    """Add an eval shard's ``references`` column: every target that counts as right for an example.

    Where the canonical split keeps several acceptable answers (its ``references`` column), the template's
    target is rendered once per answer, as if it were the only one (``answer`` and, for Jinja variables,
    ``references`` set to it), so "The answer is {answer}." scores "The answer is five." right too.
    Otherwise, and for a Jinja template that scores its own answer_choices by label, the one target."""
    one = frame.with_columns(pl.concat_list(pl.col("targets")).alias(REFERENCES))
    if REFERENCES not in base.collect_schema() or (t.jinja is not None and t.jinja.label is not None):
        return one
    each = base.explode(REFERENCES).filter(pl.col(REFERENCES).is_not_null()).with_columns(answer=pl.col(REFERENCES))
    if t.kind == "jinja":
        each = each.with_columns(pl.concat_list(pl.col("answer")).alias(REFERENCES))
        targets = jinja_templates.render_template(each, spec, split, t)
    else:
        targets = each.select(rendered_columns(spec, split, pl.lit(t.index), [t]))
    refs = targets.group_by("example_id", maintain_order=True).agg(
        pl.col("targets").unique(maintain_order=True).alias(REFERENCES)
    )
    return frame.join(refs, on="example_id", how="left", maintain_order="left").with_columns(
        pl.coalesce(REFERENCES, pl.concat_list(pl.col("targets"))).alias(REFERENCES)
    )


def check_gold_in_choices(frame: pl.LazyFrame, spec: DatasetSpec, t: Template) -> pl.LazyFrame:
    """Rank classification over a prompt's own answer_choices scores the target's position among them (T0):
    a rendered target that is none of its choices could never be scored right, so it is an error here."""
    df = frame.collect()
    bad = df.filter((pl.col("options").list.len() > 0) & ~pl.col("options").list.contains(pl.col("targets")))
    if bad.height:
        row = bad.row(0, named=True)
        raise TemplateError(
            f"{spec.templates}: template {t.index}: dataset {spec.name!r}, example_id {row['example_id']}: target "
            f"{row['targets']!r} is not one of its answer_choices {row['options']} ({bad.height} such row(s))"
        )
    return df.lazy()


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
    of zero-/few-shot and options/no-options prompts, flanpipe.data.formats; natural mode only)."""
    chosen = templates_for_mode(load_validated(spec), spec, mode, num_templates)
    if formats is not None and not formats.is_flan and mode == "natural":
        lf = render_train_formats(pl.scan_parquet(canonical), spec, chosen, formats)
    else:
        lf = render_train(pl.scan_parquet(canonical), spec, chosen)
    with atomic_path(out_path) as tmp:
        lf.sink_parquet(tmp)
    rows = pl.scan_parquet(out_path).select(pl.len()).collect().item()
    examples = pl.scan_parquet(canonical).select(pl.len()).collect().item()
    # one row per example: a missing one is a Jinja prompt that rendered empty (dropped as P3 does, logged)
    return {
        "dataset": spec.name,
        "rows": rows,
        "dropped_empty_prompt": examples - rows,
        "templates": [t.index for t in chosen],
        "mode": mode,
    }


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
    rows = pl.scan_parquet(out_path).select(pl.len()).collect().item()
    scored = sum(not t.turned_around for t in chosen)
    sizes = [pl.scan_parquet(p).select(pl.len()).collect().item() for p in canonical.values()]
    expected = scored * sum(min(n, max_examples) if max_examples else n for n in sizes)
    return {
        "dataset": spec.name,
        "splits": list(canonical),
        "mode": mode,
        "options": options_in_prompt,
        "shots": shots,
        "rows": rows,
        "dropped_empty_prompt": expected - rows,  # (example, template) pairs whose Jinja prompt rendered empty
    }


def preview(spec: DatasetSpec, canonical: str | os.PathLike[str], n: int) -> str:
    """Human-readable rendering of the first ``n`` examples under each template."""
    templates = load_validated(spec)
    lf = pl.scan_parquet(canonical).head(n)
    blocks: list[str] = []
    for t in templates:
        if t.kind == "jinja":
            df = jinja_templates.render_template(lf, spec, "train", t).collect()
        else:
            df = lf.select(rendered_columns(spec, "train", pl.lit(t.index), [t])).collect()
        tag = " (turned around)" if t.turned_around else ""
        for inp, tgt in zip(df["inputs"], df["targets"], strict=True):
            blocks.append(f"--- {spec.name} template {t.index}{tag}\n[inputs]\n{inp}\n[targets]\n{tgt}")
    return "\n\n".join(blocks)
