"""The committed SLURM profile, run against a real slurmctld (tests/slurm_cluster.py).

What this proves that a dry run cannot: the sbatch flags profiles/slurm/config.yaml produces are accepted
(partitions, --gpus with --ntasks-per-gpu, --ntasks, --mem, -t), job status is polled with squeue on a
cluster without slurmdbd (sacct fails here, as it does on many clusters), and training runs as a 2-task
``srun`` job whose ranks find each other from SLURM's variables alone (flanpipe.train.launch).

How the committed profile meets a 2-core test machine, unedited: the harness names its partitions after
the ones the profile names (so a site that renames them still tests its own file), declares GPUs backed by
empty files, and ``fit_profile`` shrinks only sizes (CPUs per task, memory, GPU and rank counts) to what
the node has. Executor, status polling, account, partitions, mpi=srun and retries are used as committed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dag import ROOT, SNAKEMAKE
from slurm_cluster import SlurmCluster, SlurmUnavailable

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
TEST_CONFIG = ROOT / "tests" / "config" / "slurm.yaml"
RANKS = 2  # training ranks on the test node (DP=2 with tests/config/slurm.yaml's TP=PP=1)
MEM_MB = 2500  # per job: two concurrent jobs fit any CI machine


def fit_profile(profile: dict[str, Any], *, ranks: int = RANKS, mem_mb: int = MEM_MB) -> dict[str, Any]:
    """The profile with every request shrunk to a 2-CPU, ``ranks``-GPU node; nothing else changed."""
    out = json.loads(json.dumps(profile))  # deep copy
    tables = [out.get("default-resources", {}), *out.get("set-resources", {}).values()]
    for res in tables:
        if "cpus_per_task" in res:
            res["cpus_per_task"] = 1
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], mem_mb)
        for key in ("gpu", "tasks"):
            if key in res:
                res[key] = min(res[key], ranks)
    return out


def profile_partitions(profile: dict[str, Any]) -> tuple[str, ...]:
    """Partition names the profile uses, its default first (the harness's default partition)."""
    names = [profile.get("default-resources", {}).get("slurm_partition", "debug")]
    for res in profile.get("set-resources", {}).values():
        if "slurm_partition" in res and res["slurm_partition"] not in names:
            names.append(res["slurm_partition"])
    return tuple(names)


def failed_rule_logs(work: Path) -> str:
    """Tails of the rule logs that hold a traceback or an error, to make a CI failure readable."""
    tails = []
    for log in sorted((work / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "error" in text.lower():
            tails.append(f"\n--- {log.relative_to(work)}\n{text[-2000:]}")
    return "".join(tails) + "\n"


@pytest.fixture(scope="module")  # module: tests/test_slurm_nodes.py starts its own cluster, after this one stops
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    profile = yaml.safe_load(PROFILE.read_text())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), partitions=profile_partitions(profile), gpus=RANKS)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"no test SLURM cluster: {e}")
    except BaseException:
        cluster.stop()
        raise
    print(f"\nSLURM cluster up in {cluster.startup_s:.1f} s (partitions {', '.join(cluster.partitions)})")
    yield cluster
    cluster.stop()


def test_fit_profile_only_shrinks_sizes() -> None:
    profile = yaml.safe_load(PROFILE.read_text())
    fitted = fit_profile(profile)
    assert fitted["set-resources"]["train"]["mpi"] == "srun"
    assert fitted["set-resources"]["train"]["tasks"] == fitted["set-resources"]["train"]["gpu"] == RANKS
    assert fitted["slurm-status-command"] == "squeue"
    strip = {"cpus_per_task", "mem_mb", "gpu", "tasks"}

    def rest(p: dict[str, Any]) -> Any:
        tables = {"default": p["default-resources"], **p["set-resources"]}
        return {k: {r: v for r, v in t.items() if r not in strip} for k, t in tables.items()}

    assert rest(fitted) == rest(profile)
    assert {k: v for k, v in fitted.items() if "resources" not in k} == {
        k: v for k, v in profile.items() if "resources" not in k
    }


def test_profile_resolves(tmp_path: Path) -> None:
    """``--profile slurm`` from the repository root, by path, and by name once installed in ~/.config.

    (``--profile NAME`` searches the working directory, then ~/.config/snakemake and /etc/xdg/snakemake;
    the repository root holds a ``slurm`` link to profiles/slurm so the plain name works from there.)
    """
    xdg = tmp_path / "xdg"
    (xdg / "snakemake").mkdir(parents=True)
    (xdg / "snakemake" / "slurm").symlink_to(PROFILE.parent)
    cases = (
        ("slurm", {}),  # the repository root's `slurm` link to profiles/slurm: `snakemake --profile slurm`
        ("profiles/slurm", {}),
        ("slurm", {"XDG_CONFIG_HOME": str(xdg)}),
        ("profiles/local", {}),
    )
    for name, extra_env in cases:
        r = subprocess.run(
            [SNAKEMAKE, "--profile", name, "--dry-run", "--quiet", "all"],
            cwd=ROOT,
            env={**os.environ, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"Using profile {name} " in r.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_default_dag_under_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    work = tmp_path / "run"
    shutil.copytree(ROOT / "config", work / "config")
    shutil.copy(TEST_CONFIG, work / "config" / "config.yaml")
    (work / "slurm").mkdir()  # `--profile slurm` finds it by name in the working directory
    fitted = fit_profile(yaml.safe_load(PROFILE.read_text()))
    (work / "slurm" / "config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))

    env = slurm_cluster.env
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # jobs inherit it (sbatch --export=ALL)
    t0 = time.perf_counter()
    r = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--profile", "slurm"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a status check that never sees jobs finish would otherwise hang CI
        check=False,
    )
    elapsed = time.perf_counter() - t0
    print(f"DAG under SLURM: {elapsed:.0f} s")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:] + failed_rule_logs(work) + slurm_cluster.logs()

    summary = json.loads((work / "results" / "summary.json").read_text())
    assert summary
    # Every job but the local rules (printed as "localrule NAME:") went through sbatch.
    remote_jobs = len(re.findall(r"^rule \w+:$", out, flags=re.MULTILINE))
    assert out.count("has been submitted with SLURM jobid") >= remote_jobs >= 10, out[-3000:]
    # Status came from squeue: this cluster has no accounting, so sacct cannot answer at all.
    assert "Falling back to 'sacct'" not in out
    sacct = subprocess.run(["sacct", "-n"], env=env, capture_output=True, text=True, check=False)
    assert sacct.returncode != 0 or not sacct.stdout.strip(), "expected a cluster without accounting"
    # Training: two srun tasks, DP=2, per run, on the profile's GPU partition.
    train_logs = sorted((work / "logs" / "train").glob("*.log"))
    assert train_logs
    for train_log in train_logs:
        log = train_log.read_text()
        assert f"srun -n {RANKS} " in log
        for rank in range(RANKS):
            assert f"rank {rank}/{RANKS} " in log, log[-3000:]
        done = json.loads((work / "results" / "models" / train_log.stem / "done.json").read_text())
        assert done["world_size"] == RANKS and done["data_parallel_size"] == RANKS
    gpu_partition = fitted["set-resources"]["train"]["slurm_partition"]
    assert f"Partition={gpu_partition}" in (slurm_cluster.root / "log" / "slurmctld.log").read_text()
