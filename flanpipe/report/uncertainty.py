"""Rule ``uncertainty``: intervals, clean-subset scores and tuned-vs-base tests for every evaluation.

Kept beside flanpipe.report.tables (not inside it) so the summary tables stay as they are; this writes
``results/uncertainty.{json,md}`` from the same evaluation JSONs and record metadata the report reads, plus
the contamination audits (flanpipe.data.contamination) of the runs that were trained here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from flanpipe.core.io import read_json, write_json
from flanpipe.core.rerun import version_record
from flanpipe.report.stats import DEFAULT_BOOTSTRAP, dataset_uncertainty, paired_comparison, score_matrix


def excluded_ids(audit: Mapping | None, dataset: str) -> dict[str, list[int]]:
    """split -> contaminated eval example ids of ``dataset`` in a run's audit (none without an audit)."""
    if not audit or dataset not in audit.get("datasets", {}):
        return {}
    return {s: v["contaminated_ids"] for s, v in audit["datasets"][dataset]["splits"].items()}


def uncertainty_report(
    results: Sequence[Mapping],
    meta: Sequence[Mapping],
    audits: Mapping[str, Mapping],
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, object]:
    """Per evaluation: intervals on all examples and on the clean subset; per held-out cluster and
    variant: the paired tuned-vs-base comparison. ``meta[i]`` describes ``results[i]`` (run, variant,
    held_out, role) as rules/common.smk's report_meta does; ``audits``: run -> audit report."""
    rows, pairs = [], {}
    for r, m in zip(results, meta, strict=True):
        if "per_example" not in r:
            continue  # an evaluation from before per-example scores: nothing to resample
        excl = excluded_ids(audits.get(m["run"]), r["dataset"])
        row = {**{k: m[k] for k in ("run", "variant", "held_out", "role")}, "dataset": r["dataset"]}
        row["all"] = dataset_uncertainty(r, n_boot, seed)
        n_excl = sum(len(v) for v in excl.values())
        row["contaminated_excluded"] = n_excl
        row["clean"] = dataset_uncertainty(r, n_boot, seed, exclude=excl) if n_excl else None
        rows.append(row)
        key = (m["held_out"], m["variant"])
        pairs.setdefault(key, {}).setdefault(m["role"], {})[r["dataset"]] = score_matrix(r, "test")
    comparisons = []
    for (cluster, variant), by_role in sorted(pairs.items()):
        if "tuned" in by_role and "base" in by_role and set(by_role["tuned"]) & set(by_role["base"]):
            res = paired_comparison(by_role["tuned"], by_role["base"], n_boot, seed)
            comparisons.append({"held_out": cluster, "variant": variant, **res})
    return {"n_boot": n_boot, "seed": seed, "evaluations": rows, "tuned_vs_base": comparisons}


def _ci(x: Mapping | None) -> str:
    return "–" if x is None else f"{x['estimate']:.1f} [{x['lo']:.1f}, {x['hi']:.1f}]"


def format_markdown(report: Mapping) -> str:
    """Two tables: per evaluation (95% intervals, template spread, clean subset), then tuned vs base."""
    lines = [
        "# Uncertainty",
        "",
        f"95% bootstrap intervals over examples ({report['n_boot']} replicates, seed {report['seed']}).",
        "",
        "| held-out | dataset | run | variant | mean over templates | best-dev template | template min–max | "
        "clean mean (excluded) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["evaluations"]:
        a, sp = r["all"], r["all"]["spread"]
        spread = "–" if sp["min"] is None else f"{sp['min']:.1f}–{sp['max']:.1f}"
        clean = "–" if r["clean"] is None else f"{_ci(r['clean']['mean'])} ({r['contaminated_excluded']})"
        best = f"t{a['best_dev']['template']}: {_ci(a['best_dev'])}"
        lines.append(
            f"| {r['held_out']} | {r['dataset']} | {r['run']} | {r['variant']} | {_ci(a['mean'])} | {best} | "
            f"{spread} | {clean} |"
        )
    lines += [
        "",
        "## Tuned vs base (same examples)",
        "",
        "| held-out | variant | tuned − base | p (paired bootstrap) | sign test: wins/losses/ties, p |",
        "|---|---|---|---|---|",
    ]
    for c in report["tuned_vs_base"]:
        st = c["sign_test"]
        lines.append(
            f"| {c['held_out']} | {c['variant']} | {c['difference']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}] | "
            f"{c['p_value_bootstrap']:.3g} | {st['wins']}/{st['losses']}/{st['ties']}, {st['p_value']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def write_uncertainty(
    result_paths: Sequence[str | os.PathLike[str]],
    meta: Sequence[Mapping],
    audit_paths: Mapping[str, str | os.PathLike[str]],
    out_json: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, object]:
    """Rule ``uncertainty``: read evaluations and audits, write the JSON and the markdown tables."""
    results = [read_json(p) for p in result_paths]
    audits = {run: read_json(p) for run, p in audit_paths.items()}
    report = uncertainty_report(results, meta, audits, n_boot, seed)
    write_json(out_json, {**report, **version_record("uncertainty")})
    Path(out_md).write_text(format_markdown(report))
    return report
