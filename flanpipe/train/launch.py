"""One launcher for training, on a workstation and under SLURM.

    launch(train_args, nproc, mpi="")
        mpi empty (workstation, or a single-node job):
            python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node N -m flanpipe.train.loop ARGS
            one rank (N = 1): python -m flanpipe.train.loop ARGS, which makes its own 1-process group
        mpi given (SLURM: the slurm profile sets it to "srun"):
            srun -n N --kill-on-bad-exit=1 python -m flanpipe.train.launch worker ARGS

A single rank needs no torchrun: its agent process imports torch and starts an elastic rendezvous
before the rank does (~2 s of CPU per job on the shared 2-core machine, load 22: 2.1-2.2 s of user CPU
for ``torchrun --nproc_per_node 1`` of an empty module vs 0.02 s for ``python -m`` of it), and the
default DAG's training jobs are all one rank.

Why two paths: torchrun spawns and supervises the ranks itself, which is what a workstation needs, while
under SLURM the ranks must be SLURM tasks, so ``srun`` places them (across nodes too), binds their CPUs
and GPUs, and cancels them with the job. Each srun task then only has to translate SLURM's description
of itself into the env:// rendezvous variables torch.distributed reads (``torch_env_from_slurm``).

Across nodes, from the allocation (each overridable by the site, see ``SITE_ENV``): the rendezvous host is
the first node of the step (rank 0 runs there), the port is derived from the job id, and the network
interface gloo and NCCL bind to is the one this node reaches that host through (``socket_interface``):
left to themselves, gloo falls back to loopback when a node's hostname does not resolve to one of its own
addresses, and NCCL may pick a management or docker interface. Every collective gives up after
``collective_timeout_s`` (default 10 minutes; torch's gloo default is 30): a rank that died, hangs or sits
on a lost node makes the others fail within that bound instead of waiting, srun ends the step
(``srun_flags``), and a retry resumes from the last checkpoint.

The rule and ``flanpipe train`` both call ``launch``; ARGS are flanpipe.train.loop's own
(``--spec SPEC --data DIR --out DIR``).

Threads: each rank gets the job's threads / local ranks (``rank_threads_env``), not torchrun's fixed 1:
the train rule's ``threads`` reach the launcher as Snakemake's ``OMP_NUM_THREADS`` (or ``--threads``).
Under srun each task has SLURM's ``--cpus-per-task`` CPUs, which is that same quotient by construction.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flanpipe.core.threads import job_threads, pool_env, threads_per_rank

PORT_RANGE = (15000, 24999)  # inclusive: clear of Linux's ephemeral range (32768..60999) and of torchrun's 29500
COLLECTIVE_TIMEOUT_S = 600.0  # NCCL's own default; long enough for a 137B checkpoint save between collectives

SITE_ENV = {
    "MASTER_ADDR": "rendezvous host (default: the first node of the srun step, where rank 0 runs)",
    "MASTER_PORT": "rendezvous port (default: derived from SLURM_JOB_ID, inside FLANPIPE_PORT_RANGE)",
    "FLANPIPE_PORT_RANGE": "LO-HI, the ports a job's rendezvous port is derived in (default 15000-24999)",
    "FLANPIPE_SOCKET_IFNAME": "interface gloo and NCCL bind to (default: the one this node reaches MASTER_ADDR by)",
    "GLOO_SOCKET_IFNAME": "gloo's own setting; wins over FLANPIPE_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME": "NCCL's own setting (e.g. ib0 or ^docker,lo); wins over FLANPIPE_SOCKET_IFNAME",
    "FLANPIPE_COLLECTIVE_TIMEOUT_S": "seconds a collective waits for a missing rank before failing (default 600)",
}
"""What a site may set (sbatch --export=ALL carries the submitting shell's variables into every job, and srun
into every task); README "Across nodes" says when each is needed."""


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
    mpi_argv = shlex.split(mpi)
    return [*mpi_argv, "-n", str(nproc), *srun_flags(mpi_argv), *worker, *which, *train_args]


def srun_flags(mpi_argv: Sequence[str]) -> list[str]:
    """``--kill-on-bad-exit=1`` for srun (unless the site's ``mpi`` says otherwise): once one rank has failed,
    the others can only fail too (at their next collective, or its timeout), and srun would wait for all of
    them; with it srun ends the step at the first failed rank. (A node that stops answering is SLURM's to
    declare failed, after its SlurmdTimeout; srun waits for that.)"""
    if not mpi_argv or Path(mpi_argv[0]).name != "srun":
        return []
    if any(a in ("-K", "-K0", "-K1") or a.startswith(("--kill-on-bad-exit", "-K=")) for a in mpi_argv[1:]):
        return []
    return ["--kill-on-bad-exit=1"]


def rank_threads_env(
    nproc: int, mpi: str = "", threads: int | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Thread pools of the ranks (``OMP_NUM_THREADS`` and the BLAS ones: flanpipe.core.threads.pool_env): the
    job's threads / the ranks on this node.

    torchrun puts all ``nproc`` ranks on this node; srun spreads them over ``SLURM_JOB_NUM_NODES``
    nodes (ceil(nproc / nodes) here). E.g. a 2-thread job with 1 rank: 2 threads; with 2 ranks: 1 each.
    torchrun keeps an OMP_NUM_THREADS it finds (it only defaults it to 1 when unset).
    """
    env = os.environ if env is None else env
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1) if mpi.strip() else 1
    local = -(-nproc // max(1, nodes))
    total = threads if threads else job_threads(dict(env))
    return pool_env(threads_per_rank(total, local))


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


def master_port(job_id: str, ports: tuple[int, int] = PORT_RANGE) -> int:
    """The same port on every rank of a job, different across concurrent jobs: lo + job_id mod (hi - lo + 1),
    e.g. 15000 + job_id mod 10000."""
    lo, hi = ports
    return lo + int(job_id) % (hi - lo + 1)


def port_range(env: Mapping[str, str]) -> tuple[int, int]:
    """``FLANPIPE_PORT_RANGE`` (``LO-HI``, inclusive) or the default 15000-24999."""
    raw = env.get("FLANPIPE_PORT_RANGE", "").strip()
    if not raw:
        return PORT_RANGE
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", raw)
    if m is None or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
        raise ValueError(f"FLANPIPE_PORT_RANGE={raw!r}: want LO-HI with 1024 <= LO <= HI <= 65535, e.g. 15000-24999")
    return int(m.group(1)), int(m.group(2))


def collective_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds a collective (and the rendezvous) waits before failing: ``FLANPIPE_COLLECTIVE_TIMEOUT_S``, else 600."""
    raw = (os.environ if env is None else env).get("FLANPIPE_COLLECTIVE_TIMEOUT_S", "").strip()
    if not raw:
        return COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"FLANPIPE_COLLECTIVE_TIMEOUT_S={raw!r}: want a positive number of seconds")
    return seconds


def ipv4_interfaces() -> dict[str, str]:
    """Each network interface's IPv4 address (SIOCGIFADDR, what ``ip -4 addr`` shows); interfaces without
    one are left out. Python has no portable call for this; the ioctl is Linux's, where clusters run."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = socket.inet_ntoa(ifreq[20:24])  # struct ifreq: name[16], sockaddr_in: family, port, addr
    return out


def resolve_ipv4(host: str) -> str:
    """``host``'s IPv4 address as this node resolves it (DNS or /etc/hosts)."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise ValueError(
            f"cannot resolve rendezvous host {host!r} on {os.uname().nodename}: {e}; set MASTER_ADDR"
        ) from e


def source_address(addr: str) -> str:
    """The local address this node sends from to reach ``addr``: a UDP connect only consults the routing
    table, no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def socket_interface(
    master_addr: str,
    nodes: int,
    *,
    resolve: Callable[[str], str] = resolve_ipv4,
    source: Callable[[str], str] = source_address,
    interfaces: Callable[[], dict[str, str]] = ipv4_interfaces,
) -> tuple[str, str]:
    """(interface, address) this node reaches ``master_addr`` through: the network its collectives should use.

    On the master's own node that is the interface holding the master's address. A loopback answer is
    refused when the step spans several nodes: the master's name then resolves to 127.x on its own node
    (a hosts file line like Debian's ``127.0.1.1 node01``), and the other nodes could never reach it.
    """
    addr = resolve(master_addr)
    local = source(addr)
    if ipaddress.ip_address(local).is_loopback and nodes > 1:
        raise ValueError(
            f"rendezvous host {master_addr} resolves to {addr} on {os.uname().nodename}, a loopback address the "
            f"step's other {nodes - 1} node(s) cannot reach (a hosts file mapping this node's name to 127.x?): set "
            "MASTER_ADDR to an address they reach, and FLANPIPE_SOCKET_IFNAME to the interface holding it"
        )
    names = sorted(name for name, a in interfaces().items() if a == local)
    if not names:
        raise ValueError(
            f"no interface of {os.uname().nodename} holds {local}, the address it reaches rendezvous host "
            f"{master_addr} ({addr}) from: set FLANPIPE_SOCKET_IFNAME"
        )
    return names[0], local


def torch_env_from_slurm(
    env: Mapping[str, str],
    resolve_host: Callable[[str], str] = scontrol_first_host,
    interface: Callable[[str, int], tuple[str, str]] = socket_interface,
) -> dict[str, str]:
    """torch.distributed's env:// variables for one ``srun`` task, from the SLURM variables srun sets.

    RANK <- SLURM_PROCID, WORLD_SIZE <- SLURM_NTASKS, LOCAL_RANK <- SLURM_LOCALID, MASTER_ADDR <- first
    host of the step's nodes (rank 0 runs there), MASTER_PORT <- derived from SLURM_JOB_ID inside
    FLANPIPE_PORT_RANGE, GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME <- the interface this node reaches
    MASTER_ADDR through. A value the site set (``SITE_ENV``) wins over each.
    """
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise ValueError(f"not inside an srun task: {', '.join(missing)} unset")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("not inside an srun task: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    master = env.get("MASTER_ADDR") or resolve_host(nodelist)
    ifname = env.get("FLANPIPE_SOCKET_IFNAME", "").strip()
    if not ifname and not (env.get("GLOO_SOCKET_IFNAME") and env.get("NCCL_SOCKET_IFNAME")):
        ifname = interface(master, nodes)[0]
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "MASTER_ADDR": master,
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(env["SLURM_JOB_ID"], port_range(env))),
        "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME") or ifname,
        "NCCL_SOCKET_IFNAME": env.get("NCCL_SOCKET_IFNAME") or ifname,
    }
    # Every pool (OpenMP and BLAS alike) = the CPUs SLURM bound to this task (--cpus-per-task: the job's
    # CPUs on the node / its tasks there), else what the launcher computed, else 1.
    out.update(pool_env(int(env.get("SLURM_CPUS_PER_TASK") or env.get("OMP_NUM_THREADS") or 1)))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        out["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    return out


def worker(train_args: Sequence[str], module: str = TRAIN_MODULE) -> int:
    """One srun task: set the rendezvous variables, then run flanpipe.train.loop (or ``module``'s main) here."""
    os.environ.update(torch_env_from_slurm(os.environ))
    e = os.environ
    gloo = e["GLOO_SOCKET_IFNAME"]
    print(
        f"flanpipe launch: rank {e['RANK']}/{e['WORLD_SIZE']} (local {e['LOCAL_RANK']}, "
        f"{e['OMP_NUM_THREADS']} threads) on {os.uname().nodename}, master {e['MASTER_ADDR']}:{e['MASTER_PORT']}, "
        f"gloo on {gloo} "
        f"({ipv4_interfaces().get(gloo, 'no IPv4 address')}), NCCL on {e['NCCL_SOCKET_IFNAME']}, "
        f"collective timeout {collective_timeout_s():g} s",
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
