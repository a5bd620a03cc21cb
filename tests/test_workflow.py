"""The real DAG, end to end, on a small generated config in a temporary directory (minutes on 2 cores)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest
from dag import ROOT, run_snakemake

CONFIG = ROOT / "tests" / "config" / "workflow.yaml"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_snakemake(workdir, CONFIG, "--cores", "2", *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("dag")
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_dag_outputs_and_loss_falls(run_dir: Path) -> None:
    summary = json.loads((run_dir / "results/summary.json").read_text())
    (nli,) = summary["clusters"].values()
    assert list(nli["datasets"]) == ["synth_nli_rte"]
    assert "| synth_nli_rte | accuracy |" in (run_dir / "results/summary.md").read_text()
    assert (run_dir / "results/figures/summary.png").read_bytes()[:4] == b"\x89PNG"
    for run, fall in (("base-tiny", 0.9), ("heldout_nli", 0.5)):  # 20 pretraining steps; 200 tuning steps
        log = [
            json.loads(line) for line in (run_dir / f"results/models/{run}/train_log.jsonl").read_text().splitlines()
        ]
        assert log[-1]["loss"] < fall * log[0]["loss"], (run, log[0]["loss"], log[-1]["loss"])
    spec = json.loads((run_dir / "results/specs/heldout_nli.json").read_text())
    assert spec["train"]["init_checkpoint"] == "results/models/base-tiny"  # tuned from the base
    for variant in ("natural", "natural-noopts", "natural-1shot"):  # base baselines, zero- and few-shot
        assert (run_dir / f"results/eval/base-tiny/{variant}/synth_nli_rte.json").exists()
    packing = json.loads((run_dir / "results/packed/heldout_nli/packing.json").read_text())
    assert packing["packing_efficiency"] > 0.95
    assert not list(run_dir.rglob("*.tmp*")), "no temp files left behind"
    assert (run_dir / "logs/train/heldout_nli.log").exists() and (run_dir / "benchmarks/train/heldout_nli.tsv").exists()


@pytest.mark.slow
def test_training_measures_something(run_dir: Path) -> None:
    """heldout_nli was tuned on synth_sst only: scored on synth_sst it must be far above chance (50%).

    Any (model, variant, dataset) evaluation is a target of the same DAG, outside the plan's own list.
    """
    targets = [f"results/eval/{run}/natural/synth_sst.json" for run in ("heldout_nli", "base-tiny")]
    done = snakemake(run_dir, *targets)
    assert done.returncode == 0, done.stderr[-3000:]
    tuned, base = (json.loads((run_dir / t).read_text())["mean"] for t in targets)
    assert tuned >= 85.0, f"tuned synth_sst accuracy {tuned:.1f}% (chance 50%)"
    assert tuned > base + 25.0, (tuned, base)


@pytest.mark.slow
def test_rerun_is_a_no_op_and_report_renders(run_dir: Path) -> None:
    dry = snakemake(run_dir, "-n", "all")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr
    report = snakemake(run_dir, "--report", str(run_dir / "report.html"))
    assert report.returncode == 0, report.stderr[-3000:]
    html = (run_dir / "report.html").read_text(errors="replace")
    assert "summary.png" in html and len(html) > 50_000
    # summary.md rides in the HTML as a base64 data URI: its new columns must be there
    start = html.index('"results/summary.md"')
    md = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", html[start:]).group(1)).decode()
    assert "| model / prompt | mean over templates [95% interval] | clean subset |" in md, md[:2000]
    assert "Intervals on averages: 95% bootstrap, 2000 replicates" in md and "; clean " in md
    assert "](figures/summary.png)" in md
