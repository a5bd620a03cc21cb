"""``flanpipe sources check``: a pre-flight check of every source, before any download job runs.

Each hub entry is resolved the way ingest will load it, with ``datasets``' own API and without reading a
row: ``load_dataset_builder`` (the repo's files, its dataset card, the config, which files make each split),
the parquet footers of the data files (their schema with the HF features, ClassLabel names included, and
the label column's min/max statistics). One table reports, per entry:

- whether it loads without a loading script (datasets>=4 runs none) and, if not, what to set instead: the
  hub's parquet conversion (``source.revision: refs/convert/parquet``, probed when the hub is reachable),
  explicit ``source.data_files``, or the manual route (export to local files, a ``local`` source);
- that the config and every split the roles read exist, and which files make each split: a split whose files
  come from more than one directory or file family (GEM's ``challenge_train_sample/`` folded into ``train``)
  is a finding, fixed with ``source.data_files``;
- every mapped column, with the registry's nesting (``answers.text``);
- the source's label names beside the registry's ``options``, in label-id order, so a flipped order shows;
- splits whose labels are hidden (-1 on every row: an unlabelled test split).

A *blocking* finding (the download job would fail or ingest wrong rows) makes the command exit non-zero;
a warning does not. Local entries are listed with their files (present, made by the DAG, or missing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from flanpipe.core.io import atomic_path, write_json
from flanpipe.core.registry import DatasetSpec, split_names

Level = Literal["block", "warn"]
PARQUET_CONVERSION = "refs/convert/parquet"
MAX_FOOTERS = 64  # label statistics: at most this many files' footers per split (a footer is one small read)
_SHARD = re.compile(r"([-_.]?\d+(-of-\d+)?)$")  # "train-00000-of-00002" -> "train", "0000" -> ""


@dataclass
class Finding:
    level: Level
    text: str


@dataclass
class SourceCheck:
    """One registry entry's pre-flight result: the table's cells and the findings behind them."""

    dataset: str
    source: str
    route: str
    loads: str = "?"
    splits: str = ""
    columns: str = ""
    labels: str = ""
    findings: list[Finding] = field(default_factory=list)

    @property
    def blocking(self) -> bool:
        return any(f.level == "block" for f in self.findings)

    @property
    def status(self) -> str:
        return "BLOCK" if self.blocking else "warn" if self.findings else "ok"

    def add(self, level: Level, text: str) -> None:
        self.findings.append(Finding(level, text))


def describe_source(spec: DatasetSpec) -> str:
    s = spec.source
    if s.type == "local":
        return s.path
    where = s.path + (f"/{s.name}" if s.name else "") + (f"@{s.revision}" if s.revision else "")
    return where + (f" (data_dir {s.data_dir})" if s.data_dir else "")


def route_of(spec: DatasetSpec) -> str:
    """Which way the entry reads its data, as the registry says."""
    s = spec.source
    if s.type == "local":
        return "local files"
    revision = f"revision {s.revision}" if s.revision else "hub"
    parts = ["parquet conversion" if s.revision == PARQUET_CONVERSION else revision]
    if s.data_files:
        parts.append("named split files")
    return " + ".join(parts)


# --------------------------------------------------------------------------------------------------------
# features: nesting and labels


def feature_at(features: Any, path: str) -> tuple[Any | None, str | None]:
    """The ``datasets`` feature at dot path ``path`` (lists are walked into), or (None, why not)."""
    import datasets

    # list features: Sequence (every datasets version), List and LargeList (datasets>=4)
    found = (getattr(datasets, n, None) for n in ("List", "LargeList", "Sequence"))
    lists = tuple(t for t in found if isinstance(t, type))
    node, walked = features, ""
    for part in path.split("."):
        while isinstance(node, lists) or (isinstance(node, list) and len(node) == 1):
            node = node[0] if isinstance(node, list) else node.feature
        if not isinstance(node, Mapping):
            return None, f"{walked!r} holds {_feature_text(node)}, not a struct with field {part!r}"
        if part not in node:
            where = f"{walked!r} has" if walked else "the source has"
            return None, f"{where} no field {part!r} (fields: {sorted(node)})"
        node, walked = node[part], f"{walked}.{part}" if walked else part
    return node, None


def _feature_text(feature: Any) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def compare_labels(names: Sequence[str], spec: DatasetSpec, check: SourceCheck) -> None:
    """The source's label names beside the registry's options, in label-id order; a flipped order blocks."""
    options = list(spec.options or ())
    offset = spec.answer_offset
    mapped = [options[i - offset] if 0 <= i - offset < len(options) else "?" for i in range(len(names))]
    check.labels = "; ".join(f"{i} {name} -> {o}" for i, (name, o) in enumerate(zip(names, mapped, strict=True)))
    if spec.label_map is not None or not options:
        return  # the label map decides (and is checked against the options by the registry)
    if len(names) - offset != len(options):
        check.add("block", f"the source has {len(names)} label names {list(names)}, the entry {len(options)} options")
        return
    normed = [_norm(n) for n in names]
    for i, option in enumerate(options):
        j = normed.index(_norm(option)) if _norm(option) in normed else None
        if j is not None and j != i + offset:
            check.add(
                "block",
                f"option {option!r} is label {j} ({names[j]!r}) of the source, but option {i} here: the options are "
                f"not in the source's label order {list(names)}",
            )


# --------------------------------------------------------------------------------------------------------
# files: which files make each split, their footers


def file_family(path: str) -> str:
    """What a file is a shard of: its directory plus its name without the shard number
    (en/train/0000.parquet -> "en/train/", data/train-00000-of-00002.parquet -> "data/train")."""
    p = PurePosixPath(str(path).split("::")[0])
    return f"{p.parent.as_posix()}/{_SHARD.sub('', p.stem)}"


def folded(files: Sequence[str]) -> list[str]:
    """The file families of one split when there is more than one: other splits folded into it."""
    families = sorted({file_family(f) for f in files})
    return families if len(families) > 1 else []


def read_footer(path: str) -> Any:
    """A parquet file's metadata (schema, row-group statistics): the footer only, for a local or hub file."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def label_range(footers: Iterable[Any], column: str) -> tuple[int, int] | None:
    """(min, max) of an integer column over every row group's statistics; None when some lack them."""
    lo: int | None = None
    hi: int | None = None
    for meta in footers:
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if column not in names:
            return None
        j = names.index(column)
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(j).statistics
            if stats is None or not stats.has_min_max or meta.row_group(g).num_rows == 0:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    return None if lo is None or hi is None else (int(lo), int(hi))


# --------------------------------------------------------------------------------------------------------
# one entry


def _builder(spec: DatasetSpec, revision: str | None, cache_dir: str | None) -> Any:
    import datasets

    s = spec.source
    files = {k: list(v) for k, v in s.data_files.items()} if s.data_files else None
    return datasets.load_dataset_builder(
        s.path, s.name, data_dir=s.data_dir, data_files=files, revision=revision, cache_dir=cache_dir
    )


def _is_hub_id(path: str) -> bool:
    return not os.path.exists(path)


def _script_only(spec: DatasetSpec, error: Exception, check: SourceCheck, cache_dir: str | None) -> None:
    """The repo is a loading script: say what to set instead, probing the parquet conversion if possible."""
    check.loads = "script only"
    routes = (
        f"set source.revision: {PARQUET_CONVERSION} (the hub's parquet conversion; omit `name`, pick a config "
        "with data_dir), or name the files with source.data_files, or export the splits to local files and use "
        "a `local` source (the manual route)"
    )
    if spec.source.revision != PARQUET_CONVERSION and _is_hub_id(spec.source.path) and not _offline():
        try:
            probe = _builder(spec, PARQUET_CONVERSION, cache_dir)
            found = sorted(probe.config.data_files or {})
            routes = f"set source.revision: {PARQUET_CONVERSION}: it resolves here (splits {found})"
        except Exception as e:  # noqa: BLE001 -- any failure means that route is closed
            routes = f"no parquet conversion resolves ({_first_line(e)}): export the splits to local files"
    why = f"loads only through a loading script, which datasets>=4 does not run ({_first_line(error)})"
    check.add("block", f"{why}; {routes}")


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def check_hub_entry(spec: DatasetSpec, cache_dir: str | None = None) -> SourceCheck:
    """Resolve one hub entry without reading its rows; see the module doc for what is checked."""
    check = SourceCheck(spec.name, describe_source(spec), route_of(spec))
    if _offline() and _is_hub_id(spec.source.path):
        check.loads = "not checked"
        check.add("warn", "HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set: the hub cannot be asked; run where it is")
        return check
    try:
        builder = _builder(spec, spec.source.revision, cache_dir)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; each means "does not load like this"
        if "scripts are no longer supported" in str(e):
            _script_only(spec, e, check, cache_dir)
        else:
            check.loads = "no"
            check.add("block", f"does not resolve: {type(e).__name__}: {_first_line(e)}")
        return check
    check.loads = "yes"
    files: Mapping[str, Sequence[str]] = {k: [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    available = sorted(set(builder.info.splits or {}) | set(files))
    cells: list[str] = []
    read: list[str] = []
    for role, expr in spec.splits.items():
        for name in split_names(expr):
            if name not in available:
                check.add("block", f"role {role} reads split {name!r} ({expr!r}), which the source lacks: {available}")
                continue
            n = len(files.get(name, ()))
            cells.append(f"{role}<-{expr}" + (f" ({n} file{'s' * (n != 1)})" if name in files else ""))
            if name not in read:
                read.append(name)
    check.splits = ", ".join(cells)
    for name in read:
        families = folded(files.get(name, ()))
        if families:
            check.add(
                "block",
                f"split {name!r} is made of files of {len(families)} kinds {families}: the repo's layout folds other "
                f'splits into it; name its files with source.data_files (e.g. {name}: "{families[0]}*")',
            )
    _check_features(spec, builder, files, read, check)
    return check


def _check_features(
    spec: DatasetSpec, builder: Any, files: Mapping[str, Sequence[str]], read: Sequence[str], check: SourceCheck
) -> None:
    """Columns with their nesting, label names and hidden labels, from the card or the parquet footers."""
    import datasets

    footers: dict[str, list[Any]] = {}

    def footers_of(split: str) -> list[Any]:
        if split not in footers:
            parquet = [f for f in files.get(split, ()) if str(f).split("::")[0].endswith(".parquet")]
            footers[split] = [read_footer(f) for f in parquet[:MAX_FOOTERS]]
        return footers[split]

    features = builder.info.features
    if features is None and read:
        first = footers_of(read[0])
        if first:
            features = datasets.Features.from_arrow_schema(first[0].schema.to_arrow_schema())
    if features is None:
        check.columns = "not known before download"
        check.add("warn", "no dataset card with features and no parquet files: columns are checked at ingest only")
        return
    paths = [(name, src) for name, srcs in spec.fields.items() for src in ((srcs,) if isinstance(srcs, str) else srcs)]
    if spec.answer_key_field:
        paths.append(("answer_key_field", spec.answer_key_field))
    missing = []
    for name, src in paths:
        _, why = feature_at(features, src)
        if why:
            missing.append(f"{name} <- {src!r}")
            check.add("block", f"field {name} <- {src!r}: {why}")
    check.columns = "all present" if not missing else "missing: " + ", ".join(missing)
    answer = spec.fields["answer"]
    feature, _ = feature_at(features, answer) if isinstance(answer, str) else (None, None)
    if isinstance(feature, datasets.ClassLabel):
        compare_labels(feature.names, spec, check)
    if isinstance(answer, str) and "." not in answer and getattr(feature, "dtype", "").startswith("int"):
        for role, expr in spec.splits.items():
            for name in split_names(expr):
                rng = label_range(footers_of(name), answer) if name in read else None
                if rng == (-1, -1):
                    check.add(
                        "block",
                        f"role {role} reads split {name!r}, whose labels are all hidden (-1): map {role} to a labelled "
                        "split (FLAN reports the validation split as test where test labels are hidden)",
                    )
                elif rng is not None and rng[0] < 0 and spec.bad_rows != "drop":
                    check.add("warn", f"split {name!r} has unlabelled rows (-1): bad rows unless data.bad_rows: drop")


def check_local_entry(spec: DatasetSpec, root: Path = Path(".")) -> SourceCheck:
    """A local entry: its files present, made by the DAG (results/...), or missing (a manual download)."""
    check = SourceCheck(spec.name, describe_source(spec), route_of(spec), loads="local")
    cells, missing = [], []
    for role, split in spec.splits.items():
        path = spec.source.path.format(split=split)
        present = "present" if (root / path).is_file() else "missing"
        state = "made by the DAG" if path.startswith("results/") else present
        cells.append(f"{role}: {state}")
        if state == "missing":
            missing.append(str(root / path))
    check.splits = ", ".join(cells)
    if missing:
        check.add(
            "block",
            f"file(s) {missing} do not exist and no rule makes them: fetch or create them as the comments at the "
            f"entry in {spec.defined_in or 'the registry'} describe",
        )
    return check


def check_sources(
    registry: Mapping[str, DatasetSpec], root: Path = Path("."), cache_dir: str | None = None
) -> list[SourceCheck]:
    """Every entry, hub ones resolved with ``datasets`` (see the module doc), local ones by their files."""
    return [
        check_hub_entry(spec, cache_dir) if spec.source.type == "hf" else check_local_entry(spec, root)
        for spec in registry.values()
    ]


# --------------------------------------------------------------------------------------------------------
# the table


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "–"


def format_table(checks: Sequence[SourceCheck]) -> str:
    """One markdown table (a row per entry), then every finding, blocking ones first."""
    head = ["dataset", "status", "source", "route", "loads", "splits", "columns", "labels (source -> options)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in checks:
        cells = [c.dataset, c.status, c.source, c.route, c.loads, c.splits, c.columns, c.labels]
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    findings = [(c.dataset, f) for c in checks for f in c.findings]
    findings.sort(key=lambda x: x[1].level != "block")
    n_block = sum(c.blocking for c in checks)
    lines += ["", f"{len(checks)} entries, {n_block} with a blocking finding, {len(findings)} finding(s)."]
    lines += [f"- {'BLOCK' if f.level == 'block' else 'warn'} {d}: {f.text}" for d, f in findings]
    return "\n".join(lines) + "\n"


def as_json(checks: Sequence[SourceCheck]) -> list[dict[str, Any]]:
    return [{**asdict(c), "status": c.status} for c in checks]


def write_report(checks: Sequence[SourceCheck], out: str | os.PathLike[str]) -> None:
    """The table to ``out`` and the findings as JSON beside it (``out`` with suffix .json), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), as_json(checks))
    with atomic_path(out) as tmp:
        tmp.write_text(format_table(checks), encoding="utf-8")
