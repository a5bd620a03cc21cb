"""The task registry: which datasets exist, where they come from, and how they are scored.

Like seqio's TaskRegistry, the registry is the single source of truth for dataset facts and fails loudly
on duplicates. Unlike seqio it is pure data (YAML under ``config/registry/``), so adding a dataset needs
a registry entry and a template file, no code.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from flanpipe.core.io import PROJECT_ROOT, read_yaml, resolve_config_path

SCHEMA_PATH = PROJECT_ROOT / "config" / "schemas" / "registry.schema.yaml"
ROLES = ("train", "validation", "test")
# Columns ingest writes beside the canonical fields (flanpipe.data.ingest); no field may take their names.
# ``references``: every acceptable answer, where the source holds several (the first is ``answer``).
REFERENCES = "references"
RESERVED_COLUMNS = ("example_id", REFERENCES)
_SPLIT_PART = re.compile(r"^\s*(?P<name>[^\[\]+\s]+)\s*(\[[^\]]*\])?\s*$")

# FLAN's overlap rules (paper section 3): holding out one of these clusters also removes its partners
# from training, because their tasks are near-duplicates (NLI <-> paraphrase) or share passages.
FLAN_OVERLAPS: dict[str, tuple[str, ...]] = {
    "nli": ("paraphrase",),
    "paraphrase": ("nli",),
    "reading_comprehension": ("reading_comprehension_with_commonsense",),
    "commonsense": ("reading_comprehension_with_commonsense",),
    "reading_comprehension_with_commonsense": ("reading_comprehension", "commonsense"),
}


class RegistryError(ValueError):
    """A registry file or entry is wrong; the message names the file and dataset."""


@dataclass(frozen=True)
class SourceSpec:
    """Where a dataset's raw splits come from."""

    type: Literal["local", "hf"]
    path: str  # local: file pattern with {split}; hf: dataset id
    format: str | None = None  # local only: jsonl | parquet | csv (default: from the suffix)
    name: str | None = None  # hf config name
    data_dir: str | None = None  # hf data_dir (manual downloads)
    revision: str | None = None  # hf revision (refs/convert/parquet serves script repos as Parquet)
    # hf: source split name -> the repo's file patterns that make it (datasets' data_files), where the repo's
    # layout would fold other directories (GEM's challenge_*) into a split
    data_files: Mapping[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class Holdout:
    """A role read as a seeded random sample of ``rows`` rows of its source split (registry ``holdout``)."""

    rows: int
    seed: int


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its cluster, source, field mapping, options and metric."""

    name: str
    cluster: str
    source: SourceSpec
    fields: Mapping[str, str | tuple[str, ...]]  # canonical field -> source column(s) (dot path for nesting)
    metric: str
    templates: Path
    splits: Mapping[str, str] = field(default_factory=lambda: {r: r for r in ROLES})
    options: tuple[str, ...] | None = None  # static label options (classification)
    options_field: str | None = None  # canonical list field with per-example options
    answer_is_index: bool = False  # the source answer is an index into the options
    answer_key_field: str | None = None  # source list column of option keys the answer names (ARC's "A".."E")
    answer_offset: int = 0  # subtracted from index answers (1 for 1-based labels)
    answer_round: bool = False  # round numeric answers first (STS-B similarity -> "0".."5")
    # a list-typed answer: "references" (each element is an acceptable answer; all are scored) or "first"
    # (the elements are parts of one answer, e.g. DROP's multi-span answers: only the first is kept)
    answer_list: Literal["references", "first"] = "references"
    label_map: Mapping[str, str | int | None] | None = None  # raw answer (as text) -> option text / index
    join: Mapping[str, str] = field(default_factory=dict)  # field -> separator for list-typed sources
    bad_rows: str | None = None  # per-dataset override of data.bad_rows
    paper_dataset: str = ""  # the paper's dataset this loader belongs to (default: its own name)
    eval_only: bool = False  # never trained on: marked so, or its splits have no train
    published: Mapping[str, float | str | None] | None = None  # the paper's scores + source (report only)
    holdout: Mapping[str, Holdout] = field(default_factory=dict)  # role -> seeded sample of its source split
    defined_in: str = ""  # registry file, for error messages

    @property
    def has_options(self) -> bool:
        return self.options is not None or self.options_field is not None

    @property
    def has_eval_splits(self) -> bool:
        """Whether the entry maps both splits an evaluation reads (validation picks the template, test scores)."""
        return "validation" in self.splits and "test" in self.splits

    @property
    def canonical_fields(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def held_out_by(self, role: str) -> tuple[str, Holdout] | None:
        """(the role, its holdout) whose sample ``role`` must leave out: another role that samples the
        split ``role`` reads (dbpedia_14's validation samples train, so the train role skips those rows)."""
        split = self.splits.get(role)
        for other, h in self.holdout.items():
            if other != role and self.splits.get(other) == split:
                return other, h
        return None


def split_names(expr: str) -> tuple[str, ...]:
    """The source split names a split expression reads: "train[:-200]" -> ("train",),
    "train[:100]+train[-100:]" -> ("train",), "validation" -> ("validation",) (datasets' slice syntax)."""
    names: list[str] = []
    for part in expr.split("+"):
        m = _SPLIT_PART.match(part)
        if m is None:
            raise ValueError(f"split expression {expr!r}: cannot read {part!r} as NAME or NAME[slice]")
        if m["name"] not in names:
            names.append(m["name"])
    return tuple(names)


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    """Expand globs; a pattern that matches nothing is an error (a typo would silently drop datasets)."""
    out: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(str(resolve_config_path(p))))
        if not matches and not Path(p).is_absolute():
            matches = sorted(glob.glob(str(PROJECT_ROOT / p)))
        if not matches:
            raise RegistryError(f"registry: no file matches {str(p)!r}")
        out.extend(Path(m) for m in matches)
    return out


def _entry_to_spec(name: str, raw: dict[str, Any], path: Path) -> DatasetSpec:
    src = raw["source"]
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw["fields"].items()}
    spec = DatasetSpec(
        name=name,
        cluster=raw["cluster"],
        source=SourceSpec(
            type=src["type"],
            path=src["path"],
            format=src.get("format"),
            name=src.get("name"),
            data_dir=src.get("data_dir"),
            revision=src.get("revision"),
            data_files=(
                {k: (v,) if isinstance(v, str) else tuple(v) for k, v in src["data_files"].items()}
                if src.get("data_files")
                else None
            ),
        ),
        fields=fields,
        metric=raw["metric"],
        templates=resolve_config_path(raw.get("templates", f"config/templates/{name}.yaml")),
        splits=raw.get("splits") or {r: r for r in ROLES},
        options=tuple(str(o) for o in raw["options"]) if raw.get("options") is not None else None,
        options_field=raw.get("options_field"),
        answer_is_index=bool(raw.get("answer_is_index", False)),
        answer_key_field=raw.get("answer_key_field"),
        answer_offset=int(raw.get("answer_offset", 0)),
        answer_round=bool(raw.get("answer_round", False)),
        answer_list=raw.get("answer_list", "references"),
        label_map={str(k): v for k, v in raw["label_map"].items()} if raw.get("label_map") else None,
        join=dict(raw.get("join") or {}),
        bad_rows=raw.get("bad_rows"),
        paper_dataset=raw.get("paper_dataset", name),
        eval_only=bool(raw.get("eval_only", False)) or "train" not in (raw.get("splits") or {"train": "train"}),
        published=dict(raw["published"]) if raw.get("published") else None,
        holdout={role: Holdout(int(h["rows"]), int(h["seed"])) for role, h in (raw.get("holdout") or {}).items()},
        defined_in=str(path),
    )
    where = f"{path}: dataset {name!r}"
    reserved = sorted(set(spec.fields) & set(RESERVED_COLUMNS))
    if reserved:
        raise RegistryError(f"{where}: field name(s) {reserved} are reserved for the columns ingest adds; rename them")
    _check_sources(spec, where)
    if spec.options is not None and spec.options_field is not None:
        raise RegistryError(f"{where}: give either 'options' or 'options_field', not both")
    if spec.options_field is not None and spec.options_field not in spec.fields:
        raise RegistryError(
            f"{where}: options_field {spec.options_field!r} is not one of its fields {sorted(spec.fields)}"
        )
    unknown_join = sorted(set(spec.join) - set(spec.fields))
    if unknown_join:
        raise RegistryError(f"{where}: 'join' names field(s) {unknown_join} that are not in 'fields'")
    _check_options(spec, where)
    if "answer" not in spec.fields:
        raise RegistryError(f"{where}: 'fields' must map the target field 'answer'")
    if spec.eval_only and not spec.has_eval_splits:
        raise RegistryError(f"{where}: an evaluation-only entry needs both 'validation' and 'test' in 'splits'")
    if spec.source.type == "local" and "{split}" not in spec.source.path:
        raise RegistryError(f"{where}: local source path must contain '{{split}}': {spec.source.path!r}")
    return spec


def _check_sources(spec: DatasetSpec, where: str) -> None:
    """Split expressions read, data_files cover every split read, and a holdout samples a mapped role."""
    read: dict[str, tuple[str, ...]] = {}
    for role, expr in spec.splits.items():
        try:
            read[role] = split_names(expr)
        except ValueError as e:
            raise RegistryError(f"{where}: splits.{role}: {e}") from None
    files = spec.source.data_files
    if files is not None:
        if spec.source.type != "hf":
            raise RegistryError(f"{where}: source.data_files is for hf sources (a local source names its files)")
        missing = sorted({n for names in read.values() for n in names} - set(files))
        if missing:
            raise RegistryError(
                f"{where}: 'splits' reads source split(s) {missing} but source.data_files defines only "
                f"{sorted(files)}; with data_files, datasets knows no other split"
            )
    for role in spec.holdout:
        if role not in spec.splits:
            raise RegistryError(f"{where}: holdout.{role}: the entry's 'splits' does not map {role!r}")
        if spec.splits[role] != split_names(spec.splits[role])[0]:
            raise RegistryError(
                f"{where}: holdout.{role}: split {spec.splits[role]!r} is a slice; a holdout samples a whole split"
            )
    sampled = [spec.splits[r] for r in spec.holdout]
    twice = sorted({s for s in sampled if sampled.count(s) > 1})
    if twice:
        raise RegistryError(
            f"{where}: holdout: two roles sample split(s) {twice}; their samples could overlap, so give one "
            "role the sample and the other a slice or another split"
        )


def _check_options(spec: DatasetSpec, where: str) -> None:
    """Static options are the label set rank classification scores: a repeated or empty one collapses two
    labels into one (or scores an empty string), and a label map must point into them."""
    if spec.options is not None:
        empty = [i for i, o in enumerate(spec.options) if not o.strip()]
        if empty:
            raise RegistryError(f"{where}: options {list(spec.options)}: option(s) at position {empty} are empty")
        seen: dict[str, int] = {}
        for i, o in enumerate(spec.options):
            if o in seen:
                raise RegistryError(
                    f"{where}: options {list(spec.options)}: {o!r} is listed twice (positions {seen[o]} and {i}), "
                    "which collapses two labels into one; every option must be distinct (as text: 1 and '1' are "
                    "the same)"
                )
            seen[o] = i
    for key, on in (("answer_is_index", spec.answer_is_index), ("answer_key_field", spec.answer_key_field)):
        if on and not spec.has_options:
            raise RegistryError(
                f"{where}: {key} makes the answer an index into the options, but the entry has neither 'options' "
                "nor 'options_field'; the targets would be the bare index numbers"
            )
    if spec.label_map and spec.options is not None:
        n = len(spec.options)
        for raw, v in spec.label_map.items():
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v - spec.answer_offset < n:
                raise RegistryError(
                    f"{where}: label_map {raw!r} -> {v} points past the {n} options {list(spec.options)}"
                )
            if isinstance(v, str) and v not in spec.options:
                raise RegistryError(
                    f"{where}: label_map {raw!r} -> {v!r} is not one of the options {list(spec.options)}; every "
                    "row with that label would become a bad row"
                )


def _check_unique_names(path: Path) -> None:
    """A dataset defined twice in one file: YAML keeps the last silently, so find it in the node tree."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return  # read_yaml reports it with the file and line
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value != "datasets" or not isinstance(value, yaml.MappingNode):
            continue
        first: dict[str, int] = {}
        for name, _entry in value.value:
            line = name.start_mark.line + 1
            if name.value in first:
                raise RegistryError(
                    f"{path}:{line}: dataset {name.value!r} is defined twice in this file (first at line "
                    f"{first[name.value]}); YAML would silently keep only the second entry"
                )
            first[name.value] = line


def load_registry(paths: Sequence[str | Path]) -> dict[str, DatasetSpec]:
    """Load and validate registry files; duplicate dataset names across files are an error."""
    import jsonschema  # here, not at module level: the ~80 jobs that only rebuild a spec from facts skip its ~60 ms

    schema = read_yaml(SCHEMA_PATH)
    specs: dict[str, DatasetSpec] = {}
    for path in _expand(paths):
        _check_unique_names(path)  # the dataset-level message first; read_yaml rejects any other duplicate key
        try:
            raw = read_yaml(path)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        try:
            jsonschema.validate(raw, schema)
        except jsonschema.ValidationError as e:
            key = "/".join(str(p) for p in e.absolute_path) or "<top>"
            raise RegistryError(f"{path}: at {key}: {e.message}") from None
        for name, entry in raw["datasets"].items():
            if name in specs:
                raise RegistryError(
                    f"{path}: dataset {name!r} is already defined in {specs[name].defined_in} (cluster "
                    f"{specs[name].cluster!r} there, {entry['cluster']!r} here); dataset names must be unique "
                    "across registry files, and a dataset belongs to one cluster"
                )
            specs[name] = _entry_to_spec(name, entry, path)
    _check_paper_datasets(specs)
    return specs


def _check_paper_datasets(specs: Mapping[str, DatasetSpec]) -> None:
    """Loaders of one paper dataset (ANLI R1-R3) must share a cluster: split across two, holding one
    cluster out would still train on the same dataset through the other."""
    first: dict[str, DatasetSpec] = {}
    for spec in specs.values():
        other = first.setdefault(spec.paper_dataset or spec.name, spec)
        if other.cluster != spec.cluster:
            raise RegistryError(
                f"{spec.defined_in}: dataset {spec.name!r} (cluster {spec.cluster!r}) and {other.name!r} (cluster "
                f"{other.cluster!r}, {other.defined_in}) are loaders of paper_dataset {spec.paper_dataset!r} but in "
                "different clusters; a paper dataset belongs to one cluster"
            )


def with_local_mirror(registry: Mapping[str, DatasetSpec], mirror: str | None) -> dict[str, DatasetSpec]:
    """Config ``data.local_mirror``: every dataset read from ``<mirror>/<name>/<role>.jsonl`` instead of its
    registry source (exported copies on clusters without internet; the test fixtures). The files hold the
    split each role maps to, so the roles map to themselves. A relative mirror is read from data.root."""
    if not mirror:
        return dict(registry)
    identity = {r: r for r in ROLES}
    return {
        name: replace(
            spec,
            source=SourceSpec(type="local", format="jsonl", path=f"{mirror.rstrip('/')}/{name}/{{split}}.jsonl"),
            splits=identity,
            holdout={},  # the mirror's files hold each role's rows already
        )
        for name, spec in registry.items()
    }


def with_clusters(
    registry: Mapping[str, DatasetSpec], override: Mapping[str, str] | None, source: str = "config key clusters"
) -> dict[str, DatasetSpec]:
    """An experiment's own grouping (config ``clusters:``): T0's task types are not FLAN's clusters, and a
    dataset's registry entry (its facts) should not change with the experiment that groups it."""
    if not override:
        return dict(registry)
    unknown = sorted(set(override) - set(registry))
    if unknown:
        raise RegistryError(f"{source}: unknown dataset(s) {unknown}")
    return {name: replace(spec, cluster=override.get(name, spec.cluster)) for name, spec in registry.items()}


def with_template_files(
    registry: Mapping[str, DatasetSpec], files: Mapping[str, str] | None, source: str = "config key templates.files"
) -> dict[str, DatasetSpec]:
    """An experiment's own prompts for some datasets (config ``templates.files``): T0 scores its held-out
    datasets with P3's prompts, FLAN with its own, and the registry entry (the data's facts) stays one."""
    if not files:
        return dict(registry)
    unknown = sorted(set(files) - set(registry))
    if unknown:
        raise RegistryError(f"{source}: unknown dataset(s) {unknown}")
    return {
        name: replace(spec, templates=resolve_config_path(files[name])) if name in files else spec
        for name, spec in registry.items()
    }


def clusters(registry: Mapping[str, DatasetSpec]) -> dict[str, list[str]]:
    """Cluster -> its dataset names, in registry order."""
    out: dict[str, list[str]] = {}
    for spec in registry.values():
        out.setdefault(spec.cluster, []).append(spec.name)
    return out


def excluded_clusters(held_out: Iterable[str], overlaps: Mapping[str, Sequence[str]]) -> set[str]:
    """Clusters removed from training when ``held_out`` are evaluated (the held-out ones plus overlaps)."""
    out: set[str] = set()
    for c in held_out:
        out.add(c)
        out.update(overlaps.get(c, ()))
    return out


def training_datasets(
    registry: Mapping[str, DatasetSpec],
    held_out: Sequence[str],
    overlaps: Mapping[str, Sequence[str]] = FLAN_OVERLAPS,
    train_clusters: Sequence[str] | None = None,
) -> list[str]:
    """Datasets a model evaluated on ``held_out`` may train on.

    ``train_clusters`` restricts training to those clusters (the number-of-clusters ablation); held-out
    and overlapping clusters are removed even if listed there.
    """
    known = clusters(registry)
    for c in list(held_out) + list(train_clusters or []):
        if c not in known:
            raise RegistryError(f"unknown cluster {c!r}; the registry has {sorted(known)}")
    drop = excluded_clusters(held_out, overlaps)
    allowed = set(train_clusters) if train_clusters is not None else set(known)
    names = [s.name for s in registry.values() if s.cluster in allowed and s.cluster not in drop]
    if not names:
        raise RegistryError(f"holding out {list(held_out)} removes clusters {sorted(drop)} and leaves no training data")
    return names


def registry_table(
    registry: Mapping[str, DatasetSpec], n_templates: Mapping[str, tuple[int, int]], by_loader: bool = False
) -> list[dict]:
    """Rows for ``flanpipe tasks``: one per paper dataset (its loaders listed), or one per loader.

    The paper counts 62 datasets; ANLI R1-R3 and ARC easy/challenge are separate loaders of one each.
    """
    groups: dict[str, list[DatasetSpec]] = {}
    for s in registry.values():
        groups.setdefault(s.name if by_loader else (s.paper_dataset or s.name), []).append(s)
    rows = []
    for name, specs in groups.items():
        s = specs[0]
        rows.append(
            {
                "name": name,
                "cluster": s.cluster,
                "n_templates": min(n_templates[x.name][0] for x in specs),
                "n_turned_around": min(n_templates[x.name][1] for x in specs),
                "metric": s.metric,
                "loaders": [x.name for x in specs],
                "options": list(s.options) if s.options else ([f"<{s.options_field}>"] if s.options_field else []),
                "source": s.source.type + ":" + s.source.path + (f"/{s.source.name}" if s.source.name else ""),
            }
        )
    return rows


# ------------------------------------------------------------------ the facts each stage tracks (rerun contract)
# A registry entry's facts reach a job only through its tracked params: the job rebuilds its DatasetSpec from
# them (``spec_from_facts``), so a fact it reads but does not track cannot exist. Entry keys tracked by no stage:
# ``description`` and comments (never loaded), ``templates`` (the file's parsed templates are tracked by the
# rules that render or audit them), ``metric`` (evaluate's group params), ``published`` (report),
# ``paper_dataset`` / ``eval_only`` (they shape the plan, not a file), ``defined_in`` (messages only).

INGEST_FACTS = (
    "name",
    "source",
    "splits",
    "fields",
    "options",
    "options_field",
    "answer_is_index",
    "answer_key_field",
    "answer_offset",
    "answer_round",
    "answer_list",
    "label_map",
    "join",
    "bad_rows",
    "holdout",
)
"""What makes one split's canonical parquet: where it comes from and how raw rows become canonical ones. Every
role's ``splits`` and ``holdout`` count for each split: a role sampled from another's source split
(``holdout``) changes what that other role keeps (``DatasetSpec.held_out_by``)."""

RENDER_FACTS = ("name", "cluster", "fields", "options", "options_field")
"""What rendering reads of an entry besides its canonical parquet and templates: shard columns (``dataset``,
``cluster``, ``options``) and the canonical field names templates are checked against."""


def _facts(spec: DatasetSpec, keys: Sequence[str]) -> dict[str, Any]:
    """``keys`` of ``spec``, canonical, except ``fields``: a list of (canonical field, source) pairs in entry
    order, because that order is the canonical parquet's column order (a fact), which sorted keys would lose."""
    from flanpipe.core.rerun import canonical

    facts = canonical({k: getattr(spec, k) for k in keys if k != "fields"})
    if "fields" in keys:
        facts["fields"] = [[name, canonical(src)] for name, src in spec.fields.items()]
    return facts


def ingest_facts(spec: DatasetSpec, bad_rows: str) -> dict[str, Any]:
    """Rule ingest's tracked facts of an entry: the INGEST_FACTS, ``bad_rows`` resolved against the config's."""
    facts = _facts(spec, INGEST_FACTS)
    facts["bad_rows"] = spec.bad_rows or bad_rows
    return facts


def render_facts(spec: DatasetSpec) -> dict[str, Any]:
    """Rules render_shard / render_eval_shard's tracked facts of the entry (RENDER_FACTS)."""
    return _facts(spec, RENDER_FACTS)


def spec_from_facts(facts: Mapping[str, Any], *, defined_in: str = "", templates: str | Path = "") -> DatasetSpec:
    """The DatasetSpec a job works from: its tracked ``facts`` (``ingest_facts`` / ``render_facts``), every
    other field empty, so that a stage cannot read a fact its rule does not track. ``defined_in`` (for
    messages) and ``templates`` (the rule's input file) are not facts."""
    f = dict(facts)
    if "source" in f:
        f["source"] = SourceSpec(**f["source"])
    if "fields" in f:  # (name, source) pairs in entry order (``_facts``)
        f["fields"] = {name: tuple(src) if isinstance(src, list) else src for name, src in f["fields"]}
    if f.get("options") is not None:
        f["options"] = tuple(f["options"])
    if "holdout" in f:
        f["holdout"] = {role: Holdout(**h) for role, h in f["holdout"].items()}
    base: dict[str, Any] = {
        "cluster": "",
        "source": SourceSpec(type="local", path=""),
        "fields": {},
        "metric": "",
        "templates": Path(templates),
        "defined_in": defined_in,
    }
    return DatasetSpec(**{**base, **f})
