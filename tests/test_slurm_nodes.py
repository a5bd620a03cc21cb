"""One run across two hosts: `snakemake --profile slurm` on a two-node SLURM whose hosts are network namespaces.

tests/slurm_cluster.py (``hosts=2``) gives each host its own network stack, address, hostname and slurmd;
slurmctld, munged and the scratch directory (the shared filesystem holding ``results/``) are shared. The
committed profile runs unedited but for sizes (test_slurm.fit_profile, plus ``nodes: 2``). What this proves:

- ranks on different hosts find each other from the allocation alone (flanpipe.train.launch: rendezvous
  host, port, and the interface gloo binds, which is each host's own link, never loopback: loopback is
  per namespace, so a collective between the hosts can only have crossed the bridge);
- data parallelism across hosts and the pipeline split across hosts (PP 2, one stage per host) train the
  same losses and bitwise the same weights as the same layout on one host (torchrun, 1 thread per rank);
- evaluation at PP 2 across the hosts writes the same result file as at TP 1 x PP 1 in one process;
- a rank killed mid-run fails the job within seconds; a crashed host (link cut, then its slurmd,
  slurmstepd and rank killed) makes the surviving rank fail at flanpipe's collective timeout (set short
  here; torch's default is 30 minutes); either way Snakemake's retry resumes from the last checkpoint, no
  checkpoint is left half written, and the finished run equals the uninterrupted one bit for bit;
- a host's slurmd killed alone ends no job step (each step runs under its own slurmstepd).

What it cannot prove: anything about GPUs, NCCL or InfiniBand (gloo over a veth bridge on one CPU machine),
real network latency, several ranks per host, or a node that never comes back (the retry needs both
hosts, so the crashed one returns, as a quickly rebooted node would; a real cluster schedules the retry
elsewhere, and a node that stays dead is SLURM's to declare, after its SlurmdTimeout, and requeue).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dag import ROOT, SNAKEMAKE
from slurm_cluster import SlurmCluster, SlurmUnavailable, TestHost
from test_slurm import PROFILE, failed_rule_logs, fit_profile, profile_partitions

CONFIG = ROOT / "tests" / "config" / "slurm_nodes.yaml"
RUN = "heldout_sentiment"  # the config's one trained run
HOSTS = 2
RANKS = 2  # one per host: DP 2 at TP = PP = 1, or PP 2 with one stage per host
COLLECTIVE_TIMEOUT_S = 20  # FLANPIPE_COLLECTIVE_TIMEOUT_S in every job here (flanpipe's default is 600)
EVAL_FILE = f"results/eval/{RUN}/natural/synth_sst.json"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    profile = yaml.safe_load(PROFILE.read_text())
    c = SlurmCluster(
        tmp_path_factory.mktemp("slurm2"),
        partitions=profile_partitions(profile),
        gpus=1,  # per host: --gpus 2 --ntasks-per-gpu 1 puts one rank on each
        hosts=HOSTS,
        # A crashed host that comes back: srun, its step ended by the surviving rank's failure, waits up to
        # KillWait + 2 s for the lost host's step before the job ends (35 s after the host returned at
        # SLURM's 30, 10 s at 5: measured with sleep tasks on these hosts, load ~1)
        kill_wait_s=5,
    )
    try:
        c.start()
    except SlurmUnavailable as e:
        c.stop()
        pytest.skip(f"no two-host test SLURM cluster: {e}")
    except BaseException:
        c.stop()
        raise
    print(f"\ntwo-host SLURM cluster up in {c.startup_s:.1f} s: " + ", ".join(f"{h.name} {h.addr}" for h in c.nodes))
    yield c
    c.stop()


def two_node_profile(**evaluate: Any) -> dict[str, Any]:
    """The committed profile, sizes shrunk to the test hosts, training on both (``nodes: 2``); ``evaluate``
    entries are added to the evaluate table (for srun-started evaluation across the hosts)."""
    fitted = fit_profile(yaml.safe_load(PROFILE.read_text()), ranks=RANKS)
    fitted["set-resources"]["train"]["nodes"] = HOSTS
    fitted["set-resources"]["evaluate"].update(evaluate)
    return fitted


def write_work(work: Path, config: dict[str, Any], profile: dict[str, Any]) -> None:
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "slurm").mkdir(exist_ok=True)  # `--profile slurm` finds it by name in the working directory
    (work / "slurm" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory whose data stages (everything before training) ran on this machine: the tests
    below then send only training and evaluation through SLURM, the jobs that span hosts."""
    work = tmp_path_factory.mktemp("nodes") / "prepared"
    shutil.copytree(ROOT / "config", work / "config")
    write_work(work, yaml.safe_load(CONFIG.read_text()), two_node_profile())
    r = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--profile", str(ROOT / "profiles" / "local"), "--cores", "2"]
        + ["--omit-from", "train", "all"],
        cwd=work,
        env=venv(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return work


def copy_work(src: Path, dst: Path) -> Path:
    """A copy of a working directory, modification times and Snakemake's records kept (nothing reruns)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def venv(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """The environment snakemake submits from: jobs inherit it (sbatch --export=ALL), and srun's tasks too."""
    return {**venv(cluster.env), "FLANPIPE_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}


_BACKGROUND: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_snakemake_left() -> Iterator[None]:
    """A test that fails while its snakemake runs leaves none behind: it would outlive the cluster, polling
    daemons that are gone (three were found still running after the host-crash test had failed)."""
    yield
    while _BACKGROUND:
        proc = _BACKGROUND.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def snakemake_slurm(cluster: SlurmCluster, work: Path, *targets: str) -> subprocess.Popen[str]:
    """`snakemake --profile slurm TARGETS` in ``work``, in the background; output in work/snakemake.out."""
    out = open(work / "snakemake.out", "w")  # noqa: SIM115 (closed by finish())
    proc = subprocess.Popen(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--profile", "slurm", *targets],
        cwd=work,
        env=job_env(cluster),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _BACKGROUND.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], cluster: SlurmCluster, work: Path, timeout_s: float = 900) -> str:
    """Wait for snakemake; its output, asserted successful (with the rule logs and daemon logs if not)."""
    try:
        proc.wait(timeout=timeout_s)  # a status check that never sees jobs finish would otherwise hang CI
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = (work / "snakemake.out").read_text()
    assert proc.returncode == 0, out[-5000:] + failed_rule_logs(work) + cluster.logs()
    return out


def one_host(work: Path, spec: Path, out: Path, nproc: int = RANKS) -> Path:
    """The same training on one host: ``flanpipe train`` (torchrun, loopback), 1 thread per rank like the
    SLURM ranks here (CPUs per task = 1), so the reduction order is the same."""
    env = {**venv(os.environ), "OMP_NUM_THREADS": "1"}
    cmd = [
        "flanpipe",
        "--config",  # the run's config: its operational keys (micro-batch) reach train as --ops, as in the rule
        str(work / "config" / "config.yaml"),
        "--threads",
        str(nproc),
        "train",
        "--spec",
        str(spec),
        "--data",
        str(work / "results" / "packed" / RUN),
    ]
    r = subprocess.run(
        [*cmd, "--out", str(out), "--nproc", str(nproc)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def weights(model_dir: Path) -> dict[str, Any]:
    from test_checkpoint import weights as load

    return load(model_dir)


def assert_same_training(got: Path, want: Path) -> None:
    """Same logged losses and bitwise the same final weights."""
    import torch

    log, ref = ([json.loads(x) for x in (p / "train_log.jsonl").read_text().splitlines()] for p in (got, want))
    assert [(r["step"], r["loss"]) for r in log] == [(r["step"], r["loss"]) for r in ref]
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    assert [k for k in b if not torch.equal(a[k], b[k])] == []


def assert_ranks_on_hosts(log: str, cluster: SlurmCluster) -> None:
    """Each host ran one rank, bound to its own link (its address), and gloo never fell back to loopback."""
    for rank, h in enumerate(cluster.nodes):
        assert f"rank {rank}/{RANKS} (local 0, 1 threads) on {h.name}, master {cluster.nodes[0].name}:" in log, log[
            -3000:
        ]
        assert f"gloo on {h.link} ({h.addr})" in log, log[-3000:]
    assert "loopback address as fallback" not in log


def model_dir(work: Path) -> Path:
    return work / "results" / "models" / RUN


# --------------------------------------------------------------------------- DP across hosts


@pytest.fixture(scope="module")
def dp_run(cluster: SlurmCluster, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run trained by 2 ranks on 2 hosts (DP 2), and evaluated on one dataset, from the prepared data."""
    work = copy_work(prepared, tmp_path_factory.mktemp("dp") / "work")
    t0 = time.perf_counter()
    out = finish(snakemake_slurm(cluster, work, EVAL_FILE), cluster, work)
    print(f"DP 2 across 2 hosts, train + evaluate under SLURM: {time.perf_counter() - t0:.0f} s")
    assert "rule pack:" not in out  # the prepared data stages did not rerun
    return work


@pytest.mark.slurm
@pytest.mark.slow
def test_dp_across_two_hosts_equals_one_host(dp_run: Path, cluster: SlurmCluster, tmp_path: Path) -> None:
    log = (dp_run / "logs" / "train" / f"{RUN}.log").read_text()
    assert_ranks_on_hosts(log, cluster)
    done = json.loads((model_dir(dp_run) / "done.json").read_text())
    assert (done["world_size"], done["data_parallel_size"], done["resumed_from_step"]) == (RANKS, RANKS, 0)
    assert (dp_run / EVAL_FILE).exists()
    ref = one_host(dp_run, dp_run / "results" / "specs" / f"{RUN}.json", tmp_path / "one_host")
    assert_same_training(model_dir(dp_run), ref)


# --------------------------------------------------------------------------- evaluation at PP 2 across hosts


@pytest.mark.slurm
@pytest.mark.slow
def test_eval_pp2_across_two_hosts_equals_tp1_pp1(dp_run: Path, cluster: SlurmCluster, tmp_path: Path) -> None:
    work = copy_work(dp_run, tmp_path / "work")
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["eval"]["layout"] = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    write_work(work, config, two_node_profile(tasks=RANKS, gpu=RANKS, nodes=HOSTS, mpi="srun"))
    # The layout changes how evaluate runs, not what it writes (ARCH.md, the rerun contract): it alone reruns
    # nothing, so evaluate is forced here to score again at PP 2.
    out = finish(snakemake_slurm(cluster, work, EVAL_FILE, "--forcerun", "evaluate"), cluster, work)
    assert "rule evaluate:" in out and "rule train:" not in out  # only evaluation reran
    log = (work / "logs" / "evaluate" / RUN / "sentiment.log").read_text()
    assert_ranks_on_hosts(log, cluster)
    got, want = (json.loads((w / EVAL_FILE).read_text()) for w in (work, dp_run))
    got.pop("examples_per_s"), want.pop("examples_per_s")  # timing, the one field that differs
    assert got == want


# --------------------------------------------------------------------------- PP 2 across hosts


@pytest.mark.slurm
@pytest.mark.slow
def test_pp2_across_two_hosts_equals_one_host(cluster: SlurmCluster, prepared: Path, tmp_path: Path) -> None:
    """One pipeline stage per host: activations and gradients cross the bridge every micro-batch."""
    work = copy_work(prepared, tmp_path / "work")
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["train"]["pipeline_model_parallel_size"] = 2
    write_work(work, config, two_node_profile())
    finish(snakemake_slurm(cluster, work, f"results/models/{RUN}"), cluster, work)
    assert_ranks_on_hosts((work / "logs" / "train" / f"{RUN}.log").read_text(), cluster)
    done = json.loads((model_dir(work) / "done.json").read_text())
    assert (done["pipeline_model_parallel_size"], done["data_parallel_size"]) == (2, 1)
    ref = one_host(work, work / "results" / "specs" / f"{RUN}.json", tmp_path / "one_host")
    assert_same_training(model_dir(work), ref)


# --------------------------------------------------------------------------- faults


def first_checkpoint(work: Path, proc: subprocess.Popen[str], timeout_s: float = 600) -> str:
    """Wait until training has saved its first periodic checkpoint; return its name."""
    latest = work / "results" / "models" / f"{RUN}.ckpt" / "latest"
    deadline = time.monotonic() + timeout_s
    while not latest.exists():
        assert proc.poll() is None, (work / "snakemake.out").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint saved in time"
        time.sleep(0.05)
    name = latest.read_text().strip()
    assert not (model_dir(work) / "done.json").exists(), "training finished before the fault"
    return name


def rank_pid(cluster: SlurmCluster, h: TestHost) -> int:
    """The training rank on host ``h``: among the processes of its namespace, the srun task's python."""
    for pid in cluster.host_pids(h):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"flanpipe.train.launch" in argv and b"worker" in argv:
            return pid
    raise AssertionError(f"no training rank on {h.name}")


def train_jobs(work: Path) -> list[str]:
    """SLURM job ids of rule train, in submission order, from snakemake's output."""
    out, ids, in_train = (work / "snakemake.out").read_text(), [], False
    for line in out.splitlines():
        if line.startswith("rule ") or line.startswith("localrule "):
            in_train = line.strip() == "rule train:"
        if in_train and "has been submitted with SLURM jobid" in line:
            ids.append(line.split("SLURM jobid")[1].split()[0])
    return ids


def job_state(cluster: SlurmCluster, job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=cluster.env, capture_output=True, text=True)
    return r.stdout.strip()


def assert_whole_checkpoints(work: Path) -> None:
    """Every checkpoint on the shared directory is complete; ``latest`` names one (a save interrupted mid-way
    is only ever a ``.tmp`` directory, which no reader takes and the next save removes)."""
    from flanpipe.model.checkpointing import _complete

    ckpt = work / "results" / "models" / f"{RUN}.ckpt"
    named = [p for p in ckpt.glob("iter_*") if not p.name.endswith(".tmp")]
    assert named and all(_complete(p) for p in named), sorted(p.name for p in ckpt.iterdir())
    assert _complete(ckpt / (ckpt / "latest").read_text().strip())


def assert_resumed_equal(work: Path, dp_run: Path, out: str) -> None:
    assert_same_training(model_dir(work), model_dir(dp_run))
    done = json.loads((model_dir(work) / "done.json").read_text())
    assert done["resumed_from_step"] > 0, done
    assert "resuming from iter_" in (work / "logs" / "train" / f"{RUN}.log").read_text()
    assert_whole_checkpoints(work)
    assert not list((model_dir(work).parent / f"{RUN}.ckpt").glob("*.tmp")), "a half-written save was left"


def finish_after_one_retry(
    proc: subprocess.Popen[str], cluster: SlurmCluster, work: Path, dp_run: Path, first_job: str
) -> None:
    """The run ends after one failed attempt (``first_job``) and one retry, equal to the uninterrupted run."""
    out = finish(proc, cluster, work)
    jobs = train_jobs(work)
    assert len(jobs) == 2 and jobs[0] == first_job, out[-3000:]  # one failed attempt, one retry
    assert_resumed_equal(work, dp_run, out)


@pytest.mark.slurm
@pytest.mark.slow
def test_rank_lost_fails_the_job_fast_and_the_retry_resumes(
    dp_run: Path, cluster: SlurmCluster, prepared: Path, tmp_path: Path
) -> None:
    """SIGKILL the rank on the second host once a checkpoint exists: the other rank's collective fails, srun
    ends the step, the job fails, and Snakemake's retry (the profile's retries: 1) resumes from the checkpoint."""
    work = copy_work(prepared, tmp_path / "work")
    proc = snakemake_slurm(cluster, work, f"results/models/{RUN}")
    ckpt = first_checkpoint(work, proc)
    victim, first_job = rank_pid(cluster, cluster.nodes[1]), train_jobs(work)[0]
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while job_state(cluster, first_job) in ("RUNNING", "COMPLETING", "CONFIGURING"):
        time.sleep(0.2)
        assert time.monotonic() - t_kill < 300, "the job outlived its lost rank by 5 minutes"
    ended_s = time.monotonic() - t_kill
    print(f"rank on {cluster.nodes[1].name} killed after {ckpt}: job {first_job} ended {ended_s:.1f} s later")
    assert ended_s < COLLECTIVE_TIMEOUT_S + 15  # the collective fails (or times out) and srun ends the step
    finish_after_one_retry(proc, cluster, work, dp_run, first_job)


@pytest.mark.slurm
@pytest.mark.slow
def test_host_crash_fails_the_job_at_the_collective_timeout_and_the_retry_resumes(
    dp_run: Path, cluster: SlurmCluster, prepared: Path, tmp_path: Path
) -> None:
    """Crash the second host once a checkpoint exists: its link goes down and everything on it (slurmd, its
    slurmstepd, its rank) is killed, so no FIN or RST ever reaches the first host. Its rank waits in a
    collective for a peer that is silent, and fails at flanpipe's collective timeout (20 s here, not torch's
    30 minutes). The host then comes back, as a quickly rebooted node would: srun learns its task is gone,
    the job fails, and Snakemake's retry resumes from the last checkpoint.

    Had the host stayed away, srun would have waited for it until slurmctld marked it DOWN (SlurmdTimeout,
    300 s by default) and SLURM requeued the job, which resumes the same way once nodes are free (the
    profile's slurm-requeue keeps the executor from also submitting a copy); that path is SLURM's own and
    slow to show here, so this test does not wait for it."""
    work = copy_work(prepared, tmp_path / "work")
    log = work / "logs" / "train" / f"{RUN}.log"
    proc = snakemake_slurm(cluster, work, f"results/models/{RUN}")
    ckpt = first_checkpoint(work, proc)
    lost, first_job = cluster.nodes[1], train_jobs(work)[0]
    t_cut = time.monotonic()
    killed = cluster.crash(lost)
    while "Timed out waiting" not in log.read_text(errors="replace"):
        assert time.monotonic() - t_cut < COLLECTIVE_TIMEOUT_S + 60, log.read_text()[-3000:]
        time.sleep(0.2)
    timed_out_s = time.monotonic() - t_cut
    assert job_state(cluster, first_job) in ("RUNNING", "COMPLETING")  # still waiting for the lost host
    assert_whole_checkpoints(work)  # what the lost job left on the shared directory
    cluster.reboot(lost)
    while job_state(cluster, first_job) in ("RUNNING", "COMPLETING", "CONFIGURING"):
        assert time.monotonic() - t_cut < 300, f"the job did not end once the host was back\n{cluster.logs()}"
        time.sleep(0.2)
    ended_s = time.monotonic() - t_cut
    print(
        f"{lost.name} crashed after {ckpt} ({len(killed)} processes): the other rank's collective timed out "
        f"{timed_out_s:.1f} s later; the host back, job {first_job} ended at {ended_s:.1f} s"
    )
    assert timed_out_s < COLLECTIVE_TIMEOUT_S + 10  # the collective that was in flight, plus one step
    finish_after_one_retry(proc, cluster, work, dp_run, first_job)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_hosts_slurmd_killed_alone_ends_no_job_step(cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGKILL the second host's slurmd while a two-host step runs: the step runs to its end (each step has
    its own slurmstepd, which reports to srun and slurmctld itself) and srun exits 0; with the slurmd back
    the job ends and the host is schedulable. (So a slurmd kill is no node loss; the crash test above is.)"""
    lost = cluster.nodes[1]
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun -n 2 --ntasks-per-node 1 bash -c 'sleep 6; echo \"task $SLURM_PROCID on $(hostname) done\"'\n"
        'echo "srun exit $?"\n'
    )
    r = subprocess.run(
        ["sbatch", "-N", str(HOSTS), "-n", str(RANKS), "-o", str(out), str(script)],
        env=cluster.env,
        capture_output=True,
        text=True,
        check=True,
    )
    job, deadline = r.stdout.split()[-1], time.monotonic() + 120
    while not any(
        Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
        for pid in cluster.host_pids(lost)
    ):  # the step's task runs on the host
        assert time.monotonic() < deadline, f"job {job}: no task on {lost.name}\n{cluster.logs()}"
        time.sleep(0.1)
    cluster.kill_slurmd(lost)
    while "srun exit" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, f"job {job}: srun did not end\n{cluster.logs()}"
        time.sleep(0.2)
    said = out.read_text()
    assert "srun exit 0" in said and all(f"task {i} on {h.name} done" in said for i, h in enumerate(cluster.nodes))
    cluster.start_slurmd(lost)
    while job_state(cluster, job):
        assert time.monotonic() < deadline, f"job {job} did not end once slurmd was back: {job_state(cluster, job)}"
        time.sleep(0.2)
    cluster.wait_node_state(lost, ("idle", "mix", "alloc"))


# --------------------------------------------------------------------------- plan and profile agree


def test_plan_and_profile_agree_on_nodes_and_tasks(tmp_path: Path) -> None:
    """`flanpipe plan` prints the train table the two-host profile carries, the DAG accepts it, and refuses
    (before any job) a table whose ranks do not fill the nodes evenly."""
    r = subprocess.run(
        ["flanpipe", "plan", "--model", "tiny", "--gpus", str(RANKS), "--gpus-per-node", "1", "--json"]
        + ["--seq-length", "256", "--batch-tokens", "1024"],  # the config: 4 rows of 256 tokens,
        cwd=ROOT,
        env=venv(os.environ),
        capture_output=True,
        text=True,
        check=True,
    )
    slurm = json.loads(r.stdout)["slurm"]
    train = two_node_profile()["set-resources"]["train"]
    assert {k: train[k] for k in ("nodes", "tasks", "gpu")} == {k: slurm[k] for k in ("nodes", "tasks", "gpu")}
    assert slurm == {"nodes": HOSTS, "tasks": RANKS, "gpu": RANKS, "ranks_per_node": 1}

    def dry_run(profile: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        work = tmp_path / f"dry{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ROOT / "config", work / "config")
        write_work(work, yaml.safe_load(CONFIG.read_text()), profile)
        cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--profile", "slurm", "--dry-run", "--quiet"]
        return subprocess.run(cmd, cwd=work, env=venv(os.environ), capture_output=True, text=True, check=False)

    assert dry_run(two_node_profile()).returncode == 0
    uneven = two_node_profile()
    uneven["set-resources"]["train"]["nodes"] = 3  # 2 ranks on 3 nodes
    r = dry_run(uneven)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "set-resources train: tasks=2, nodes=3: 2 ranks do not fill 3 nodes evenly" in said
    assert "Building DAG of jobs" not in said  # refused while planning, before any job


# --------------------------------------------------------------------------- the harness itself (no daemons)


def test_two_host_conf_names_each_host_and_its_address(tmp_path: Path) -> None:
    from slurm_cluster import hosts_file, slurm_conf

    hosts = [TestHost("node1", "10.213.0.2", "ns1", "h1", "p1"), TestHost("node2", "10.213.0.3", "ns2", "h2", "p2")]
    conf = slurm_conf(
        tmp_path, ("vm", "10.213.0.1"), hosts, cpus=2, real_memory_mb=1000, partitions=("cpu", "gpu"), gpus=1,
        ctld_port=1, slurmd_port=2, slurmd_timeout_s=30, cred_expire_s=10, kill_wait_s=5,
    )  # fmt: skip
    assert "SlurmctldHost=vm(10.213.0.1)" in conf and "SlurmdTimeout=30" in conf and "cred_expire=10" in conf
    assert "KillWait=5" in conf
    for h in hosts:
        assert f"NodeName={h.name} NodeAddr={h.addr} NodeHostname={h.name} CPUs=2 RealMemory=1000 Gres=gpu:1" in conf
    assert "PartitionName=gpu Nodes=node1,node2 Default=NO" in conf
    assert f"SlurmdPidFile={tmp_path}/run/slurmd.%n.pid" in conf  # one pid file per host: stop() finds each
    assert hosts_file(("vm", "10.213.0.1"), hosts).splitlines() == [
        "127.0.0.1 localhost",
        "10.213.0.1 vm",
        "10.213.0.2 node1",
        "10.213.0.3 node2",
    ]


def test_clean_up_touches_only_what_the_records_name(tmp_path: Path) -> None:
    """A recorded daemon is stopped; a recorded pid that now runs another program is left alone; links and
    namespaces are removed only under the recorded names (none exist here), and the records go last."""
    from slurm_cluster import remove_recorded

    mine = subprocess.Popen(["sleep", "300"])
    other = subprocess.Popen(["sleep", "300"])
    try:
        for p in (mine, other):  # Popen returns at fork: until exec the child's /proc comm is python's
            deadline = time.monotonic() + 10
            while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
                time.sleep(0.01)
        records = tmp_path / "records.json"
        records.write_text(
            json.dumps(
                {
                    "daemons": [f"{mine.pid} sleep", f"{other.pid} munged"],  # other's pid reused by a non-munged
                    "links": ["fpnonexist0"],
                    "netns": ["flanpipe-nonexistent-node1"],
                }
            )
        )
        assert remove_recorded(records) == [f"sleep {mine.pid}"]
        assert mine.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None and not records.exists()
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()
