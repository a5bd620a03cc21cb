"""flanpipe bench eval-stage: sums a finished run's evaluate benchmarks (Snakemake's TSV layout)."""

from pathlib import Path

import pytest

from flanpipe.bench.eval_stage import eval_stage

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(root: Path, rel: str, s: float) -> None:
    p = root / "benchmarks" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(HEADER + f"{s}\t0:00:01\t1\t1\t1\t1\t0\t0\t0\t{s}\n")


def test_eval_stage_sums_evaluate_jobs_only(tmp_path: Path) -> None:
    _bench(tmp_path, "evaluate/base/zs/nli.tsv", 4.5)
    _bench(tmp_path, "evaluate/heldout_nli/zs/qa.tsv", 5.5)
    _bench(tmp_path, "eval_result/base/zs/anli.tsv", 0.25)
    _bench(tmp_path, "train/base.tsv", 30.0)
    for d in ("anli", "rte", "boolq"):
        (tmp_path / "results" / "eval" / "base" / "zs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / "eval" / "base" / "zs" / f"{d}.json").write_text("{}")
    r = eval_stage(tmp_path)
    assert (r["evaluate_jobs"], r["evaluate_s"], r["model_loads"], r["datasets_scored"]) == (2, 10.0, 2, 3)
    assert r["all_jobs"] == 4 and r["all_jobs_s"] == pytest.approx(40.2, abs=0.1)
    assert r["per_rule_s"]["train"] == 30.0
    assert r["evaluate_cpu_s"] is None  # a run from before the jobs logged their CPU split


def test_eval_stage_reads_the_jobs_cpu_split_from_their_logs(tmp_path: Path) -> None:
    """The fixed share is (start + load) / all CPU over the logged evaluate jobs (rank 0's line each)."""
    from flanpipe.eval.evaluate import job_cpu_line

    _bench(tmp_path, "evaluate/base/nli.tsv", 4.5)
    for job, cpu in (("base/nli", (1.5, 0.25, 0.5, 6.0)), ("heldout_nli/nli", (1.5, 0.25, 0.5, 2.0))):
        log = tmp_path / "logs" / "evaluate" / f"{job}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"a warning\n{job_cpu_line(*cpu)}\n")
    cpu = eval_stage(tmp_path)["evaluate_cpu_s"]
    assert cpu == {"jobs": 2, "start": 3.0, "checks": 0.5, "load": 1.0, "scoring": 8.0, "start_and_load_share": 0.32}


def test_eval_stage_names_a_dir_without_benchmarks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no benchmark TSVs"):
        eval_stage(tmp_path)
