"""Contamination audit: n-gram overlap between a run's training mixture and the eval splits it is scored on.

A held-out score means little if the model trained on the test examples (a leaked *example*) or on the
eval prompt's instruction text (a seen *template*: the zero-shot claim is about unseen instructions too).
The two are measured separately, on purpose:

- Example level: n-grams (``ngram`` words, 13 by default as in GPT-3's audit) of each eval example's own
  content, i.e. its canonical fields (``results/ingest/<dataset>/<split>.parquet``), never the rendered
  prompt: prompt text shared with training (an options block, a generic instruction) would flag every
  example of a dataset and hide real leaks. An example is contaminated when any one of its n-grams occurs
  in a training example's inputs or targets. N-grams never cross a field boundary; a field shorter than
  ``ngram`` words contributes none (too short to tell a leak from a common phrase).
- Template level: n-grams (``template_ngram`` words, 6 by default: instructions are short) of each eval
  template's literal text pieces (placeholders cut the text into pieces) against the training *inputs*.
  A template is seen when any of its n-grams occurs there; every eval prompt rendered with it is then
  template-contaminated, whatever the example.

Text is normalised first: lowercase, punctuation removed, whitespace collapsed. Words are hashed by Polars
and an n-gram's 64-bit hash is sum_k word_hash[k] x B^k (mod 2^64) for a fixed odd B, from prefix sums:
numpy array arithmetic over all the words of a batch at once, no loop over rows. The eval side is small (a few
hundred examples per split) and held as a sorted array; the mixture is streamed in row batches and only
the eval hashes it hits are kept, so memory follows one batch, not the mixture. A 64-bit collision rate of
~n_train x n_eval / 2^64 is negligible (1e9 x 1e6 / 1.8e19 ~ 5e-5 false hits per audit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from flanpipe.core.io import write_json
from flanpipe.data.ingest import read_ingest_report
from flanpipe.data.patterns import Template, parse_pattern
from flanpipe.data.templates import load_templates

if TYPE_CHECKING:
    pass

_HASH_SEED = 0x5EED


def _splitmix64(n: int, seed: int = 0x9E3779B97F4A7C15) -> np.ndarray:
    """``n`` well-mixed odd 64-bit constants (splitmix64)."""
    mask, x, out = (1 << 64) - 1, seed, []
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) | 1)
    return np.array(out, dtype=np.uint64)


_BASE = int(_splitmix64(1)[0])  # odd, fixed: hashes (and reports) are reproducible
_BASE_INV = pow(_BASE, -1, 1 << 64)
_MAX_NGRAM = 64
_BITMAP_BITS = 24  # prefilter: 2^24 flags (16 MiB) on the top bits of the eval hashes


class ContaminationError(RuntimeError):
    """The audit found more contamination than config ``audit`` allows; training must not start."""


@dataclass(frozen=True)
class AuditConfig:
    """Config ``audit``: n-gram sizes and the thresholds that fail a run before training."""

    ngram: int = 13  # words per example-level n-gram (GPT-3's audit used 13)
    template_ngram: int = 6  # words per template-level n-gram
    max_contaminated_fraction: float = 0.5  # fail when a dataset's eval examples are more leaked than this
    max_template_fraction: float = 1.0  # fail when a larger share of a dataset's eval templates was seen
    batch_rows: int = 16_384  # mixture rows hashed at once: ~250 words a row -> ~100 MB of arrays

    def __post_init__(self) -> None:
        if not 1 <= self.ngram <= _MAX_NGRAM or not 1 <= self.template_ngram <= _MAX_NGRAM:
            raise ValueError(
                f"audit n-gram sizes must be in [1, {_MAX_NGRAM}], got {self.ngram} and {self.template_ngram}"
            )
        for name in ("max_contaminated_fraction", "max_template_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"audit.{name} must be in [0, 1], got {getattr(self, name)}")


def normalize(text: pl.Expr) -> pl.Expr:
    """Lowercase, drop punctuation, turn tabs and newlines into spaces: formatting must not hide a leak.

    Runs of spaces are collapsed by ``word_hashes``, which drops the empty words a split leaves; a
    ``\\s+`` -> " " replace here would rewrite every single space and cost 4x the rest of the audit.
    """
    return text.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}\s]+", "").str.replace_all(r"[^\S ]+", " ")


def word_hashes(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word, index of its text) for a Series of texts, words in text order."""
    words = pl.DataFrame({"t": texts}).select(
        w=normalize(pl.col("t").fill_null("")).str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    )["w"]
    counts = words.list.len().to_numpy().astype(np.int64)
    hashes = words.explode().drop_nulls().hash(_HASH_SEED).to_numpy()
    return hashes.astype(np.uint64, copy=False), np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 (numpy's uint64 cumprod wraps, which is the intent)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def ngram_hashes(words: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every n-word window that stays inside one text, and that text's index.

    hash = sum_k words[j + k] x B^k (mod 2^64), from prefix sums G_i = sum_{t<i} words[t] x B^t:
    (G_{j+n} - G_j) x B^-j, where B is odd so B^-1 exists mod 2^64. The cost is a few whole-array passes
    whatever n is (a multiply-add per window position cost 13 passes). ``words`` are grouped by ``doc``
    (non-decreasing); a window is kept when its first and last word belong to the same text.
    """
    m = len(words) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    prefix = np.zeros(len(words) + 1, dtype=np.uint64)
    np.cumsum(words * _powers(_BASE, len(words)), dtype=np.uint64, out=prefix[1:])
    out = (prefix[n:] - prefix[:m]) * _powers(_BASE_INV, m)
    keep = doc[:m] == doc[n - 1 :]
    return out[keep], doc[:m][keep]


class _HashSet:
    """Sorted unique uint64 hashes with a bitmap prefilter: membership of millions of probes per batch."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.sorted = np.unique(hashes)
        self.bitmap = np.zeros(1 << _BITMAP_BITS, dtype=bool)
        self.bitmap[self.sorted >> np.uint64(64 - _BITMAP_BITS)] = True

    def __len__(self) -> int:
        return len(self.sorted)

    def contains(self, probes: np.ndarray) -> np.ndarray:
        hit = self.bitmap[probes >> np.uint64(64 - _BITMAP_BITS)]
        cand = probes[hit]
        if len(cand) and len(self.sorted):
            pos = np.minimum(np.searchsorted(self.sorted, cand), len(self.sorted) - 1)
            hit[hit] = self.sorted[pos] == cand
        return hit


def template_pieces(templates: Sequence[Template]) -> pl.DataFrame:
    """(template_id, turned_around, text) for every literal text piece of each template's patterns."""
    rows = [
        (t.index, t.turned_around, text)
        for t in templates
        for pattern in (t.inputs, t.targets)
        for kind, text in parse_pattern(pattern)
        if kind == "text"
    ]
    schema = {"template_id": pl.Int32, "turned_around": pl.Boolean, "text": pl.Utf8}
    return pl.DataFrame(rows, schema=schema, orient="row")


def eval_examples(canonical: str | os.PathLike[str], max_examples: int | None) -> pl.DataFrame:
    """(example_id, text) for every string field (list fields exploded) of the examples the eval scores.

    The eval shard renders the first ``max_examples`` of each split (flanpipe.data.templates.render_eval).
    """
    lf = pl.scan_parquet(canonical)
    lf = lf.head(max_examples) if max_examples else lf
    schema = lf.collect_schema()
    fields = [c for c, t in schema.items() if c != "example_id" and (t == pl.Utf8 or t == pl.List(pl.Utf8))]
    parts = [
        lf.select("example_id", pl.col(c).alias("text")).explode("text")
        if schema[c] == pl.List(pl.Utf8)
        else lf.select("example_id", pl.col(c).alias("text"))
        for c in fields
    ]
    if not parts:
        return pl.DataFrame(schema={"example_id": pl.Int64, "text": pl.Utf8})
    return pl.concat(parts).with_columns(pl.col("example_id").cast(pl.Int64)).collect()


@dataclass
class _EvalSide:
    """One kind of eval n-grams: hashes with the key (row of ``keys``) each came from."""

    keys: pl.DataFrame
    hashes: np.ndarray
    owner: np.ndarray  # index into keys


def _eval_side(frames: Sequence[pl.DataFrame], key_cols: Sequence[str], n: int) -> _EvalSide:
    """N-grams of the ``text`` column of every frame; a key is one distinct value of ``key_cols``."""
    df = pl.concat([f.select(*key_cols, "text") for f in frames]) if frames else None
    if df is None or df.height == 0:
        empty = pl.DataFrame(schema={c: pl.Utf8 for c in key_cols})
        return _EvalSide(empty, np.empty(0, np.uint64), np.empty(0, np.int64))
    keys = df.select(key_cols).unique(maintain_order=True).with_row_index("_key")
    df = df.join(keys, on=list(key_cols), how="left", maintain_order="left")
    words, doc = word_hashes(df["text"])
    hashes, text_row = ngram_hashes(words, doc, n)
    return _EvalSide(keys.drop("_key"), hashes, df["_key"].to_numpy().astype(np.int64)[text_row])


def scan_training(
    mixture: str | os.PathLike[str],
    example_set: _HashSet,
    template_set: _HashSet,
    cfg: AuditConfig,
) -> dict[str, object]:
    """Stream the mixture once: the eval hashes seen (per kind), and per training dataset its leaking rows."""
    pf = pq.ParquetFile(mixture)
    seen_ex: list[np.ndarray] = []
    seen_tpl: list[np.ndarray] = []
    sources: dict[str, int] = {}
    rows = 0
    for batch in pf.iter_batches(batch_size=cfg.batch_rows, columns=["dataset", "inputs", "targets"]):
        df = pl.from_arrow(batch)
        rows += df.height
        texts = pl.concat([df["inputs"], df["targets"]])
        words, doc = word_hashes(texts)
        hashes, text_row = ngram_hashes(words, doc, cfg.ngram)
        hit = example_set.contains(hashes)
        if hit.any():
            seen_ex.append(np.unique(hashes[hit]))
            names = df["dataset"].to_numpy()[np.unique(text_row[hit] % df.height)]  # leaking rows
            for name, count in zip(*np.unique(names, return_counts=True), strict=True):
                sources[str(name)] = sources.get(str(name), 0) + int(count)
        if len(template_set):
            n_inputs = df.height  # template text is looked for in the prompts only
            keep = doc < n_inputs
            t_hashes, _ = ngram_hashes(words[keep], doc[keep], cfg.template_ngram)
            t_hit = template_set.contains(t_hashes)
            if t_hit.any():
                seen_tpl.append(np.unique(t_hashes[t_hit]))
    return {"rows": rows, "examples": _union(seen_ex), "templates": _union(seen_tpl), "sources": sources}


def _union(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


def _flagged(side: _EvalSide, seen: np.ndarray) -> pl.DataFrame:
    """Per key: n-grams, n-grams seen in training, contaminated (any seen)."""
    hit = np.isin(side.hashes, seen)
    counts = pl.DataFrame({"_key": side.owner, "hit": hit}, schema={"_key": pl.Int64, "hit": pl.Boolean})
    per_key = counts.group_by("_key").agg(ngrams=pl.len(), ngrams_seen=pl.col("hit").sum())
    return (
        side.keys.with_row_index("_key")
        .with_columns(pl.col("_key").cast(pl.Int64))
        .join(per_key, on="_key", how="left")
        .with_columns(pl.col("ngrams").fill_null(0), pl.col("ngrams_seen").fill_null(0).cast(pl.Int64))
        .with_columns(contaminated=pl.col("ngrams_seen") > 0)
        .drop("_key")
    )


def audit_contamination(
    mixture: str | os.PathLike[str],
    eval_splits: Mapping[str, Mapping[str, str | os.PathLike[str]]],
    templates: Mapping[str, Sequence[Template]],
    cfg: AuditConfig = AuditConfig(),
    *,
    max_examples: int | None = None,
) -> dict[str, object]:
    """N-gram overlap of one training mixture with the eval examples and templates of some datasets.

    ``eval_splits``: dataset -> split -> canonical parquet; ``templates``: dataset -> its templates.
    Returns the report (see module docstring): per dataset and split the ids of contaminated examples,
    per dataset the seen templates, and ``passed`` against the thresholds of ``cfg``.
    """
    t0 = time.perf_counter()
    ex_frames = [
        eval_examples(path, max_examples).with_columns(pl.lit(d).alias("dataset"), pl.lit(s).alias("split"))
        for d, splits in eval_splits.items()
        for s, path in splits.items()
    ]
    ex_side = _eval_side(ex_frames, ("dataset", "split", "example_id"), cfg.ngram)
    tpl_frames = [template_pieces(ts).with_columns(pl.lit(d).alias("dataset")) for d, ts in templates.items()]
    tpl_side = _eval_side(tpl_frames, ("dataset", "template_id", "turned_around"), cfg.template_ngram)
    seen = scan_training(mixture, _HashSet(ex_side.hashes), _HashSet(tpl_side.hashes), cfg)
    ex = _flagged(ex_side, seen["examples"])
    tpl = _flagged(tpl_side, seen["templates"])
    # every eval example is a key even when no field is long enough to give an n-gram
    all_ex = pl.concat([f.select("dataset", "split", "example_id").unique() for f in ex_frames]) if ex_frames else None

    datasets: dict[str, object] = {}
    failures: list[str] = []
    for d in eval_splits:
        splits: dict[str, object] = {}
        n_total = n_bad = 0
        for s in eval_splits[d]:
            ids_all = all_ex.filter((pl.col("dataset") == d) & (pl.col("split") == s)) if all_ex is not None else None
            n = ids_all.height if ids_all is not None else 0
            one = ex.filter((pl.col("dataset") == d) & (pl.col("split") == s) & pl.col("contaminated"))
            ids = sorted(one["example_id"].to_list())
            splits[s] = {"examples": n, "contaminated": len(ids), "contaminated_ids": ids}
            n_total, n_bad = n_total + n, n_bad + len(ids)
        t = tpl.filter(pl.col("dataset") == d)
        d_templates = [x.index for x in templates.get(d, [])]
        seen_ids = sorted(t.filter(pl.col("contaminated"))["template_id"].to_list())
        scored = [x.index for x in templates.get(d, []) if not x.turned_around]
        fraction = n_bad / n_total if n_total else 0.0
        tpl_fraction = len(set(seen_ids) & set(scored)) / len(scored) if scored else 0.0
        datasets[d] = {
            "examples": n_total,
            "contaminated": n_bad,
            "contaminated_fraction": fraction,
            "splits": splits,
            "templates": d_templates,
            "templates_checked": sorted(t.filter(pl.col("ngrams") > 0)["template_id"].to_list()),
            "templates_seen": seen_ids,
            "scored_templates_seen_fraction": tpl_fraction,
        }
        if fraction > cfg.max_contaminated_fraction:
            failures.append(f"{d}: {n_bad}/{n_total} eval examples leaked > audit.max_contaminated_fraction")
        if tpl_fraction > cfg.max_template_fraction:
            failures.append(f"{d}: {tpl_fraction:.2f} of its eval templates seen > audit.max_template_fraction")
    seconds = time.perf_counter() - t0
    return {
        "config": asdict(cfg),
        "mixture": str(mixture),
        "mixture_rows": seen["rows"],
        "eval_ngrams": len(ex_side.hashes),
        "template_ngrams": len(tpl_side.hashes),
        "leaking_train_datasets": dict(sorted(seen["sources"].items())),
        "datasets": datasets,
        "failures": failures,
        "passed": not failures,
        "seconds": seconds,
        "examples_per_s": seen["rows"] / seconds if seconds > 0 else None,
    }


def split_hygiene(canonical: Mapping[str, Mapping[str, str | os.PathLike[str]]]) -> dict[str, object]:
    """What ingest counted (flanpipe.data.ingest.split_hygiene, stored in each canonical parquet's footer):
    per dataset and split the exact duplicates inside it and, for train, the rows equal to a validation/test
    row and how many were dropped; plus totals. ``canonical``: dataset -> split -> canonical parquet."""
    per: dict[str, dict[str, object]] = {}
    totals = {"duplicates_within": 0, "train_rows_in_eval": 0, "dropped_from_train": 0, "splits_unknown": 0}
    for d in sorted(canonical):
        for s, path in sorted(canonical[d].items()):
            report = read_ingest_report(path)
            h = report.get("split_hygiene") if report else None
            per.setdefault(d, {})[s] = h
            if h is None:  # written before ingest counted duplicates
                totals["splits_unknown"] += 1
                continue
            totals["duplicates_within"] += int(h["duplicates_within"])
            totals["train_rows_in_eval"] += int(h.get("train_rows_in_eval", 0))
            totals["dropped_from_train"] += int(h.get("dropped_from_train", 0))
    return {"datasets": per, "totals": totals}


def run_audit(
    mixture: str | os.PathLike[str],
    eval_splits: Mapping[str, Mapping[str, str | os.PathLike[str]]],
    template_files: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
    cfg: AuditConfig = AuditConfig(),
    *,
    max_examples: int | None = None,
    train_splits: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, object]:
    """Rule ``audit``: write the report, then raise if it failed (the JSON stays for the reviewer,
    under ``<out>.failed.json``, so the rule's output never exists for a run that must not train).

    ``train_splits``: dataset -> canonical train parquet of the datasets the run trains on; with the eval
    splits, their ingest split-hygiene counts go into the report (``split_hygiene``)."""
    templates = {d: load_templates(p) for d, p in template_files.items()}
    report = audit_contamination(mixture, eval_splits, templates, cfg, max_examples=max_examples)
    canonical: dict[str, dict[str, str | os.PathLike[str]]] = {d: dict(s) for d, s in eval_splits.items()}
    for d, path in (train_splits or {}).items():
        canonical.setdefault(d, {})["train"] = path
    report["split_hygiene"] = split_hygiene(canonical)
    if not report["passed"]:
        write_json(Path(str(out) + ".failed.json"), report)
        raise ContaminationError("contamination audit failed:\n  " + "\n  ".join(report["failures"]))
    write_json(out, report)
    return report
