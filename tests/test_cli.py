"""The flanpipe CLI: the registry listing and one rule's step run by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dag import ROOT


def flanpipe(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flanpipe.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_tasks_json_reports_flans_62_datasets_in_12_clusters() -> None:
    r = flanpipe("--config", "config/flan137b.yaml", "tasks", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 62 and len({row["cluster"] for row in rows}) == 12
    assert all(row["n_templates"] >= 10 and row["n_turned_around"] <= 3 for row in rows)
    assert {row["name"]: row["loaders"] for row in rows}["anli"] == ["anli_r1", "anli_r2", "anli_r3"]
    assert {"name", "cluster", "n_templates", "n_turned_around", "metric"} <= set(rows[0])
    loaders = json.loads(flanpipe("--config", "config/flan137b.yaml", "tasks", "--json", "--loaders").stdout)
    assert len(loaders) == 65


def test_tasks_json_default_registry() -> None:
    rows = json.loads(flanpipe("tasks", "--json").stdout)
    assert len(rows) == 12 and all(row["n_templates"] >= 3 for row in rows)
    assert {row["name"]: row["metric"] for row in rows}["synth_sst"] == "accuracy"


def test_cli_step_by_hand_and_clear_errors(tmp_path: Path) -> None:
    r = flanpipe("generate-synthetic", "synth_sst", "--out", str(tmp_path / "raw"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "raw" / "train.jsonl").exists()
    r = flanpipe("mix", "heldout_nope", "--out-dir", str(tmp_path / "m"))
    assert r.returncode == 2 and "unknown run 'heldout_nope'" in r.stderr and "Traceback" not in r.stderr


def test_bench_dag_counts_planned_jobs() -> None:
    from flanpipe.bench.dag import time_dry_run

    result = time_dry_run(ROOT / "config" / "config.yaml", ["all"], repeats=1)
    jobs = result["jobs_per_rule"]
    # 12 datasets: every one is rendered for training; 3 runs (base + 2 held-out) are trained.
    assert jobs["render_shard"] == 24 and jobs["train"] == 3 and jobs["report"] == 1
    assert result["jobs"] == sum(jobs.values()) and result["dry_run_s"] > 0
