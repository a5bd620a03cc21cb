"""flanpipe.train.launch without SLURM: the argv it builds, the SLURM -> torch.distributed env mapping (rendezvous
host, port, network interface) and the collective timeout. tests/test_slurm_nodes.py runs the same across two hosts."""

from __future__ import annotations

import json
import sys

import pytest

from flanpipe import cli
from flanpipe.core.threads import pool_env
from flanpipe.train.launch import (
    collective_timeout_s,
    first_host,
    ipv4_interfaces,
    launch_command,
    master_port,
    port_range,
    socket_interface,
    tasks_on_node,
    torch_env_from_slurm,
)

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
    # srun ends the step at the first failed rank (the others would wait in a collective for it)
    assert cmd == ["srun", "--cpu-bind=cores", "-n", "8", "--kill-on-bad-exit=1", *worker]
    assert launch_command(TRAIN_ARGS, 8, mpi="srun -K0")[:3] == ["srun", "-K0", "-n"]  # the site's choice stays
    assert "--kill-on-bad-exit=1" not in launch_command(TRAIN_ARGS, 2, mpi="/opt/slurm/bin/srun --kill-on-bad-exit=0")
    assert launch_command(TRAIN_ARGS, 2, mpi="mpirun")[:3] == ["mpirun", "-n", "2"]  # srun's flag is srun's alone
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
    assert master_port("123456", (40000, 40099)) == 40056  # a site's port range: 40000 + 123456 mod 100


def test_port_range_from_the_site() -> None:
    assert port_range({}) == (15000, 24999)
    assert port_range({"FLANPIPE_PORT_RANGE": "40000-40099"}) == (40000, 40099)
    for bad in ("40000", "99-200", "30000-20000", "40000-70000"):
        with pytest.raises(ValueError, match="FLANPIPE_PORT_RANGE"):
            port_range({"FLANPIPE_PORT_RANGE": bad})


def test_collective_timeout_defaults_to_ten_minutes_and_the_site_sets_it() -> None:
    assert collective_timeout_s({}) == 600.0
    assert collective_timeout_s({"FLANPIPE_COLLECTIVE_TIMEOUT_S": "20"}) == 20.0
    for bad in ("0", "-5", "ten"):
        with pytest.raises(ValueError, match="FLANPIPE_COLLECTIVE_TIMEOUT_S"):
            collective_timeout_s({"FLANPIPE_COLLECTIVE_TIMEOUT_S": bad})


HOST_IFACES = {"lo": "127.0.0.1", "eno1": "10.1.0.7", "ib0": "192.168.5.7"}


def test_socket_interface_is_the_one_the_master_is_reached_through() -> None:
    route = {"10.1.0.3": "10.1.0.7", "192.168.5.3": "192.168.5.7", "127.0.1.1": "127.0.0.1"}
    hosts = {"gpu03": "10.1.0.3", "gpu03-ib": "192.168.5.3", "gpu07": "10.1.0.7", "bad": "127.0.1.1"}

    def pick(master: str, nodes: int) -> tuple[str, str]:
        return socket_interface(
            master, nodes, resolve=hosts.__getitem__, source=route.get, interfaces=lambda: HOST_IFACES
        )

    assert pick("gpu03", 2) == ("eno1", "10.1.0.7")
    assert pick("gpu03-ib", 4) == ("ib0", "192.168.5.7")  # a site naming its IB host in MASTER_ADDR
    assert pick("bad", 1) == ("lo", "127.0.0.1")  # one node: loopback is right
    with pytest.raises(ValueError, match="loopback"):  # Debian's `127.0.1.1 gpu03`, with other nodes waiting
        pick("bad", 2)
    route["10.1.0.3"] = "10.9.9.9"  # no interface holds the source address
    with pytest.raises(ValueError, match="FLANPIPE_SOCKET_IFNAME"):
        pick("gpu03", 2)


def test_launch_help_lists_what_a_site_may_set(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    out = capsys.readouterr().out
    for name in ("MASTER_ADDR", "FLANPIPE_PORT_RANGE", "FLANPIPE_SOCKET_IFNAME", "FLANPIPE_COLLECTIVE_TIMEOUT_S"):
        assert f"  {name}: " in out


def test_ipv4_interfaces_sees_loopback() -> None:
    assert ipv4_interfaces().get("lo") == "127.0.0.1"


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


def eth0(master: str, nodes: int) -> tuple[str, str]:
    """socket_interface stand-in: every node reaches the master through its eth0."""
    return "eth0", "10.0.0.5"


def test_torch_env_from_slurm() -> None:
    asked = []
    env = torch_env_from_slurm(
        {**SRUN_TASK, "SLURM_STEP_NUM_NODES": "4"},
        resolve_host=first_host,
        interface=lambda master, nodes: asked.append((master, nodes)) or eth0(master, nodes),
    )
    assert asked == [("gpu03", 4)]  # the interface toward the master, knowing the step spans 4 nodes
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu03",  # the step's first node, where rank 0 runs
        "MASTER_PORT": str(15000 + 4242),
        "GLOO_SOCKET_IFNAME": "eth0",  # gloo and NCCL bind where the master is reached, never a guess
        "NCCL_SOCKET_IFNAME": "eth0",
        **pool_env(8),  # SLURM_CPUS_PER_TASK: OpenMP and BLAS pools alike
    }


def test_torch_env_from_slurm_keeps_what_the_site_set_and_falls_back() -> None:
    task = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_CPUS_PER_TASK")}
    task["SLURM_JOB_NUM_NODES"] = "4"
    site = {"MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "6000", "FLANPIPE_SOCKET_IFNAME": "ib0"}
    env = torch_env_from_slurm({**task, **site}, resolve_host=first_host, interface=eth0)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["OMP_NUM_THREADS"]) == ("ib-gpu01", "6000", "1")
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("ib0", "ib0")
    own = {"GLOO_SOCKET_IFNAME": "eno1", "NCCL_SOCKET_IFNAME": "^docker,lo"}  # each library's own setting wins
    env = torch_env_from_slurm({**task, **own}, resolve_host=first_host, interface=eth0)
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("eno1", "^docker,lo")
    env = torch_env_from_slurm({**task, "FLANPIPE_PORT_RANGE": "40000-40099"}, resolve_host=first_host, interface=eth0)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu01", str(40000 + 4242 % 100))  # job nodelist


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
    from flanpipe.core.threads import POOL_VARS
    from flanpipe.train.launch import rank_threads_env

    def threads(env: dict[str, str]) -> str:
        assert env.keys() == set(POOL_VARS) and len(set(env.values())) == 1, env  # BLAS pools too, alike
        return env["OMP_NUM_THREADS"]

    # Snakemake sets OMP_NUM_THREADS to the rule's threads in every shell job: 2 threads, 1 rank -> 2
    assert threads(rank_threads_env(1, env={"OMP_NUM_THREADS": "2"})) == "2"
    assert threads(rank_threads_env(2, env={"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"})) == "4"
    assert threads(rank_threads_env(2, threads=6, env={"OMP_NUM_THREADS": "8"})) == "3"  # --threads wins
    # srun spreads 8 ranks over 2 nodes: 4 local ranks share this node's 16 threads
    assert threads(rank_threads_env(8, "srun", threads=16, env={"SLURM_JOB_NUM_NODES": "2"})) == "4"
    # nothing said: the CPUs this process may use, split over the ranks
    import os

    cpus = len(os.sched_getaffinity(0))
    assert threads(rank_threads_env(1, env={})) == str(cpus)


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
    job = {**SRUN_TASK, "OMP_NUM_THREADS": "64", "MKL_NUM_THREADS": "64"}  # what Snakemake gave the whole job
    env = torch_env_from_slurm(job, resolve_host=first_host, interface=eth0)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "8"


def test_ckpt_dir_of_train_args() -> None:
    """Where the launcher looks for the preempted marker: --ckpt-dir, else flanpipe.train.loop's default."""
    from pathlib import Path

    from flanpipe.model.checkpointing import default_ckpt_dir
    from flanpipe.train.launch import ckpt_dir_of

    args = ["--spec", "s.json", "--data", "d", "--out", "results/models/run"]
    assert ckpt_dir_of(args) == default_ckpt_dir("results/models/run") == Path("results/models/run.ckpt").absolute()
    assert ckpt_dir_of([*args, "--ckpt-dir", "/scratch/run.ckpt"]) == Path("/scratch/run.ckpt")


def test_sigterm_to_every_process_of_the_step_saves_and_exits_143(tmp_path, megatron_packed_dir) -> None:
    """SLURM signals every process of a job step (preemption, --signal=TERM@300, scancel -s TERM), not
    only the ranks: each rank here is its own process group, as an srun task is, and the whole group gets
    SIGTERM, once a periodic save has run. Both ranks finish the step, save one checkpoint and exit 143
    (a writer helper process in the group would die of the signal and the save with it: BrokenPipeError,
    exit 1, an iter_N.tmp left behind; saves keep their results in process: save_results_in_process)."""
    import json
    import os
    import signal
    import subprocess
    import time

    from test_checkpoint import _free_port, logged_steps
    from test_train import REPO, clean_env, make_spec

    from flanpipe.model import checkpointing

    out, nproc = tmp_path / "run", 2
    (tmp_path / "spec.json").write_text(json.dumps(make_spec(steps=200, save_interval=2)))
    argv = ["--spec", str(tmp_path / "spec.json"), "--data", str(megatron_packed_dir), "--out", str(out)]
    port, procs = str(_free_port()), []
    for rank in range(nproc):
        env = clean_env(nproc) | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)}
        env |= {"LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "flanpipe.train.loop", *argv]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, text=True, start_new_session=True))
    try:
        deadline = time.monotonic() + 300
        ckpt = checkpointing.default_ckpt_dir(out)
        while logged_steps(out) < 3 or not (ckpt / "latest").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.05)
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)  # the rank and every process it started
        assert [p.wait(timeout=120) for p in procs] == [checkpointing.PREEMPTED_EXIT_CODE] * nproc
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert checkpointing.was_preempted(ckpt) and checkpointing.latest_checkpoint(ckpt) is not None
    assert not list(ckpt.glob("*.tmp"))
