"""One launcher for training, on a workstation and under SLURM.

    launch(train_args, nproc, mpi="")
        mpi empty (workstation, or a single-node job):
            python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node N -m flanpipe.train.loop ARGS
            one rank (N = 1): python -m flanpipe.train.loop ARGS, which makes its own 1-process group
        mpi given (SLURM: the slurm profile sets it to "srun"):
            srun -n N python -m flanpipe.train.launch worker ARGS

A single rank needs no torchrun: its agent process imports torch and starts an elastic rendezvous
before the rank does (~2 s of CPU per job on the shared 2-core machine, load 22: 2.1-2.2 s of user CPU
for ``torchrun --nproc_per_node 1`` of an empty module vs 0.02 s for ``python -m`` of it), and the
default DAG's training jobs are all one rank.

Why two paths: torchrun spawns and supervises the ranks itself, which is what a workstation needs, while
under SLURM the ranks must be SLURM tasks, so ``srun`` places them (across nodes too), binds their CPUs
and GPUs, and cancels them with the job. Each srun task then only has to translate SLURM's description
of itself into the env:// rendezvous variables torch.distributed reads (``torch_env_from_slurm``).

The rule and ``flanpipe train`` both call ``launch``; ARGS are flanpipe.train.loop's own
(``--spec SPEC --data DIR --out DIR``).

Threads: each rank gets the job's threads / local ranks (``rank_threads_env``), not torchrun's fixed 1:
the train rule's ``threads`` reach the launcher as Snakemake's ``OMP_NUM_THREADS`` (or ``--threads``).
Under srun each task has SLURM's ``--cpus-per-task`` CPUs, which is that same quotient by construction.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PORT_BASE = 15000
PORT_SPAN = 10000  # 15000..24999: clear of Linux's ephemeral range (32768..60999) and of torchrun's 29500


TRAIN_MODULE = "flanpipe.train.loop"


def launch_command(train_args: Sequence[str], nproc: int, mpi: str = "", module: str = TRAIN_MODULE) -> list[str]:
    """The argv that starts ``nproc`` ranks of ``module`` (training, or flanpipe.eval.evaluate: see the module
    docstring); ``train_args`` are that module's arguments."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not mpi.strip() and nproc == 1:
        return [sys.executable, "-m", module, *train_args]
    if not mpi.strip():
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",  # = torchrun, from the same interpreter
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "-m",
            module,
            *train_args,
        ]
    which = [] if module == TRAIN_MODULE else ["--module", module]
    worker = [sys.executable, "-m", "flanpipe.train.launch", "worker"]
    return [*shlex.split(mpi), "-n", str(nproc), *worker, *which, *train_args]


def rank_threads_env(
    nproc: int, mpi: str = "", threads: int | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for the ranks: the job's threads / the ranks on this node.

    torchrun puts all ``nproc`` ranks on this node; srun spreads them over ``SLURM_JOB_NUM_NODES``
    nodes (ceil(nproc / nodes) here). E.g. a 2-thread job with 1 rank: 2 threads; with 2 ranks: 1 each.
    torchrun keeps an OMP_NUM_THREADS it finds (it only defaults it to 1 when unset).
    """
    from flanpipe.core.threads import job_threads, threads_per_rank

    env = os.environ if env is None else env
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1) if mpi.strip() else 1
    local = -(-nproc // max(1, nodes))
    total = threads if threads else job_threads(dict(env))
    return {"OMP_NUM_THREADS": str(threads_per_rank(total, local))}


def launch(
    train_args: Sequence[str], nproc: int, mpi: str = "", threads: int | None = None, module: str = TRAIN_MODULE
) -> int:
    """Run the training ranks to completion; return the launcher's exit status.

    SIGTERM to the launcher (a scheduler's preemption or time limit) is passed on to the single rank,
    torchrun or srun, whose ranks finish their step, save and exit 143. A single rank and srun report
    143 themselves; torchrun reports any worker exit as 1, so behind it a run counts as preempted when
    rank 0 left the checkpoint dir's preempted marker, and the launcher exits 143 too: a requeue, not a
    failure.
    """
    from flanpipe.core.preemption import PREEMPTED_EXIT_CODE, clear_preempted, was_preempted

    cmd = launch_command(train_args, nproc, mpi, module)
    env = {**os.environ, **rank_threads_env(nproc, mpi, threads)}
    print(f"flanpipe launch: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if module != TRAIN_MODULE:  # evaluation keeps no checkpoints: a failure is a failure
        return subprocess.run(cmd, check=False, env=env).returncode
    ckpt_dir = ckpt_dir_of(train_args)
    clear_preempted(ckpt_dir)  # only this attempt's preemption may count
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        status = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return PREEMPTED_EXIT_CODE if status != 0 and was_preempted(ckpt_dir) else status


def ckpt_dir_of(train_args: Sequence[str]) -> Path:
    """The resumable-checkpoint dir flanpipe.train.loop will use for these arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-dir", default=None)
    args, _ = parser.parse_known_args(list(train_args))
    from flanpipe.core.preemption import default_ckpt_dir

    return Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir(args.out)


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist, without scontrol: ``gpu[07-09,12],cpu1`` -> ``gpu07``.

    Only the first top-level item matters; each bracket group in it becomes its first value,
    keeping the zero padding (``[07-09]`` -> ``07``).
    """
    depth = 0
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist.strip())
    if not host:
        raise ValueError(f"empty SLURM hostlist {nodelist!r}")
    return host


def scontrol_first_host(nodelist: str) -> str:
    """``scontrol show hostnames`` (authoritative: knows every hostlist form), else ``first_host``."""
    try:
        r = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=False
        )
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return first_host(nodelist)


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Ranks on node ``node_id`` from SLURM's compressed count list: ``2(x3),1`` = [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id]


def master_port(job_id: str) -> int:
    """The same port on every rank of a job, different across concurrent jobs: 15000 + job_id mod 10000."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def torch_env_from_slurm(
    env: Mapping[str, str], resolve_host: Callable[[str], str] = scontrol_first_host
) -> dict[str, str]:
    """torch.distributed's env:// variables for one ``srun`` task, from the SLURM variables srun sets.

    RANK <- SLURM_PROCID, WORLD_SIZE <- SLURM_NTASKS, LOCAL_RANK <- SLURM_LOCALID, MASTER_ADDR <- first
    host of the step's nodes (rank 0 runs there), MASTER_PORT <- derived from SLURM_JOB_ID. A MASTER_ADDR
    or MASTER_PORT already in the environment wins (a site whose compute nodes talk over another name).
    """
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise ValueError(f"not inside an srun task: {', '.join(missing)} unset")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("not inside an srun task: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or resolve_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(env["SLURM_JOB_ID"])),
        # Intra-op threads = the CPUs SLURM bound to this task (--cpus-per-task: the job's CPUs on the
        # node / its tasks there), else what the launcher computed, else 1.
        "OMP_NUM_THREADS": env.get("SLURM_CPUS_PER_TASK") or env.get("OMP_NUM_THREADS") or "1",
    }
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        out["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    return out


def worker(train_args: Sequence[str], module: str = TRAIN_MODULE) -> int:
    """One srun task: set the rendezvous variables, then run flanpipe.train.loop (or ``module``'s main) here."""
    os.environ.update(torch_env_from_slurm(os.environ))
    e = os.environ
    print(
        f"flanpipe launch: rank {e['RANK']}/{e['WORLD_SIZE']} (local {e['LOCAL_RANK']}) on "
        f"{os.uname().nodename}, master {e['MASTER_ADDR']}:{e['MASTER_PORT']}",
        file=sys.stderr,
        flush=True,
    )
    import importlib

    return importlib.import_module(module).main(list(train_args))


# dist_checkpointing's spawn-mode writer re-imports __main__: keep the entry point guarded.
if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        sys.exit("usage: python -m flanpipe.train.launch worker --spec SPEC --data DIR --out DIR  (one srun task)")
    if sys.argv[2:3] == ["--module"]:
        sys.exit(worker(sys.argv[4:], module=sys.argv[3]))
    sys.exit(worker(sys.argv[2:]))
