"""Render speed of the two template kinds, rows/s, on the same HellaSwag-shaped rows.

The ``{field}`` pattern kind is a Polars column expression; the Jinja kind (promptsource verbatim) renders
row by row in the guarded sandbox. Both render the same text (a context, four numbered endings, the gold
ending), so the ratio is the price of keeping a P3 template verbatim.

    flanpipe bench templates --rows 200000 --json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.templates import load_validated, render_train

PATTERN = 'templates:\n  - inputs: "{ctx}\\nHow does it end?\\n\\n{options_}"\n    targets: "{answer}"\n'
JINJA = (
    "templates:\n"
    "  - kind: jinja\n"
    "    name: bench\n"
    '    jinja: "{{ ctx }}\\nHow does it end?\\n\\nOPTIONS:{% for e in endings %}\\n- {{ e }}{% endfor %}'
    ' ||| {{ answer_choices[label] }}"\n'
    "    answer_choices: \"{{ endings | join(' ||| ') }}\"\n"
    "    label: label\n"
)


def _rows(n: int, seed: int = 0) -> pl.DataFrame:
    """Invented words; four endings per row, the gold one by a seeded draw."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(5000)])
    ctx = [" ".join(words[rng.integers(0, 5000, 30)]) for _ in range(min(n, 1000))]
    endings = [[" ".join(words[rng.integers(0, 5000, 8)]) for _ in range(4)] for _ in range(min(n, 1000))]
    gold = rng.integers(0, 4, n)
    idx = np.arange(n) % len(ctx)
    return pl.DataFrame(
        {
            "example_id": np.arange(n),
            "ctx": [ctx[i] for i in idx],
            "endings": [endings[i] for i in idx],
            "answer": [endings[i][g] for i, g in zip(idx, gold, strict=True)],
        }
    )


def _spec(path: Path) -> DatasetSpec:
    return DatasetSpec(
        name="bench_hellaswag",
        cluster="commonsense",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"ctx": "ctx", "endings": "endings", "answer": "label"},
        metric="accuracy",
        templates=path,
        options_field="endings",
    )


def bench_templates(rows: int = 100_000) -> dict[str, object]:
    """rows/s of render_train (collected, not written) under one pattern template and one Jinja template."""
    df = _rows(rows)
    out: dict[str, object] = {"rows": rows}
    texts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, text in (("pattern", PATTERN), ("jinja", JINJA)):
            path = Path(tmp) / f"{kind}.yaml"
            path.write_text(text, encoding="utf-8")
            spec = _spec(path)
            chosen = load_validated(spec)
            t0 = time.perf_counter()
            shard = render_train(df.lazy(), spec, chosen).collect()
            seconds = time.perf_counter() - t0
            out[f"{kind}_rows_per_s"] = round(rows / seconds)
            texts[kind] = shard["inputs"].head(100).to_list()
    out["same_text"] = texts["pattern"] == texts["jinja"]
    out["pattern_over_jinja"] = round(out["pattern_rows_per_s"] / out["jinja_rows_per_s"], 1)  # type: ignore[operator]
    return out


def main(rows: int, as_json: bool) -> None:
    result = bench_templates(rows)
    print(json.dumps(result, indent=2) if as_json else "  ".join(f"{k}={v}" for k, v in result.items()))
