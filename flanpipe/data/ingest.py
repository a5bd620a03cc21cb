"""Ingest: raw dataset splits (local files or HuggingFace ``datasets``) -> canonical Parquet.

The canonical form has ``example_id`` (the row's position in the source split, so every later stage can
point back to the raw example) and one column per canonical field of the registry entry. For
classification datasets ``answer`` holds the option *text*, so templates and metrics never see label ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import polars as pl

from flanpipe.core.io import atomic_path
from flanpipe.core.registry import DatasetSpec

Policy = Literal["fail", "drop"]


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
        return pl.scan_ndjson(path, infer_schema_length=None)
    if fmt == "parquet":
        return pl.scan_parquet(path)
    return pl.scan_csv(path, infer_schema_length=None)


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
    exprs: list[pl.Expr] = []
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
                expr = expr.list.first()
            if name != "answer":  # the answer keeps its dtype: an int label indexes the options
                expr = expr.cast(pl.Utf8)
        exprs.append(expr.alias(name))
    return exprs


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


def ingest_split(
    spec: DatasetSpec,
    role: str,
    out_path: str | os.PathLike[str],
    policy: Policy = "fail",
    root: Path = Path("."),
    hf_cache: str | None = None,
) -> dict[str, object]:
    """Read one split of ``spec`` and write its canonical Parquet; return a small report.

    ``root`` prefixes relative local source paths (config data.root); ``hf_cache`` is the
    HuggingFace datasets cache (config data.hf_cache; default HF_HOME's).
    """
    if spec.source.type == "local":
        lf = read_local(spec, role, root)
        origin = str(local_path(spec, role, root))
    else:
        lf = read_hf(spec, role, cache_dir=hf_cache)
        origin = f"hf:{spec.source.path}/{spec.source.name or ''}:{spec.splits[role]}"
    try:
        canon, dropped = canonicalize(lf, spec, role, spec.bad_rows or policy, origin)
        with atomic_path(out_path) as tmp:
            canon.sink_parquet(tmp)  # streamed: a 40M-row WMT split never sits in memory
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
    return {"dataset": spec.name, "split": role, "rows": rows, "dropped": dropped, "source": origin}
