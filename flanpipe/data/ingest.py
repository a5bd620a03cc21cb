"""Ingest: raw dataset splits (local files or HuggingFace ``datasets``) -> canonical Parquet.

The canonical form has ``example_id`` (the row's position in the source split, so every later stage can
point back to the raw example) and one column per canonical field of the registry entry. For
classification datasets ``answer`` holds the option *text*, so templates and metrics never see label ids.
Where the answer's source holds lists (several acceptable answers: TriviaQA's aliases, SQuAD's answers, or a
JSONL with one answer on some lines and a list on others), ``answer`` is the first reference (the training
target) and a ``references`` column keeps them all (evaluation scores against every one).

Split hygiene: every split's exact duplicates (rows equal in every canonical field) are counted, and the
train role is compared with the canonical validation/test splits of the same dataset; train rows that are
also eval rows fail the job, are dropped from train (the default) or only warned about (config
``data.split_duplicates``). The counts go to the job's log and into the parquet's footer
(``FOOTER_KEY``), where the run's contamination audit reads them (``read_ingest_report``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import polars as pl

from flanpipe.core.io import atomic_path
from flanpipe.core.registry import REFERENCES, DatasetSpec, Holdout

Policy = Literal["fail", "drop"]
DuplicatePolicy = Literal["fail", "drop", "warn"]
FOOTER_KEY = "flanpipe.ingest"  # parquet key-value metadata: ingest's report, split hygiene included
_HASH = "__row_hash"


class DataError(ValueError):
    """Raw data does not fit its registry entry; the message names dataset, split, file and field."""


def source_split(spec: DatasetSpec, role: str) -> str:
    """The source split that ``role`` (train/validation/test) maps to; a role the entry leaves out is a
    DataError naming the dataset and its registry file, not a KeyError."""
    if role not in spec.splits:
        raise DataError(
            f"dataset {spec.name!r} has no {role!r} split: 'splits' of its entry in "
            f"{spec.defined_in or 'the registry'} maps only {sorted(spec.splits)}"
        )
    return spec.splits[role]


def local_path(spec: DatasetSpec, role: str, root: Path = Path(".")) -> Path:
    """The local file holding ``role`` (train/validation/test) of ``spec``."""
    return root / spec.source.path.format(split=source_split(spec, role))


def _local_format(spec: DatasetSpec, path: Path) -> str:
    fmt = spec.source.format or path.suffix.lstrip(".").replace("json", "jsonl").replace("jsonll", "jsonl")
    if fmt not in {"jsonl", "parquet", "csv"}:
        raise DataError(f"dataset {spec.name!r}: cannot tell the format of {path}; set source.format")
    return fmt


def check_local_source(spec: DatasetSpec, role: str, root: Path = Path(".")) -> Path:
    """The local file of ``role``, or a DataError naming the dataset, the path expected and what to do.

    rules/common.smk calls this while building the DAG, so a missing manual download fails before any job.
    """
    path = local_path(spec, role, root)
    if not path.is_file():
        where = spec.defined_in or "the registry"
        raise DataError(
            f"dataset {spec.name!r} ({role}): source file {path} does not exist (split {spec.splits[role]!r} of "
            f"source.path {spec.source.path!r} under data.root {str(root)!r}). No rule creates it: fetch or "
            f"create it as the comments at the dataset's entry in {where} describe, or point 'source.path' "
            f"there (or config data.root) at the right file, or leave the dataset out (config 'datasets')"
        )
    return path


def _is_blank(path: Path) -> bool:
    """A text file with nothing but whitespace (reads at most until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _first_invalid_utf8(path: Path) -> str | None:
    """'line N (byte offset B)' of the first line that is not UTF-8, for the error message."""
    offset = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {i} (byte offset {offset + e.start}: {line[e.start : e.start + 4]!r})"
            offset += len(line)
    return None


def _first_bad_json_line(path: Path) -> str | None:
    """'line N: <json error>' of the first JSONL line that is not a JSON object, for the error message."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {i}, character {e.pos + 1}: {e.msg}"
            if not isinstance(value, dict):
                return f"line {i}: a JSON {type(value).__name__}, not an object"
    return None


def read_local(spec: DatasetSpec, role: str, root: Path = Path(".")) -> pl.LazyFrame:
    """Scan a local JSONL / Parquet / CSV split lazily."""
    path = check_local_source(spec, role, root)
    fmt = _local_format(spec, path)
    if fmt in ("jsonl", "csv") and _is_blank(path):
        raise DataError(f"dataset {spec.name!r} split {role!r} ({path}): the split is empty (the file has no rows)")
    if fmt == "jsonl":
        return answers_as_references(pl.scan_ndjson(path, infer_schema_length=None), spec, path)
    if fmt == "parquet":
        return pl.scan_parquet(path)
    return pl.scan_csv(path, infer_schema_length=None)


def _struct_path(source: str, schema: pl.Schema) -> bool:
    """Whether a dot path walks structs only (no list on the way), so one JSON path addresses it."""
    head, *rest = source.split(".")
    dtype = schema.get(head)
    for part in rest:
        if not isinstance(dtype, pl.Struct):
            return False
        dtype = {f.name: f.dtype for f in dtype.fields}.get(part)
    return dtype is not None


def _with_leaf(dtype: pl.DataType, path: list[str], leaf: pl.DataType) -> pl.DataType:
    """``dtype`` with the struct field at ``path`` retyped to ``leaf``."""
    if not path:
        return leaf
    assert isinstance(dtype, pl.Struct)
    return pl.Struct(
        [pl.Field(f.name, _with_leaf(f.dtype, path[1:], leaf) if f.name == path[0] else f.dtype) for f in dtype.fields]
    )


def answers_as_references(lf: pl.LazyFrame, spec: DatasetSpec, path: Path) -> pl.LazyFrame:
    """JSONL answers of mixed shape: a string on some lines and a list on others.

    Polars infers such a column as text and writes the list lines as their JSON ('["5", "five"]'), which
    would train on a Python-looking list. When any line holds a list at the answer's source path, the lines
    are decoded again with that column typed as a list of strings: a lone string becomes a one-element list,
    so every row reads as references (the first is the target; ``canonical_exprs``)."""
    src = spec.fields.get("answer")
    schema = lf.collect_schema()
    if not isinstance(src, str) or not _struct_path(src, schema) or _resolved_dtype(src, schema) != pl.Utf8:
        return lf
    parts = src.split(".")
    json_path = "$" + "".join(f"['{p}']" for p in parts) + "[0]"
    lines = pl.scan_lines(path).filter(pl.col("line").str.strip_chars() != "")  # scan_ndjson skips blank lines
    if not lines.select(pl.col("line").str.json_path_match(json_path).is_not_null().any()).collect().item():
        return lf
    head = parts[0]
    retyped = {name: _with_leaf(d, parts[1:], pl.List(pl.Utf8)) if name == head else d for name, d in schema.items()}
    return lines.select(pl.col("line").str.json_decode(pl.Struct(retyped)).alias("__row")).unnest("__row")


def read_hf(spec: DatasetSpec, role: str, cache_dir: str | None = None) -> pl.LazyFrame:
    """Load one split with ``datasets.load_dataset`` (run on a login node with internet, or offline
    from its cache when ``HF_DATASETS_OFFLINE=1``); ``source.path`` may also be a local directory."""
    import datasets  # imported lazily: heavy, and only this source type needs it

    split = source_split(spec, role)
    try:
        ds = datasets.load_dataset(
            spec.source.path,
            spec.source.name,
            split=split,
            data_dir=spec.source.data_dir,
            data_files={k: list(v) for k, v in spec.source.data_files.items()} if spec.source.data_files else None,
            revision=spec.source.revision,
            cache_dir=cache_dir or os.environ.get("FLANPIPE_HF_CACHE"),
        )
    except Exception as e:  # datasets raises many types; all mean "not loadable here"
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
        cache = cache_dir or os.environ.get("FLANPIPE_HF_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        hint = (
            f"HF_DATASETS_OFFLINE=1 is set, so only the cache ({cache}) is read and it does not hold this "
            "dataset: fetch it first where the hub is reachable (`snakemake --until download` on the login "
            "node, or `flanpipe ingest DATASET SPLIT --out FILE` there, with the same data.hf_cache), or "
            "export it to files and give the entry a local source"
            if offline
            else "check the hub id, config name and split in the registry entry, or fetch it where the hub is "
            "reachable (`snakemake --until download`)"
        )
        config = f" config {spec.source.name!r}" if spec.source.name else ""
        raise DataError(
            f"dataset {spec.name!r} ({role}): cannot load HuggingFace source {spec.source.path!r}{config} "
            f"split {split!r} (registry {spec.defined_in or '?'}): {str(e).rstrip('.')}. {hint}"
        ) from e
    table = ds.flatten_indices().data.table
    return pl.from_arrow(table).lazy()  # type: ignore[union-attr]


def _column_expr(source: str) -> pl.Expr:
    """``a.b.c`` addresses struct field b.c of column a (HF's nested columns)."""
    head, *rest = source.split(".")
    expr = pl.col(head)
    for part in rest:
        expr = expr.struct.field(part)
    return expr


def canonical_exprs(spec: DatasetSpec, schema: pl.Schema, where: str = "") -> list[pl.Expr]:
    """One expression per canonical field; ``answer`` is taken raw here and mapped by ``answer_expr``
    in a second step, because it may index the options column this step creates."""
    missing = [
        f"{name} <- {src!r}"
        for name, srcs in spec.fields.items()
        for src in ((srcs,) if isinstance(srcs, str) else srcs)
        if src.split(".")[0] not in schema
    ]
    if missing:
        raise DataError(
            f"{where or f'dataset {spec.name!r}'}: source column(s) not found for field(s) {', '.join(missing)}; "
            f"the source has columns {list(schema)}. Fix 'fields' of {spec.name!r} in "
            f"{spec.defined_in or 'the registry'} or the data"
        )
    for name, srcs in spec.fields.items():
        for src in (srcs,) if isinstance(srcs, str) else srcs:
            problem = _nested_problem(src, schema)
            if problem:
                raise DataError(
                    f"{where or f'dataset {spec.name!r}'}: field {name} <- {src!r}: {problem}. Fix 'fields' of "
                    f"{spec.name!r} in {spec.defined_in or 'the registry'} or the data"
                )
    exprs: list[pl.Expr] = []
    references: list[pl.Expr] = []
    if spec.answer_key_field is not None:
        exprs.append(_column_expr(spec.answer_key_field).cast(pl.List(pl.Utf8)).alias("__answer_keys"))
    for name, src in spec.fields.items():
        if isinstance(src, tuple):  # several source columns gathered into one list field
            expr = pl.concat_list([_column_expr(s).cast(pl.Utf8) for s in src])
        elif name == spec.options_field:
            expr = _column_expr(src).cast(pl.List(pl.Utf8))
        else:
            expr = _column_expr(src)
            dtype = _resolved_dtype(src, schema)
            if isinstance(dtype, pl.List) and name in spec.join:  # e.g. CommonGen's concept list
                if isinstance(dtype.inner, pl.List):  # e.g. DART's [subject, relation, object] triples
                    expr = expr.list.eval(pl.element().cast(pl.List(pl.Utf8)).list.join(" | "))
                expr = expr.cast(pl.List(pl.Utf8)).list.join(spec.join[name])
            elif isinstance(dtype, pl.List):  # a list of references: train on the first
                if name == "answer" and dtype.inner == pl.Utf8 and spec.answer_list == "references":  # all scored
                    answers = pl.element().filter(pl.element().str.strip_chars() != "")  # a blank one is no answer
                    expr = expr.list.eval(answers)
                    references.append(expr.alias(REFERENCES))
                expr = expr.list.first()
            if name != "answer":  # the answer keeps its dtype: an int label indexes the options
                expr = expr.cast(pl.Utf8)
        exprs.append(expr.alias(name))
    return exprs + references  # the references column last, after the canonical fields


def _nested_problem(source: str, schema: pl.Schema) -> str | None:
    """Why dot path ``source`` does not address a nested field of ``schema`` (None when it does)."""
    head, *rest = source.split(".")
    dtype, walked = schema[head], head
    for part in rest:
        if isinstance(dtype, pl.List):
            dtype = dtype.inner
        if not isinstance(dtype, pl.Struct):
            return f"{walked!r} holds {dtype}, not a struct with field {part!r}"
        names = {f.name: f.dtype for f in dtype.fields}
        if part not in names:
            return f"{walked!r} has no field {part!r} in any row (its fields: {sorted(names)})"
        dtype, walked = names[part], f"{walked}.{part}"
    return None


def _resolved_dtype(source: str, schema: pl.Schema) -> pl.DataType:
    head, *rest = source.split(".")
    dtype = schema[head]
    for part in rest:
        if isinstance(dtype, pl.List):
            dtype = dtype.inner
        dtype = {f.name: f.dtype for f in dtype.fields}[part]  # type: ignore[attr-defined]
    return dtype


def answer_expr(spec: DatasetSpec, dtype: pl.DataType) -> pl.Expr:
    """The gold target as text: an int label indexes the options; anything else is cast to text."""
    raw = pl.col("answer")
    if spec.label_map is not None:  # e.g. Sentiment140's 0/4 -> 0/1; unmapped (neutral 2) -> null
        keys = list(spec.label_map)
        values = [None if v is None else str(v) for v in spec.label_map.values()]
        raw = raw.cast(pl.Utf8).replace_strict(keys, values, default=None, return_dtype=pl.Utf8)
        dtype = pl.Int64 if all(v is None or isinstance(v, int) for v in spec.label_map.values()) else pl.Utf8
    if spec.answer_key_field is not None:  # ARC/OpenBookQA: the answer names one of the option keys
        keys = pl.concat_list([pl.col("__answer_keys"), raw.cast(pl.Utf8)])
        pos = keys.list.eval((pl.element() == pl.element().last()).arg_max()).list.first()
        raw = pl.when(pos < pl.col("__answer_keys").list.len()).then(pos).otherwise(None)
        dtype = pl.Int64
    if spec.answer_round:
        raw = raw.cast(pl.Float64).round(0)
        dtype = pl.Int64
    is_index = dtype.is_integer() or spec.answer_is_index
    if is_index and spec.answer_offset:
        raw = raw.cast(pl.Int64) - spec.answer_offset
    if spec.options is not None and is_index:
        # Out-of-range labels (e.g. GLUE's -1 on unlabeled test splits) become null and are then
        # handled by the bad-row policy instead of silently mapping to some option.
        idx = raw.cast(pl.Int64)
        lookup = pl.lit(pl.Series(list(spec.options), dtype=pl.Utf8)).implode()
        return pl.when((idx >= 0) & (idx < len(spec.options))).then(lookup.list.get(idx)).otherwise(None)
    if spec.options_field is not None and is_index:
        idx = raw.cast(pl.Int64)
        n = pl.col(spec.options_field).list.len()
        return pl.when((idx >= 0) & (idx < n)).then(pl.col(spec.options_field).list.get(idx, null_on_oob=True))
    return raw.cast(pl.Utf8)


def bad_row_reasons(spec: DatasetSpec, answer_dtype: pl.DataType = pl.Utf8) -> dict[str, pl.Expr]:
    """Named predicates for rows that cannot become examples (checked on canonical columns). An empty answer
    would train a target of a bare EOS and score every prediction against "" (text answers only)."""
    reasons = {f"null {name}": pl.col(name).is_null() for name in spec.fields}
    if answer_dtype == pl.Utf8:
        reasons["empty answer"] = pl.col("answer").str.strip_chars() == ""
    if spec.options is not None:
        reasons["answer not in options"] = pl.col("answer").is_not_null() & ~pl.col("answer").is_in(list(spec.options))
    if spec.options_field is not None:
        reasons["answer not in its options"] = (
            pl.col("answer").is_not_null()
            & pl.col(spec.options_field).is_not_null()
            & ~pl.col(spec.options_field).list.contains(pl.col("answer"))
        )
    return reasons


def canonicalize(
    lf: pl.LazyFrame, spec: DatasetSpec, role: str, policy: Policy = "fail", origin: str = ""
) -> tuple[pl.LazyFrame, dict[str, int]]:
    """Map raw columns to canonical fields, then fail on or drop bad rows per ``policy``.

    Returns the canonical frame and the count of dropped rows per reason (never silent).
    """
    where = f"dataset {spec.name!r} split {role!r} ({origin or spec.source.path})"
    schema = lf.collect_schema()
    canon = lf.with_row_index("example_id").select(
        pl.col("example_id").cast(pl.Int64), *canonical_exprs(spec, schema, where)
    )
    raw_answer = pl.col("answer")
    if canon.collect_schema()["answer"].is_nested():  # lists/structs: not worth printing
        raw_answer = pl.lit(None, dtype=pl.Utf8)
    canon = canon.with_columns(raw_answer.cast(pl.Utf8, strict=False).alias("__raw_answer"))  # for the message only
    canon = canon.with_columns(answer_expr(spec, canon.collect_schema()["answer"]).alias("answer"))
    if spec.answer_key_field is not None:
        canon = canon.drop("__answer_keys")
    reasons = bad_row_reasons(spec, canon.collect_schema()["answer"])
    counts_row = canon.select(pl.len().alias("rows"), *[pred.sum().alias(r) for r, pred in reasons.items()]).collect(
        engine="streaming"
    )
    counts = {k: int(v) for k, v in counts_row.row(0, named=True).items()}
    n_rows = counts.pop("rows")
    if n_rows == 0:
        raise DataError(f"{where}: the split is empty (0 rows)")
    bad = {r: n for r, n in counts.items() if n}
    if bad and policy == "fail":
        any_bad = pl.any_horizontal(list(reasons.values()))
        row = canon.filter(any_bad).select("example_id", "__raw_answer", **reasons).head(1).collect().row(0, named=True)
        why = ", ".join(r for r in reasons if row[r])
        raw = row["__raw_answer"]
        options = f"; options {list(spec.options)}" if spec.options is not None else ""
        detail = f" (source answer {raw!r}{options})" if "answer" in why else ""
        raise DataError(
            f"{where}: {sum(bad.values())} bad row(s) of {n_rows} {bad}; first at example_id {row['example_id']}: "
            f"{why}{detail}. Fix the data or the registry entry, or set data.bad_rows: drop to drop and count them"
        )
    canon = canon.drop("__raw_answer")
    if bad:
        canon = canon.filter(~pl.any_horizontal(list(reasons.values())))
        if n_rows == sum(bad.values()):
            raise DataError(f"{where}: every row is bad {bad}; nothing would remain")
    return canon, bad


def holdout_ids(n_rows: int, h: Holdout, where: str = "holdout") -> list[int]:
    """Source positions of a holdout: ``h.rows`` of ``n_rows`` drawn by ``random.Random(h.seed)``, sorted.

    Python's seeded ``random`` draws the same sample on every machine, and only the row count is needed, so
    both roles (the sample, and the role that leaves it out) compute it alone, in any order."""
    if h.rows >= n_rows:
        raise DataError(f"{where}: holdout of {h.rows} rows from a split of {n_rows}; nothing would remain")
    return sorted(random.Random(h.seed).sample(range(n_rows), h.rows))


def apply_holdout(canon: pl.LazyFrame, spec: DatasetSpec, role: str, n_rows: int, where: str) -> pl.LazyFrame:
    """The role's rows: its holdout sample (registry ``holdout``), or its split without another role's
    sample, or (no holdout) all of them. ``example_id`` stays the row's position in the source split."""
    if role in spec.holdout:
        return canon.filter(pl.col("example_id").is_in(holdout_ids(n_rows, spec.holdout[role], where)))
    other = spec.held_out_by(role)
    if other is None:
        return canon
    return canon.filter(~pl.col("example_id").is_in(holdout_ids(n_rows, other[1], f"{where} (holdout.{other[0]})")))


def _row_hash(fields: list[str]) -> pl.Expr:
    """One 64-bit hash per row over the canonical fields: the cheap first pass of duplicate finding;
    equal hashes are then compared field by field, so the counts are exact."""
    return pl.struct(fields).hash(seed=0x5EED).alias(_HASH)


def count_duplicates_within(canon: pl.LazyFrame, fields: list[str]) -> int:
    """Rows equal in every field to an earlier row of the same split (exact: hash, then compare)."""
    hashed = canon.select(*fields, _row_hash(fields))
    suspects = hashed.filter(pl.col(_HASH).is_duplicated()).select(fields).collect(engine="streaming")
    if suspects.height == 0:
        return 0
    return suspects.height - suspects.select(pl.struct(fields).n_unique()).item()


def duplicates_of(canon: pl.LazyFrame, other: pl.LazyFrame, fields: list[str]) -> pl.DataFrame:
    """``example_id`` of the rows of ``canon`` equal in every field to some row of ``other``, with the
    first such ``other`` row's id (``other_id``), exact: hash join, then compare the fields."""
    theirs = other.select(pl.col("example_id").alias("other_id"), *fields, _row_hash(fields))
    mine = canon.select("example_id", *fields, _row_hash(fields))
    pairs = mine.join(theirs.select(_HASH).unique(), on=_HASH, how="semi").join(theirs, on=_HASH, suffix="__other")
    same = pl.all_horizontal([pl.col(f).eq_missing(pl.col(f"{f}__other")) for f in fields])
    return (
        pairs.filter(same)
        .group_by("example_id")
        .agg(pl.col("other_id").min())
        .sort("example_id")
        .collect(engine="streaming")
    )


def split_hygiene(
    canon: pl.LazyFrame,
    spec: DatasetSpec,
    role: str,
    eval_splits: Mapping[str, str | os.PathLike[str]],
    policy: DuplicatePolicy,
    where: str,
) -> tuple[pl.LazyFrame, dict[str, Any]]:
    """Count exact duplicates inside the split and, for the train role, against the dataset's canonical
    validation/test splits (``eval_splits``); apply ``policy`` to train rows that are eval rows.

    Why ``drop`` is the default: a train row that is also a test row inflates the score the report
    states, so it must not stay silently; failing would stop a long run over a few rows the source itself
    repeats (GEM's challenge samples, carve-outs of train), while dropping keeps every eval set exactly as
    published and costs training a handful of rows, which the log and the audit count."""
    fields = list(spec.fields)
    report: dict[str, Any] = {"fields": fields, "duplicates_within": count_duplicates_within(canon, fields)}
    if role != "train" or not eval_splits:
        return canon, report
    found = {r: duplicates_of(canon, pl.scan_parquet(p), fields) for r, p in sorted(eval_splits.items())}
    report["duplicates_with"] = {r: df.height for r, df in found.items()}
    ids = sorted({i for df in found.values() for i in df["example_id"].to_list()})
    report["train_rows_in_eval"] = len(ids)  # a row equal to both a validation and a test row counts once
    report["policy"] = policy
    report["dropped_from_train"] = len(ids) if policy == "drop" else 0
    if ids and policy == "fail":
        r, df = next((r, df) for r, df in found.items() if df.height)
        raise DataError(
            f"{where}: {len(ids)} train row(s) equal an eval row in every field {fields} "
            f"({report['duplicates_with']}); first: train example_id {df['example_id'][0]} = {r} example_id "
            f"{df['other_id'][0]}. Fix the splits of {spec.name!r} in {spec.defined_in or 'the registry'} "
            "(e.g. source.data_files, holdout), or set data.split_duplicates: drop (drop them from train) or warn"
        )
    if ids and policy == "drop":
        canon = canon.filter(~pl.col("example_id").is_in(ids))
    return canon, report


def read_ingest_report(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The report ingest stored in a canonical parquet's footer (None for a file written without one)."""
    raw = pl.read_parquet_metadata(path).get(FOOTER_KEY)
    return json.loads(raw) if raw else None


def _describe_hygiene(dataset: str, role: str, h: Mapping[str, Any]) -> str:
    """One line for the job's log."""
    text = f"split hygiene: {dataset} {role}: {h['duplicates_within']} exact duplicate row(s) inside the split"
    if "duplicates_with" in h:
        cross = ", ".join(f"{n} also in {r}" for r, n in h["duplicates_with"].items())
        action = {"drop": f"{h['dropped_from_train']} dropped from train", "warn": "kept (warn)"}.get(h["policy"], "")
        text += f"; train rows: {cross}" + (f" -> {action}" if action and any(h["duplicates_with"].values()) else "")
    return text + f" (data.split_duplicates: {h.get('policy', '-')})"


def ingest_split(
    spec: DatasetSpec,
    role: str,
    out_path: str | os.PathLike[str],
    policy: Policy = "fail",
    root: Path = Path("."),
    hf_cache: str | None = None,
    *,
    eval_splits: Mapping[str, str | os.PathLike[str]] | None = None,
    split_duplicates: DuplicatePolicy = "drop",
) -> dict[str, object]:
    """Read one split of ``spec`` and write its canonical Parquet; return a small report (also stored in
    the parquet's footer under ``FOOTER_KEY``).

    ``root`` prefixes relative local source paths (config data.root); ``hf_cache`` is the
    HuggingFace datasets cache (config data.hf_cache; default HF_HOME's). ``eval_splits`` (train role):
    the dataset's canonical validation/test parquet, which train rows are checked against under
    ``split_duplicates`` (config data.split_duplicates).
    """
    if spec.source.type == "local":
        origin = str(local_path(spec, role, root))
    else:
        origin = f"hf:{spec.source.path}/{spec.source.name or ''}:{spec.splits[role]}"
    where = f"dataset {spec.name!r} split {role!r} ({origin})"
    try:  # reading is inside: a JSONL's schema (answers_as_references) already meets bad UTF-8 or JSON
        lf = read_local(spec, role, root) if spec.source.type == "local" else read_hf(spec, role, cache_dir=hf_cache)
        canon, dropped = canonicalize(lf, spec, role, spec.bad_rows or policy, origin)
        if role in spec.holdout or spec.held_out_by(role) is not None:
            canon = apply_holdout(canon, spec, role, lf.select(pl.len()).collect().item(), where)
        canon, hygiene = split_hygiene(canon, spec, role, eval_splits or {}, split_duplicates, where)
        report: dict[str, Any] = {"dataset": spec.name, "split": role, "dropped": dropped, "source": origin}
        report["split_hygiene"] = hygiene
        print(_describe_hygiene(spec.name, role, hygiene), flush=True)
        with atomic_path(out_path) as tmp:
            # streamed: a 40M-row WMT split never sits in memory
            canon.sink_parquet(tmp, metadata={FOOTER_KEY: json.dumps(report, sort_keys=True)})
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError) as e:  # bad UTF-8, bad JSON, a non-object line
        local = Path(origin) if spec.source.type == "local" else None
        bad = _first_invalid_utf8(local) if local is not None and "utf-8" in str(e).lower() else None
        if bad:
            raise DataError(
                f"dataset {spec.name!r} split {role!r}: {origin} is not valid UTF-8 at {bad}; re-encode the file "
                "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            ) from e
        bad = _first_bad_json_line(local) if local is not None and _local_format(spec, local) == "jsonl" else None
        if bad:
            raise DataError(f"dataset {spec.name!r} split {role!r}: {origin} is not valid JSONL at {bad}") from e
        raise DataError(f"dataset {spec.name!r} split {role!r}: cannot read {origin}: {e}") from e
    rows = pl.scan_parquet(out_path).select(pl.len()).collect().item()
    return {**report, "rows": rows}
