"""The rerun contract's vocabulary: what a rule tracks (its facts, in one canonical form), what it only uses
(its operational settings), and the code version of each stage.

Snakemake reruns a job when a tracked param differs from the one recorded with its outputs, compared as the
``repr`` of each value (snakemake.persistence: a dict's repr follows its key order, ``1`` is not ``1.0``). So
every tracked param goes through ``canonical`` first: mapping keys sorted, whole floats written as ints,
tuples as lists, dataclasses and paths as plain values. Two configs that say the same thing then track the
same params, whatever their key order or number spelling.

Operational settings (log cadence, checkpoint cadence and retention, the MFU denominator, micro-batch and
TP/PP layout, evaluation batch size, cache and data directories) change how a job runs, not what it writes.
They reach the job as an ``Operational`` param: a read-only mapping that is not a ``dict``, which Snakemake's
params trigger does not record (it records builtin values only), so changing one reruns nothing. ARCH.md
("The rerun contract") says why this channel and not another.

``STAGE_VERSIONS``: one integer per rule that runs flanpipe code, passed as the rule's ``version`` param and
recorded in what it writes. Bump a stage's number in the same change that alters what that stage writes (a bug
fix in ingest, a metric, packing): its jobs and everything downstream rerun. A refactor bumps nothing and
reruns nothing. tests/test_rerun_contract.py checks that every rule has one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import PurePath
from typing import Any

STAGE_VERSIONS: dict[str, int] = {
    "generate_synthetic": 1,
    "sources_check": 1,
    "ingest": 1,  # rules ingest and download: flanpipe.data.ingest.ingest_split
    "render_shard": 1,
    "render_eval_shard": 1,
    "mix": 1,
    "train_tokenizer": 1,
    "pack": 2,  # 2: packing.json records the packed files' and the tokenizer's digests
    "train_spec": 2,  # 2: the spec holds only what changes the weights (operational keys go to --ops)
    "audit": 1,
    "train": 2,  # 2: resume only with the same data, tokenizer, initial weights and spec
    "evaluate": 1,
    "report": 1,
    "ablation": 1,
    "uncertainty": 1,
    "import_hf": 1,
    "export_hf": 1,
}
"""Code version of each stage, by rule name (``download`` shares ``ingest``'s)."""


def stage_version(stage: str) -> int:
    """The code version of ``stage`` (a rule name); an unknown stage is an error naming the known ones."""
    try:
        return STAGE_VERSIONS[stage]
    except KeyError:
        raise KeyError(f"no code version for stage {stage!r}; STAGE_VERSIONS has {sorted(STAGE_VERSIONS)}") from None


def version_record(stage: str) -> dict[str, str]:
    """``{"flanpipe_stage": stage, "flanpipe_stage_version": "N"}``: what a stage records in its outputs
    (Parquet key-value metadata, JSON keys), so a file says which code version wrote it."""
    return {"flanpipe_stage": stage, "flanpipe_stage_version": str(stage_version(stage))}


def _number(x: float) -> int | float:
    """A whole float as an int (``1.0`` and ``1`` are one value); exact only within 2**53."""
    if math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x


def canonical(value: Any) -> Any:
    """``value`` as plain JSON-like data in one spelling: mappings with sorted (string) keys, whole numbers as
    ints, tuples/sets as lists (sets sorted), dataclasses as their fields, paths as strings.

    e.g. ``{"pack": 256.0, "inputs": 192}`` -> ``{"inputs": 192, "pack": 256}``.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, Operational):
        raise TypeError("an Operational mapping is never a tracked fact: pass it as its own param")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    raise TypeError(f"no canonical form for {type(value).__name__} {value!r}")


class Operational(Mapping[str, Any]):
    """Settings that change how a job runs, not what it writes: a read-only mapping handed to a rule as a
    param that Snakemake's params trigger does not record (it is not a builtin ``dict``), so editing one
    reruns nothing. ``str()`` is its JSON, for a shell command line (``--ops {params.ops:q}``)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = canonical(dict(items or {}))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __str__(self) -> str:
        return json.dumps(self._items, sort_keys=True)

    def __repr__(self) -> str:
        return f"Operational({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # script rules pickle their params
        return (Operational, (self._items,))


def digest_json(value: Any) -> str:
    """sha256 of ``canonical(value)`` as JSON (16 hex digits): an identity for a set of facts."""
    import hashlib

    blob = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
