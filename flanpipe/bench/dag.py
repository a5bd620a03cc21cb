"""``flanpipe bench dag``: how long Snakemake takes to plan an experiment (a dry run).

Users re-plan after every template edit, and a SLURM run re-plans on every restart, so planning the
full FLAN config (65 loaders, 6 held-out runs, every shard) must stay cheap: target < 5 s here.
The dry run starts in an empty directory, so every job is planned, as on a first run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flanpipe.io import PROJECT_ROOT


def count_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> planned jobs, from Snakemake's "Job stats" table."""
    table = dry_run_output.split("Job stats:", 1)[-1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE) if m[1] != "total"}


def time_dry_run(configfile: Path, targets: list[str], repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` wall time of ``snakemake -n`` (the process, imports included)."""
    times = []
    out = ""
    with tempfile.TemporaryDirectory() as work:
        for _ in range(repeats):
            cmd = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"), "--directory", work,
                   "--configfile", str(configfile), "-n", "--", *targets]  # fmt: skip
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - t0)
            out = r.stdout + r.stderr
            if r.returncode != 0:
                raise ValueError(f"dry run of {configfile} failed:\n{out[-3000:]}")
    jobs = count_jobs(out)
    return {"config": str(configfile), "targets": targets, "dry_run_s": min(times), "all_s": times,
            "jobs": sum(jobs.values()), "jobs_per_rule": jobs}  # fmt: skip


def main(config: str, targets: list[str], as_json: bool) -> None:
    result = time_dry_run(Path(config).resolve(), targets or ["all"])
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['config']}: {result['jobs']} jobs planned in {result['dry_run_s']:.2f} s (best of 3)")
