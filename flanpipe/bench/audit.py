"""``flanpipe bench audit``: the contamination audit on a FLAN-sized mixture, with leaks planted at known rows.

A 1M-example mixture (Zipf text from flanpipe.bench.data's lexicon: ~120-word prompts, ~20-word targets) and
4 held-out datasets x 2 splits x 200 eval examples. ``leaks`` eval examples are copied, whole fields, into
random mixture rows; the audit must find exactly those. The audit runs in a fresh interpreter so its peak
RSS (VmHWM) is its own, not the generator's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flanpipe.bench.data import ENGLISH, ENGLISH_FREQ, field_lengths, make_lexicon

_CHUNK = 65_536
EVAL_DATASETS = ("held_a", "held_b", "held_c", "held_d")


def _write_eval(work: Path, english, rng: np.random.Generator, n: int) -> dict[str, dict[str, str]]:  # noqa: ANN001
    splits: dict[str, dict[str, str]] = {}
    for d in EVAL_DATASETS:
        for s in ("validation", "test"):
            path = work / f"{d}_{s}.parquet"
            table = pa.table(
                {
                    "example_id": pa.array(np.arange(n, dtype=np.int64)),
                    "premise": english.text(rng, field_lengths(rng, 40, n)),
                    "hypothesis": english.text(rng, field_lengths(rng, 15, n)),
                    "answer": pa.array(["yes"] * n),
                }
            )
            pq.write_table(table, path)
            splits.setdefault(d, {})[s] = str(path)
    return splits


def make_workload(work: Path, examples: int, eval_examples: int, leaks: int, seed: int = 0) -> dict[str, Any]:
    """Write the mixture and eval splits; return their paths and the planted (dataset, split, example_id)."""
    rng = np.random.default_rng(seed)
    english = make_lexicon(rng, 50_000, ENGLISH, ENGLISH_FREQ)
    splits = _write_eval(work, english, rng, eval_examples)
    # leaks: an eval example's premise (>= 13 words) pasted into a mixture row's prompt
    tables = {(d, s): pq.read_table(p) for d, sp in splits.items() for s, p in sp.items()}
    candidates = [
        (d, s, int(i)) for (d, s), t in tables.items() for i in np.flatnonzero(pc_word_counts(t["premise"]) >= 13)
    ]
    pick = rng.choice(len(candidates), leaks, replace=False)
    planted = sorted(candidates[k] for k in pick)
    rows = rng.choice(examples, leaks, replace=False)
    leak_text = {int(r): tables[(d, s)]["premise"][i].as_py() for r, (d, s, i) in zip(rows, planted, strict=True)}
    mixture = work / "mixture.parquet"
    writer = None
    for start in range(0, examples, _CHUNK):
        n = min(_CHUNK, examples - start)
        inputs = english.text(rng, field_lengths(rng, 120, n)).to_pylist()
        for r in [r for r in leak_text if start <= r < start + n]:
            inputs[r - start] = f"Read this. {leak_text[r]} Now answer."
        table = pa.table(
            {
                "dataset": pa.array(np.array([f"train{k}" for k in range(8)])[rng.integers(0, 8, n)]),
                "inputs": pa.array(inputs, pa.large_string()),
                "targets": english.text(rng, field_lengths(rng, 20, n)),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(mixture, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=_CHUNK)
    if writer is not None:
        writer.close()
    return {"mixture": str(mixture), "splits": splits, "planted": [list(p) for p in planted]}


def pc_word_counts(texts: pa.ChunkedArray) -> np.ndarray:
    """Words per text (space-separated, as the lexicon writes them)."""
    import pyarrow.compute as pc

    return pc.list_value_length(pc.split_pattern(texts, " ")).to_numpy(zero_copy_only=False)


_CHILD = """
import json, sys, time
from pathlib import Path
from flanpipe.data.contamination import AuditConfig, audit_contamination
w = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = audit_contamination(w["mixture"], w["splits"], {}, AuditConfig(max_contaminated_fraction=1.0))
hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
splits = [(d, s, y) for d, x in r["datasets"].items() for s, y in x["splits"].items()]
found = sorted([d, s, i] for d, s, y in splits for i in y["contaminated_ids"])
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": r["mixture_rows"], "found": found,
                  "peak_rss_mb": hwm / 1024, "eval_ngrams": r["eval_ngrams"]}))
"""


def run_bench(
    examples: int = 1_000_000, eval_examples: int = 200, leaks: int = 25, workdir: Path | None = None
) -> dict[str, Any]:
    """Generate the workload, audit it in a child process, check the planted leaks are found exactly."""
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        w = make_workload(work, examples, eval_examples, leaks)
        gen_s = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(w)], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        mixture_mb = Path(w["mixture"]).stat().st_size / 2**20
    return {
        "examples": r["rows"],
        "eval_examples": eval_examples * 2 * len(EVAL_DATASETS),
        "eval_ngrams": r["eval_ngrams"],
        "mixture_mb_on_disk": round(mixture_mb, 1),
        "generate_s": round(gen_s, 2),
        "audit_s": round(r["seconds"], 2),
        "examples_per_s": round(r["rows"] / r["seconds"]),
        "audit_peak_rss_mb": round(r["peak_rss_mb"], 1),
        "planted": len(w["planted"]),
        "found_exactly_planted": r["found"] == w["planted"],
    }


def format_report(x: dict[str, Any]) -> str:
    return "\n".join(f"{k:<24} {v}" for k, v in x.items())
