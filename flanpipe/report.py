"""Report: per held-out cluster, per dataset, the score under each template, the mean over templates
and the best-dev-template score, as JSON (for machines) and Markdown (for people)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flanpipe.io import atomic_path, read_json, write_json


def summarize(results: Sequence[Mapping[str, Any]], mixture_of: Mapping[str, str]) -> dict[str, Any]:
    """Group per-dataset eval results by held-out cluster and average them like the paper does."""
    clusters: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r["cluster"], r["dataset"])):
        c = clusters.setdefault(r["cluster"], {"mixture": mixture_of[r["dataset"]], "datasets": []})
        c["datasets"].append(dict(r))
    for c in clusters.values():
        c["average_mean"] = statistics.fmean(d["mean"] for d in c["datasets"])
        c["average_best_dev"] = statistics.fmean(d["best_dev_test"] for d in c["datasets"])
    return {
        "clusters": clusters,
        "held_out_average": statistics.fmean(c["average_mean"] for c in clusters.values()) if clusters else None,
    }


def markdown(summary: Mapping[str, Any]) -> str:
    lines = ["# flanpipe results", "", "Zero-shot scores on held-out clusters (test split; metric in 0-100).", ""]
    for cluster, c in summary["clusters"].items():
        lines += [f"## Held out: {cluster} (model `{c['mixture']}`)", ""]
        width = max(len(d["per_template"]) for d in c["datasets"])
        head = ["dataset", "metric"] + [f"t{i}" for i in range(width)] + ["mean ± std", "best dev template"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in c["datasets"]:
            scores = [f"{t['test']:.1f}" for t in d["per_template"]] + [""] * (width - len(d["per_template"]))
            best = f"t{d['best_dev_template']}: {d['best_dev_test']:.1f}"
            row = [d["dataset"], d["metric"], *scores, f"{d['mean']:.1f} ± {d['std']:.1f}", best]
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            f"Cluster average: mean over templates {c['average_mean']:.1f}, "
            f"best dev template {c['average_best_dev']:.1f}",
            "",
        ]
    if summary.get("held_out_average") is not None:
        lines.append(f"**Average over held-out clusters: {summary['held_out_average']:.1f}**")
    return "\n".join(lines) + "\n"


def write_report(
    result_paths: Sequence[str | os.PathLike[str]], out_json: str | os.PathLike[str], out_md: str | os.PathLike[str]
) -> dict[str, Any]:
    """Read ``results/eval/<mixture>/<dataset>.json`` files and write the summaries."""
    results = [read_json(p) for p in result_paths]
    mixture_of = {r["dataset"]: Path(p).parent.name for r, p in zip(results, result_paths, strict=True)}
    summary = summarize(results, mixture_of)
    write_json(out_json, summary)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown(summary), encoding="utf-8")
    return summary
