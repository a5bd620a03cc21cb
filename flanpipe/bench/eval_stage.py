"""``flanpipe bench eval-stage RESULTS_DIR``: the evaluation stage's cost in a finished DAG run.

Reads Snakemake's per-job benchmark TSVs (``benchmarks/{rule}/**.tsv``, column ``s``) so that the stage's
figure (issue: "28 jobs, ~280 s of 735 s") is reproducible from any run directory, old layout (one job per
dataset) or new (one job per cluster). Every evaluate job loads its model once (evaluate_many /
run_evaluation), so model loads = evaluate jobs; datasets scored counts the result JSONs the report reads.

Measured 2026-12-05 on the shared 2-core machine, default DAG (`snakemake --cores 2 --profile profiles/local`):
1017b9b (one job per dataset): 24 jobs, 268.0 s summed, DAG wall 367 s (load 1.9 at start, 1.6 at end);
f00191c (one job per cluster): 12 jobs, 131.6 s / 126.6 s summed, DAG wall 227 s / 228 s (two runs, load
0.0 -> 2.1 and 0.6 -> 2.4). Same 24 results, same metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl


def _bench_seconds(root: Path) -> pl.DataFrame:
    """One row per benchmark TSV under ``root/benchmarks``: rule (first directory) and wall seconds."""
    files = sorted((root / "benchmarks").rglob("*.tsv"))
    if not files:
        raise FileNotFoundError(f"no benchmark TSVs under {root / 'benchmarks'}: is {root} a finished run?")
    rules = [f.relative_to(root / "benchmarks").parts[0] for f in files]
    frames = [pl.scan_csv(f, separator="\t").select(pl.col("s").cast(pl.Float64)) for f in files]
    secs = pl.concat(frames).collect()["s"]
    return pl.DataFrame({"rule": rules, "s": secs})


def _job_cpu(root: Path) -> dict[str, float] | None:
    """Summed CPU seconds (start, checks, load, scoring) over the evaluate jobs' logged
    ``evaluate.job_cpu_line``s, and the fixed share: (start + load) / all; None for a run that predates them."""
    from flanpipe.eval.evaluate import JOB_CPU_PREFIX

    lines = [
        line.split(JOB_CPU_PREFIX, 1)[1].split()
        for log in sorted((root / "logs" / "evaluate").rglob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if JOB_CPU_PREFIX in line
    ]
    if not lines:
        return None
    sums = {k: round(sum(float(w[w.index(k) + 1]) for w in lines), 2) for k in ("start", "checks", "load", "scoring")}
    total = sum(sums.values())
    return {"jobs": len(lines), **sums, "start_and_load_share": round((sums["start"] + sums["load"]) / total, 3)}


def eval_stage(root: Path) -> dict[str, Any]:
    """Job count, summed and mean seconds of ``evaluate`` (and of every rule, for the share), model loads,
    and datasets scored for the run in ``root``."""
    root = Path(root)
    df = _bench_seconds(root)
    per_rule = df.lazy().group_by("rule").agg(jobs=pl.len(), s=pl.col("s").sum()).sort("s", descending=True).collect()
    ev = per_rule.filter(pl.col("rule") == "evaluate")
    jobs, secs = (ev["jobs"][0], ev["s"][0]) if ev.height else (0, 0.0)
    return {
        "run_dir": str(root),
        "evaluate_jobs": int(jobs),
        "evaluate_s": round(float(secs), 1),
        "evaluate_mean_s": round(float(secs) / jobs, 2) if jobs else None,
        "model_loads": int(jobs),
        "datasets_scored": len(list((root / "results" / "eval").rglob("*.json"))),
        "all_jobs": df.height,
        "all_jobs_s": round(float(df["s"].sum()), 1),
        "per_rule_s": {r["rule"]: round(r["s"], 1) for r in per_rule.iter_rows(named=True)},
        "evaluate_cpu_s": _job_cpu(root),
    }


def main(root: Path, as_json: bool = False) -> None:
    """Print the stage's figures (``--json``: one object)."""
    r = eval_stage(root)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"{r['run_dir']}: evaluate {r['evaluate_jobs']} jobs ({r['model_loads']} model loads), "
        f"{r['evaluate_s']} s summed ({r['evaluate_mean_s']} s/job), {r['datasets_scored']} results; "
        f"all {r['all_jobs']} jobs {r['all_jobs_s']} s summed"
    )
    if cpu := r["evaluate_cpu_s"]:
        print(
            f"evaluate CPU s over {cpu['jobs']} jobs: start (interpreter, imports) {cpu['start']}, checks "
            f"{cpu['checks']}, load {cpu['load']}, scoring {cpu['scoring']}; start + load = "
            f"{100 * cpu['start_and_load_share']:.0f}% of it"
        )
