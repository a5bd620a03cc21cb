"""A real single-node SLURM for the workflow tests: munged, slurmctld and slurmd on loopback.

Why real daemons and not a mock: what can go wrong on a cluster (the sbatch flags a profile produces,
job status polling without an accounting database, the task geometry of a multi-rank ``srun``) is
only observable against slurmctld itself. Start-up takes a few seconds.

Every file lives under one scratch directory; the only path outside it is the ``/etc/slurm/slurm.conf``
symlink, needed because the snakemake jobstep plugin strips ``SLURM_CONF`` (with every other
``SLURM_*`` variable) before its nested ``srun``. ``stop()`` ends exactly the daemons ``start()``
started, found through their pid files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "sinfo", "scontrol", "scancel")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # where clients look once SLURM_CONF is stripped
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
# One test cluster per machine at a time: /etc/slurm/slurm.conf can name only one, and a job's nested
# srun finds its controller through it alone. Concurrent test sessions queue on this lock.
MACHINE_LOCK = Path("/tmp/flanpipe-slurm-test.lock")


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, no apt-get, a real SLURM configured): skip."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_installed() -> None:
    """apt-get install SLURM 22.05 + munge if any binary is missing (~10 s on Debian 12).

    Only a missing precondition (root, apt-get) makes the test skip: a failing install on a machine
    that has both is an error, so CI cannot silently stop testing the cluster path.
    """
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and apt-get needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The packages' maintainer scripts would start system-wide munge/slurmd/slurmctld services (daemons
    # nobody stops); a policy-rc.d that answers 101 forbids that, as in Docker images.
    added_policy = not POLICY_RC.exists()
    if added_policy:
        POLICY_RC.write_text("#!/bin/sh\n# flanpipe tests: installing SLURM starts no services\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    finally:
        if added_policy:
            POLICY_RC.unlink(missing_ok=True)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), so two test sessions never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(
    root: Path,
    host: str,
    *,
    cpus: int,
    real_memory_mb: int,
    partitions: tuple[str, ...],
    gpus: int,
    ctld_port: int,
    slurmd_port: int,
) -> str:
    """slurm.conf of a one-node cluster; the first partition is the default.

    Choices a real site makes differently, each needed here: no slurmdbd (accounting off, so clients
    must poll with squeue), root as SlurmUser, linuxproc tracking and no task plugin (no cgroups in a
    container), and MinJobAge=300 so finished jobs stay visible to squeue long enough for the
    executor's status checks (it needs >= 3 x its initial wait).
    """
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    lines = [
        "ClusterName=flanpipe-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket.2",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MailProg=/bin/true",  # slurmctld refuses to start without one
        "DefMemPerCPU=1000",  # else a job without --mem takes the whole node
        "MinJobAge=300",
        "ReturnToService=2",
        "SchedulerParameters=sched_interval=2",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        *(["GresTypes=gpu"] if gpus else []),
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb}{gres} State=UNKNOWN",
    ]
    for i, name in enumerate(partitions):
        default = "YES" if i == 0 else "NO"
        lines.append(f"PartitionName={name} Nodes={host} Default={default} MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    """One node named after this host, ``cpus`` CPUs, partitions named as the profile under test names them.

    ``gpus`` declares that many GPUs backed by empty files in place of /dev/nvidiaN: enough for slurmctld
    to accept and schedule ``--gpus``/``--gres`` requests on a machine that has none.
    """

    root: Path
    partitions: tuple[str, ...] = ("debug",)
    gpus: int = 0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    startup_s: float = 0.0
    _linked: bool = False
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _lock_fd: int | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, snakemake)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH}

    def _pid_files(self) -> dict[str, Path]:
        run = self.root / "run"
        return {"slurmd": run / "slurmd.pid", "slurmctld": run / "slurmctld.pid", "munged": run / "munged.pid"}

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        t0 = time.perf_counter()
        if os.geteuid() != 0:
            raise SlurmUnavailable("needs root (slurmd starts jobs as their users; /etc/slurm/slurm.conf is linked)")
        ensure_installed()
        t_lock = time.perf_counter()
        self._lock(timeout_s=1800)
        t0 += time.perf_counter() - t_lock  # start-up time excludes waiting for another session's cluster
        if DEFAULT_CONF.exists() and not DEFAULT_CONF.is_symlink():
            raise SlurmUnavailable(f"{DEFAULT_CONF} is a real SLURM configuration; not replacing it")
        for d in ("munge", "state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket directory others can write
        self._start_munge()
        real_memory = int(mem_total_mb() * 0.9)  # slurmd drains a node that claims more than it has
        self.conf.write_text(
            slurm_conf(
                self.root,
                self.host,
                cpus=self.cpus,
                real_memory_mb=real_memory,
                partitions=self.partitions,
                gpus=self.gpus,
                ctld_port=free_port(),
                slurmd_port=free_port(),
            )
        )
        if self.gpus:
            # slurmd only counts GPUs it can bind to device files: empty files stand in for /dev/nvidiaN.
            (self.root / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus):
                (self.root / "dev" / f"gpu{i}").touch()
            files = f"{self.root}/dev/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{self.root}/dev/gpu0"
            (self.root / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={files}\n")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.unlink(missing_ok=True)  # a stale symlink from an interrupted session
        DEFAULT_CONF.symlink_to(self.conf)
        self._linked = True
        # Absolute config path: a relative one breaks as soon as a daemon changes directory.
        self._spawn("slurmctld", ["-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-f", str(self.conf)])
        self._wait_idle(timeout_s)
        self.startup_s = time.perf_counter() - t0
        return self

    def _lock(self, timeout_s: float) -> None:
        """Wait for the machine-wide lock (released by ``stop``, or by the kernel if this process dies)."""
        fd = os.open(MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"{MACHINE_LOCK}: another test cluster held it {timeout_s:.0f} s") from None
                if not said:
                    print(f"waiting for {MACHINE_LOCK}: another session's test cluster is running", flush=True)
                    said = True
                time.sleep(1)
        self._lock_fd = fd

    def _run(self, cmd: list[str]) -> None:
        exe = _which(cmd[0]) or cmd[0]
        r = subprocess.run([exe, *cmd[1:]], env=self.env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}\n{self.logs()}")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        if not key.exists():
            self._run(["mungekey", "-c", "-k", str(key)])
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",  # tolerate the world-writable /tmp above the scratch directory
                f"--socket={m}/munge.socket.2",
                f"--key-file={key}",
                f"--pid-file={self._pid_files()['munged']}",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        deadline = time.monotonic() + 10
        while not (m / "munge.socket.2").exists():
            if time.monotonic() > deadline or self._procs["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.05)

    def _spawn(self, name: str, args: list[str]) -> None:
        """Run a daemon in the foreground as this process's child, so ``stop`` can reap it: a container's
        pid 1 may never reap daemonized processes, leaving zombies behind every test session."""
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                [_which(name) or name, *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest reaches the daemons through stop() only
            )

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            dead = [name for name, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up\n{self.logs()}")
            r = subprocess.run(
                [_which("sinfo") or "sinfo", "-h", "-N", "-o", "%t"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            state = r.stdout.strip()
            if r.returncode == 0 and state.splitlines() and all(s == "idle" for s in state.splitlines()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout_s:.0f} s (state {state!r})\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.*")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end the daemons started here, in reverse order.

        Each daemon is this process's child (its pid is also in its pid file): nothing else is signalled.
        """
        if self.conf.exists():
            subprocess.run(
                [_which("scancel") or "scancel", "--user", str(os.geteuid())],
                env=self.env,
                capture_output=True,
                check=False,
            )
        for name, pid_file in self._pid_files().items():
            proc = self._procs.pop(name, None)
            if proc is None:  # not started by this object: only the pid file knows the process
                _stop_pid_file(pid_file, name)
            elif proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._linked and DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == self.conf.resolve():
            DEFAULT_CONF.unlink()
        self._linked = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_pid_file(pid_file: Path, name: str, timeout_s: float = 10.0) -> None:
    """SIGTERM the process in ``pid_file`` if it still is ``name`` (a reused pid is left alone)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return
    if not name.startswith(comm):  # comm is truncated to 15 characters
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running and not a zombie (a container's pid 1 may never reap daemonized processes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
