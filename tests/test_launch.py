"""flanpipe.train.launch without SLURM: the argv it builds and the SLURM -> torch.distributed env mapping."""

from __future__ import annotations

import json
import sys

import pytest

from flanpipe import cli
from flanpipe.train.launch import first_host, launch_command, master_port, tasks_on_node, torch_env_from_slurm

TRAIN_ARGS = ["--spec", "s.json", "--data", "packed", "--out", "model"]


def test_workstation_command_is_torchrun() -> None:
    assert launch_command(TRAIN_ARGS, 4) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "4",
        "-m",
        "flanpipe.train.loop",
        *TRAIN_ARGS,
    ]
    assert launch_command(TRAIN_ARGS, 2, mpi="  ")[2] == "torch.distributed.run"  # blank = no mpi
    # one rank: the module itself (it makes its own 1-process group), no torchrun agent
    assert launch_command(TRAIN_ARGS, 1) == [sys.executable, "-m", "flanpipe.train.loop", *TRAIN_ARGS]


def test_mpi_command_runs_one_worker_per_task() -> None:
    cmd = launch_command(TRAIN_ARGS, 8, mpi="srun --cpu-bind=cores")
    worker = [sys.executable, "-m", "flanpipe.train.launch", "worker", *TRAIN_ARGS]
    assert cmd == ["srun", "--cpu-bind=cores", "-n", "8", *worker]
    with pytest.raises(ValueError, match="nproc"):
        launch_command(TRAIN_ARGS, 0)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("vm", "vm"),
        ("node[01-04,07],gpu5", "node01"),
        ("gpu5,node[1-2]", "gpu5"),
        ("rack[2-3]-n[010-012]", "rack2-n010"),
        ("a[7,3]", "a7"),
        ("c1.cluster.org", "c1.cluster.org"),
    ],
)
def test_first_host_parses_slurm_hostlists(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_first_host_rejects_empty() -> None:
    with pytest.raises(ValueError):
        first_host("")


def test_tasks_on_node_expands_repeat_counts() -> None:
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(ValueError):
        tasks_on_node("2x3", 0)


def test_master_port_is_stable_per_job_and_in_range() -> None:
    assert master_port("123456") == master_port("123456") == 15000 + 3456
    assert all(15000 <= master_port(str(j)) < 25000 for j in (0, 1, 9999, 10000, 987654321))
    assert master_port("41") != master_port("42")


SRUN_TASK = {  # what srun sets for rank 5 of 8, two tasks per node, on the third node
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_NODELIST": "gpu[03-06]",
    "SLURM_JOB_NODELIST": "gpu[01-09]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
    "SLURM_CPUS_PER_TASK": "8",
}


def test_torch_env_from_slurm() -> None:
    env = torch_env_from_slurm(SRUN_TASK, resolve_host=first_host)
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu03",  # the step's first node, where rank 0 runs
        "MASTER_PORT": str(15000 + 4242),
        "OMP_NUM_THREADS": "8",
    }


def test_torch_env_from_slurm_keeps_explicit_master_and_falls_back() -> None:
    task = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_CPUS_PER_TASK")}
    env = torch_env_from_slurm({**task, "MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "6000"}, resolve_host=first_host)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["OMP_NUM_THREADS"]) == ("ib-gpu01", "6000", "1")
    assert torch_env_from_slurm(task, resolve_host=first_host)["MASTER_ADDR"] == "gpu01"  # job nodelist


def test_torch_env_from_slurm_outside_srun_fails_loudly() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        torch_env_from_slurm({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})


def test_cli_launch_and_train_call_the_same_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(
        "flanpipe.train.launch.launch",
        lambda args, nproc, mpi="", threads=None: calls.append((args, nproc, mpi, threads)) or 0,
    )
    monkeypatch.setattr("flanpipe.core.threads.limit_threads", lambda n: n)  # keep this test process's pools
    for argv in (
        ["launch", "--mpi", "srun", "--nproc", "2", "--", *TRAIN_ARGS],
        ["train", "--spec", "s.json", "--data", "packed", "--out", "model", "--nproc", "2", "--mpi", "srun"],
        ["--threads", "4", "launch", "--nproc", "2", "--", *TRAIN_ARGS],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
    (train_args, *rest) = calls.pop(1)  # `flanpipe train` adds rule train's --ops, for its 2 ranks
    assert train_args[:-2] == TRAIN_ARGS and train_args[-2] == "--ops" and rest == [2, "srun", None]
    assert json.loads(train_args[-1])["micro_batch_size"] == 4  # the default's 8 rows over DP 2
    assert calls == [(TRAIN_ARGS, 2, "srun", None), (TRAIN_ARGS, 2, "", 4)]


@pytest.mark.parametrize(
    ("job", "ranks", "per_rank"),
    [(2, 1, 2), (2, 2, 1), (8, 2, 4), (8, 3, 2), (2, 4, 1), (1, 1, 1)],
)
def test_threads_per_rank_splits_the_job(job: int, ranks: int, per_rank: int) -> None:
    from flanpipe.core.threads import threads_per_rank

    assert threads_per_rank(job, ranks) == per_rank


def test_rank_threads_env_follows_the_job_not_a_fixed_one() -> None:
    from flanpipe.train.launch import rank_threads_env

    # Snakemake sets OMP_NUM_THREADS to the rule's threads in every shell job: 2 threads, 1 rank -> 2
    assert rank_threads_env(1, env={"OMP_NUM_THREADS": "2"}) == {"OMP_NUM_THREADS": "2"}
    assert rank_threads_env(2, env={"OMP_NUM_THREADS": "8"}) == {"OMP_NUM_THREADS": "4"}
    assert rank_threads_env(2, threads=6, env={"OMP_NUM_THREADS": "8"}) == {"OMP_NUM_THREADS": "3"}  # --threads wins
    # srun spreads 8 ranks over 2 nodes: 4 local ranks share this node's 16 threads
    assert rank_threads_env(8, "srun", threads=16, env={"SLURM_JOB_NUM_NODES": "2"}) == {"OMP_NUM_THREADS": "4"}
    # nothing said: the CPUs this process may use, split over the ranks
    import os

    cpus = len(os.sched_getaffinity(0))
    assert rank_threads_env(1, env={}) == {"OMP_NUM_THREADS": str(cpus)}


def test_launch_passes_the_rank_threads_to_the_ranks(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The env the ranks start with carries threads = job threads / ranks (torchrun keeps a set value)."""
    import subprocess

    from flanpipe.train import launch as launch_mod

    seen = {}

    class FakeProc:
        def __init__(self, cmd, env):
            seen.update(cmd=cmd, env=env)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    args = ["--spec", "s.json", "--data", "d", "--out", str(tmp_path / "m")]
    assert launch_mod.launch(args, 2) == 0
    assert seen["env"]["OMP_NUM_THREADS"] == "1" and "--nproc_per_node" in seen["cmd"]
    assert launch_mod.launch(args, 1) == 0
    assert seen["env"]["OMP_NUM_THREADS"] == "2"


def test_srun_task_threads_are_slurms_cpus_per_task() -> None:
    """Under srun the CPUs SLURM bound to the task win over a job-wide OMP_NUM_THREADS."""
    env = torch_env_from_slurm({**SRUN_TASK, "OMP_NUM_THREADS": "64"}, resolve_host=first_host)
    assert env["OMP_NUM_THREADS"] == "8"


def test_ckpt_dir_of_train_args() -> None:
    """Where the launcher looks for the preempted marker: --ckpt-dir, else flanpipe.train.loop's default."""
    from pathlib import Path

    from flanpipe.model.checkpointing import default_ckpt_dir
    from flanpipe.train.launch import ckpt_dir_of

    args = ["--spec", "s.json", "--data", "d", "--out", "results/models/run"]
    assert ckpt_dir_of(args) == default_ckpt_dir("results/models/run") == Path("results/models/run.ckpt").absolute()
    assert ckpt_dir_of([*args, "--ckpt-dir", "/scratch/run.ckpt"]) == Path("/scratch/run.ckpt")
