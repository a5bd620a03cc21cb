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

from flanpipe.core.io import PROJECT_ROOT


def count_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> planned jobs, from Snakemake's "Job stats" table."""
    table = dry_run_output.split("Job stats:", 1)[-1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE) if m[1] != "total"}


def time_dry_run(configfile: Path, targets: list[str], repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` wall and CPU time of ``snakemake -n`` (the process, imports included)."""
    import resource

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    times, cpu = [], []
    out = ""
    with tempfile.TemporaryDirectory() as work:
        for _ in range(repeats):
            cmd = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"), "--directory", work,
                   "--configfile", str(configfile), "-n", "--", *targets]  # fmt: skip
            t0, c0 = time.perf_counter(), children_cpu()
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - t0)
            cpu.append(children_cpu() - c0)  # CPU seconds: what a busy shared machine does not inflate
            out = r.stdout + r.stderr
            if r.returncode != 0:
                raise ValueError(f"dry run of {configfile} failed:\n{out[-3000:]}")
    jobs = count_jobs(out)
    return {"config": str(configfile), "targets": targets, "dry_run_s": min(times), "all_s": times, "cpu_s": min(cpu),
            "jobs": sum(jobs.values()), "jobs_per_rule": jobs}  # fmt: skip


HEAVY_MODULES = ("torch", "megatron")
FLAN_CONFIG = PROJECT_ROOT / "config" / "flan137b.yaml"
FIXTURE_MIRROR = PROJECT_ROOT / "tests" / "fixtures" / "flan"  # every FLAN source as a small local file
TARGET_S = {"config.yaml": 3.0, "flan137b.yaml": 4.0}


def heavy_imports(importtime_log: str, modules: tuple[str, ...] = HEAVY_MODULES) -> list[str]:
    """Top-level packages among ``modules`` that ``python -X importtime`` saw imported."""
    seen = {m[1].split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)\s*$", importtime_log, re.M)}
    return sorted(seen & set(modules))


def planning_imports(configfile: Path, targets: list[str]) -> list[str]:
    """torch / Megatron modules a dry run imports (should be none: planning needs only flanpipe's
    torch-free layers; a 4 s Megatron import would triple the planning time)."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-X", "importtime", "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"),
               "--directory", work, "--configfile", str(configfile), "-n", "--", *targets]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return heavy_imports(r.stderr)


def mirrored_flan_config(directory: Path) -> Path:
    """config/flan137b.yaml with data.local_mirror = the test fixtures (no download), as a file of its
    own (a nested --config would replace the whole ``data`` mapping)."""
    import yaml

    from flanpipe.core.io import read_yaml

    raw = read_yaml(FLAN_CONFIG)
    raw["data"] = {**(raw.get("data") or {}), "local_mirror": str(FIXTURE_MIRROR)}
    path = directory / "flan137b.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def main(config: str | None, targets: list[str], as_json: bool) -> None:
    """Time the dry run of ``config``, or (None) of the default and of flan137b on the fixture mirror."""
    with tempfile.TemporaryDirectory() as tmp:
        configs = [Path(config).resolve()] if config else [PROJECT_ROOT / "config" / "config.yaml"]
        if config is None and FIXTURE_MIRROR.is_dir():
            configs.append(mirrored_flan_config(Path(tmp)))
        results = []
        for path in configs:
            result = time_dry_run(path, targets or ["all"])
            result["heavy_imports"] = planning_imports(path, targets or ["all"])
            result["target_s"] = TARGET_S.get(path.name)
            results.append(result)
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for r in results:
        target = f" (target <= {r['target_s']:g} s)" if r["target_s"] else ""
        imports = ", ".join(r["heavy_imports"]) or "neither torch nor Megatron"
        print(f"{Path(r['config']).name}: {r['jobs']} jobs planned in {r['dry_run_s']:.2f} s (best of 3){target}, "
              f"{r['cpu_s']:.2f} s CPU; "
              f"imports {imports}")  # fmt: skip
