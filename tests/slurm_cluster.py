"""A real SLURM for the workflow tests: munged, slurmctld and one slurmd per test host.

Why real daemons and not a mock: what can go wrong on a cluster (the sbatch flags a profile produces,
job status polling without an accounting database, the task geometry of a multi-rank ``srun``, ranks
on different hosts finding each other) is only observable against slurmctld and slurmd themselves.

One host (the default): the daemons run on this machine's own network stack and talk over loopback.

Several hosts (``hosts=2``): each test host is a network namespace with its own address on a private
bridge and its own hostname (a UTS namespace), running its own slurmd (``NodeName``/``NodeAddr`` per
host in slurm.conf). slurmctld and munged stay in this machine's namespace: slurmctld listens on the
bridge's address, which both hosts and the test's own clients (sbatch, squeue, snakemake) reach;
munged's socket and the scratch directory are files, so every host shares them (the "shared
filesystem"). Each host resolves every host's name through its own hosts file, bind-mounted over
``/etc/hosts`` in its own mount namespace (``nsenter --net`` + ``unshare --uts --mount``; ``ip netns exec``
would also remount /sys, hiding the cgroup tree slurmd needs). The bridge has no uplink and the hosts no
default route: no packet leaves the machine. Loopback is per namespace, so two ranks on different
hosts can only ever meet over the bridge.

Records and clean-up: every file lives under one scratch directory except the ``/etc/slurm/slurm.conf``
symlink (the snakemake jobstep plugin strips ``SLURM_CONF`` with every other ``SLURM_*`` variable before
its nested ``srun``), the machine's lock and records files in /tmp, and the namespaces and links of
several hosts. ``start()`` appends the name of each
namespace and link to ``MACHINE_RECORDS`` before creating it, and each daemon's pid and program once
started; ``stop()`` removes exactly what the records list, and the next session (the machine lock admits
one at a time) removes what an interrupted one left the same way. No process or interface is ever found
by a broad name.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
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
HOST_PACKAGES = ("iproute2", "util-linux")  # several hosts: ip (netns, veth, bridge); unshare, nsenter
HOST_BINARIES = ("ip", "unshare", "nsenter")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # where clients look once SLURM_CONF is stripped
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
# One test cluster per machine at a time: /etc/slurm/slurm.conf can name only one, and a job's nested
# srun finds its controller through it alone. Concurrent test sessions queue on this lock.
MACHINE_LOCK = Path("/tmp/flanpipe-slurm-test.lock")
MACHINE_RECORDS = Path("/tmp/flanpipe-slurm-test.records.json")  # what the lock holder made (module docstring)
SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")  # the test hosts' /24 is picked inside this, unused


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, no apt-get, no namespaces, a real SLURM
    configured): skip, with this message as the reason."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_installed(packages: tuple[str, ...] = PACKAGES, binaries: tuple[str, ...] = BINARIES) -> None:
    """apt-get install ``packages`` (SLURM 22.05 + munge) if any of ``binaries`` is missing (~10 s on Debian 12).

    Only a missing precondition (root, apt-get) makes the test skip: a failing install on a machine
    that has both is an error, so CI cannot silently stop testing the cluster path.
    """
    missing = [b for b in binaries if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"not installed ({', '.join(missing)} missing) and apt-get needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"not installed ({', '.join(missing)} missing) and there is no apt-get")
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
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
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


@dataclass(frozen=True)
class TestHost:
    """One SLURM node of the test cluster."""

    __test__ = False  # not a pytest test class

    name: str
    """Its hostname and its SLURM NodeName."""
    addr: str
    """Its SLURM NodeAddr: the address the other hosts and slurmctld reach it at."""
    netns: str | None = None
    """Its network namespace; None: this machine's own (one-host mode, on loopback)."""
    link: str | None = None
    """Its end of the private link, inside its namespace: the interface its ranks bind to."""
    port: str | None = None
    """The link's other end, a port of the bridge: down = the host is cut off."""


def slurm_conf(
    root: Path,
    ctld: tuple[str, str],
    hosts: list[TestHost],
    *,
    cpus: int,
    real_memory_mb: int,
    partitions: tuple[str, ...],
    gpus: int,
    ctld_port: int,
    slurmd_port: int,
    slurmd_timeout_s: int = 300,
    cred_expire_s: int = 120,
    kill_wait_s: int = 30,
) -> str:
    """slurm.conf of the test cluster; the first partition is the default and every partition holds every host.

    ``ctld`` is slurmctld's (hostname, address); ``gpus`` is per host. Choices a real site makes differently,
    each needed here: no slurmdbd (accounting off, so clients must poll with squeue), root as SlurmUser,
    process-group tracking and no task plugin (no cgroups in a container), and MinJobAge=300 so finished jobs
    stay visible to squeue long enough for the executor's status checks (it needs >= 3 x its initial wait).
    Per-host daemon files use slurmd's ``%n`` (its NodeName), so several slurmds share one scratch directory.
    ``slurmd_timeout_s``: silence after which slurmctld marks a host DOWN (and requeues its jobs);
    ``cred_expire_s``: job credential lifetime, also how long a requeued job waits before it may start again;
    ``kill_wait_s``: SIGTERM to SIGKILL of a step being ended, also how long srun waits, once a rank has
    failed, for the step of a node that lost it (a crashed host that came back) before the job ends.
    """
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    names = ",".join(h.name for h in hosts)
    lines = [
        "ClusterName=flanpipe-test",
        f"SlurmctldHost={ctld[0]}({ctld[1]})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket.2,cred_expire={cred_expire_s}",
        # A job step's processes are found by process group (a container has no cgroups): linuxproc follows
        # parent links only, so a rank's helper processes orphaned by its death (dist_checkpointing's forked
        # writers, a spawned multiprocessing helper) would outlive the step and hold its output open.
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MailProg=/bin/true",  # slurmctld refuses to start without one
        "DefMemPerCPU=1000",  # else a job without --mem takes the whole node
        "MinJobAge=300",
        "ReturnToService=2",  # a host that comes back (slurmd registers again) is schedulable again
        f"SlurmdTimeout={slurmd_timeout_s}",
        f"KillWait={kill_wait_s}",
        "SchedulerParameters=sched_interval=2",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.%n.log",
        *(["GresTypes=gpu"] if gpus else []),
    ]
    for h in hosts:
        lines.append(
            f"NodeName={h.name} NodeAddr={h.addr} NodeHostname={h.name} CPUs={cpus} "
            f"RealMemory={real_memory_mb}{gres} State=UNKNOWN"
        )
    for i, name in enumerate(partitions):
        default = "YES" if i == 0 else "NO"
        lines.append(f"PartitionName={name} Nodes={names} Default={default} MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def hosts_file(ctld: tuple[str, str], hosts: list[TestHost]) -> str:
    """/etc/hosts as every test host sees it: its own loopback, slurmctld and every host by name."""
    lines = ["127.0.0.1 localhost", f"{ctld[1]} {ctld[0]}"] + [f"{h.addr} {h.name}" for h in hosts]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- records


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (iproute2); without the binary, a failed result (exit 127) like the shell's."""
    exe = _which("ip")
    if exe is None:
        r = subprocess.CompletedProcess(["ip", *args], 127, "", "ip: command not found")
    else:
        r = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _read_records(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: [str(v) for v in vs] for k, vs in data.items() if isinstance(vs, list)}


def remove_recorded(records: Path) -> list[str]:
    """Undo what ``records`` lists, newest kind last made first; return what was removed.

    Daemons: by recorded pid, only if it still runs the recorded program. Namespaces: the processes
    still inside each (``ip netns pids``: jobs' ranks and slurmstepds of a host), then the namespace.
    Links: the bridge ports (deleting one end of a veth pair deletes both) and the bridge. Files under
    the scratch directory are left to whoever owns it (pytest's tmp_path).
    """
    rec = _read_records(records)
    done: list[str] = []
    for entry in rec.get("daemons", []):
        pid, program = entry.split(maxsplit=1)
        if _stop_pid(int(pid), program):
            done.append(f"{program} {pid}")
    for ns in rec.get("netns", []):
        r = _ip("netns", "pids", ns, check=False)
        for pid in r.stdout.split() if r.returncode == 0 else []:
            try:
                os.kill(int(pid), signal.SIGKILL)
                done.append(f"process {pid} in {ns}")
            except (ProcessLookupError, ValueError):
                pass
    for link in reversed(rec.get("links", [])):
        if _ip("link", "show", link, check=False).returncode == 0:
            _ip("link", "del", link, check=False)
            done.append(f"link {link}")
    for ns in rec.get("netns", []):
        if ns in _ip("netns", "list", check=False).stdout.split():
            _ip("netns", "del", ns, check=False)
            done.append(f"netns {ns}")
    records.unlink(missing_ok=True)
    return done


# --------------------------------------------------------------------------- the cluster


@dataclass
class SlurmCluster:
    """``hosts`` nodes with ``cpus`` CPUs and ``gpus`` GPUs each; partitions named as the profile under
    test names them.

    ``gpus`` declares that many GPUs per host, backed by empty files in place of /dev/nvidiaN: enough for
    slurmctld to accept and schedule ``--gpus``/``--gres`` requests on a machine that has none.
    ``slurmd_timeout_s`` is how long slurmctld waits for a silent slurmd before it marks the host DOWN and
    requeues its jobs; ``cred_expire_s`` how long a requeued job then waits; ``kill_wait_s`` how long srun
    waits for a failed step's processes, a crashed host's included (SLURM's defaults: 300, 120 and 30).
    """

    root: Path
    partitions: tuple[str, ...] = ("debug",)
    gpus: int = 0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    hosts: int = 1
    slurmd_timeout_s: int = 300
    cred_expire_s: int = 120
    kill_wait_s: int = 30
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    startup_s: float = 0.0
    nodes: list[TestHost] = field(default_factory=list)
    ctld_addr: str = "127.0.0.1"
    _linked: bool = False
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _lock_fd: int | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def records(self) -> Path:
        return MACHINE_RECORDS

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, snakemake)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH}

    def _pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        t0 = time.perf_counter()
        if os.geteuid() != 0:
            raise SlurmUnavailable("needs root (slurmd starts jobs as their users; /etc/slurm/slurm.conf is linked)")
        ensure_installed()
        if self.hosts > 1:
            ensure_installed(HOST_PACKAGES, HOST_BINARIES)
            _check_namespaces()
        t_lock = time.perf_counter()
        self._lock(timeout_s=1800)
        t0 += time.perf_counter() - t_lock  # start-up time excludes waiting for another session's cluster
        if DEFAULT_CONF.exists() and not DEFAULT_CONF.is_symlink():
            raise SlurmUnavailable(f"{DEFAULT_CONF} is a real SLURM configuration; not replacing it")
        for d in ("munge", "state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket directory others can write
        if self.hosts > 1:
            self._make_hosts()
        else:
            self.nodes = [TestHost(self.host, "127.0.0.1")]
        self._start_munge()
        real_memory = int(mem_total_mb() * 0.9)  # slurmd drains a node that claims more than it has
        self.conf.write_text(
            slurm_conf(
                self.root,
                (self.host, self.ctld_addr),
                self.nodes,
                cpus=self.cpus,
                real_memory_mb=real_memory,
                partitions=self.partitions,
                gpus=self.gpus,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                slurmd_timeout_s=self.slurmd_timeout_s,
                cred_expire_s=self.cred_expire_s,
                kill_wait_s=self.kill_wait_s,
            )
        )
        if self.gpus:
            # slurmd only counts GPUs it can bind to device files: empty files stand in for /dev/nvidiaN.
            (self.root / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus):
                (self.root / "dev" / f"gpu{i}").touch()
            files = f"{self.root}/dev/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{self.root}/dev/gpu0"
            names = ",".join(h.name for h in self.nodes)
            (self.root / "gres.conf").write_text(f"NodeName={names} Name=gpu File={files}\n")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.unlink(missing_ok=True)  # a stale symlink from an interrupted session
        DEFAULT_CONF.symlink_to(self.conf)
        self._linked = True
        # Absolute config path: a relative one breaks as soon as a daemon changes directory.
        self._spawn("slurmctld", ["-D", "-f", str(self.conf)])
        for h in self.nodes:
            self.start_slurmd(h)
        self._wait_idle(timeout_s)
        self.startup_s = time.perf_counter() - t0
        return self

    # ----------------------------------------------------------------- hosts in namespaces

    def _record(self, kind: str, *names: str) -> None:
        """Write-ahead: a name is on record before the thing exists, so an interrupted start is undone too."""
        rec = _read_records(self.records)
        rec.setdefault(kind, []).extend(n for n in names if n not in rec.get(kind, []))
        self.records.write_text(json.dumps(rec, indent=1))

    def _make_hosts(self) -> None:
        """The bridge (slurmctld's address), then per host: namespace, veth pair, address, hosts file."""
        tag = f"{os.getpid() % 0xFFFF:04x}"  # interface names must fit 15 characters
        net = _free_subnet()
        addrs = [str(a) for a in net.hosts()]
        self.ctld_addr = addrs[0]
        bridge = f"fp{tag}br"
        self._record("links", bridge)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctld_addr}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        self.nodes = [
            TestHost(f"node{i}", addrs[i], f"flanpipe-{tag}-node{i}", f"fp{tag}h{i}", f"fp{tag}p{i}")
            for i in range(1, self.hosts + 1)
        ]
        for h in self.nodes:
            assert h.netns and h.link and h.port
            self._record("netns", h.netns)
            _ip("netns", "add", h.netns)
            self._record("links", h.port)
            _ip("link", "add", h.port, "type", "veth", "peer", "name", h.link)
            _ip("link", "set", h.link, "netns", h.netns)
            _ip("link", "set", h.port, "master", bridge)
            _ip("link", "set", h.port, "up")
            for args in (
                ("link", "set", "lo", "up"),  # down in a new namespace; local connections need it
                ("addr", "add", f"{h.addr}/{net.prefixlen}", "dev", h.link),
                ("link", "set", h.link, "up"),
            ):
                _ip("netns", "exec", h.netns, "ip", *args)
        (self.root / "hosts").mkdir(exist_ok=True)
        for h in self.nodes:
            self._hosts_file(h).write_text(hosts_file((self.host, self.ctld_addr), self.nodes))

    def _hosts_file(self, h: TestHost) -> Path:
        return self.root / "hosts" / h.name

    def host_argv(self, h: TestHost, argv: list[str]) -> list[str]:
        """``argv`` run on host ``h``: inside its network namespace, under its own hostname."""
        if h.netns is None:
            return argv
        netns = next(p for p in (Path("/run/netns") / h.netns, Path("/var/run/netns") / h.netns) if p.exists())
        return [
            *(_which("nsenter") or "nsenter", f"--net={netns}"),
            *(_which("unshare") or "unshare", "--uts", "--mount", "--"),  # mounts stay private to this host
            *("sh", "-c", 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'),
            *(h.name, str(self._hosts_file(h)), *argv),
        ]  # nsenter and unshare exec in place, and so does sh: the child's pid is argv's own

    def start_slurmd(self, h: TestHost) -> None:
        (self.root / "spool" / h.name).mkdir(parents=True, exist_ok=True)
        self._spawn(f"slurmd.{h.name}", ["-D", "-N", h.name, "-f", str(self.conf)], host=h)

    def host_pids(self, h: TestHost) -> list[int]:
        """Processes now on host ``h`` (in its network namespace): its slurmd, slurmstepds and ranks."""
        r = _ip("netns", "pids", h.netns or "", check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def crash(self, h: TestHost) -> list[int]:
        """Host ``h`` dies: its link goes down first (so no FIN or RST reaches anyone: to the other hosts and
        slurmctld it falls silent, as a dead or partitioned node does), then every process on it is SIGKILLed,
        its slurmd, slurmstepds and ranks alike. Returns the pids killed. (Killing its slurmd alone would end
        nothing: each job step runs under its own slurmstepd, which outlives slurmd.)"""
        _ip("link", "set", h.port or "", "down")
        pids: list[int] = []
        deadline = time.monotonic() + 10.0
        while (alive := [p for p in self.host_pids(h) if p not in pids]) and time.monotonic() < deadline:
            for pid in alive:  # again until none is left: a process may fork while its siblings are killed
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pids += alive
            time.sleep(0.1)
        proc = self._procs.pop(f"slurmd.{h.name}", None)
        if proc is not None:
            proc.wait()  # reap it: it is this process's child
        return pids

    def kill_slurmd(self, h: TestHost) -> int:
        """Host ``h``'s slurmd dies alone (SIGKILL); its slurmstepds, and the job steps they run, go on.
        Returns its pid; ``start_slurmd`` brings it back."""
        proc = self._procs.pop(f"slurmd.{h.name}")
        proc.kill()
        proc.wait()  # reap it: it is this process's child
        return proc.pid

    def reboot(self, h: TestHost) -> None:
        """Host ``h`` comes back, empty: link up, a fresh slurmd (ReturnToService=2 puts it back in service)."""
        _ip("link", "set", h.port or "", "up")
        self.start_slurmd(h)

    def wait_node_state(self, h: TestHost, states: tuple[str, ...] = ("idle",), timeout_s: float = 120.0) -> str:
        """Wait until slurmctld reports ``h`` in one of ``states`` (sinfo's short names); return it."""
        deadline, state = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                [_which("sinfo") or "sinfo", "-h", "-N", "-n", h.name, "-o", "%t"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            # one line per partition holding the host; a suffix marks a flag (* = not responding)
            seen = {line.strip().rstrip("*~#!%$@^-") for line in r.stdout.splitlines() if line.strip()}
            state = "/".join(sorted(seen))
            if len(seen) == 1 and state in states:
                return state
            time.sleep(0.5)
        raise RuntimeError(f"{h.name} not {'/'.join(states)} after {timeout_s:.0f} s (state {state!r})\n{self.logs()}")

    # ----------------------------------------------------------------- daemons

    def _lock(self, timeout_s: float) -> None:
        """Wait for the machine-wide lock (released by ``stop``, or by the kernel if this process dies), then
        undo what an interrupted session's records list."""
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
        if self.records.exists():  # its owner died holding the lock: nobody uses what it lists
            removed = remove_recorded(self.records)
            print(f"removed what an interrupted test cluster left: {', '.join(removed) or 'nothing'}")

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
                f"--pid-file={self._pid_file('munged')}",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        deadline = time.monotonic() + 10
        while not (m / "munge.socket.2").exists():
            if time.monotonic() > deadline or self._procs["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.05)

    def _spawn(self, name: str, args: list[str], host: TestHost | None = None) -> None:
        """Run a daemon in the foreground as this process's child, so ``stop`` can reap it: a container's
        pid 1 may never reap daemonized processes, leaving zombies behind every test session."""
        program = name.split(".")[0]
        argv = [_which(program) or program, *args]
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                self.host_argv(host, argv) if host else argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest reaches the daemons through stop() only
            )
        self._record("daemons", f"{self._procs[name].pid} {program}")  # nsenter and unshare exec: the same pid

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
            lines = state.splitlines()
            if r.returncode == 0 and len(lines) >= len(self.nodes) and all(s == "idle" for s in lines):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout_s:.0f} s (state {state!r})\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.*")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel this cluster's jobs, end the daemons started here (reverse order), then remove what
        the records list: leftover processes in the hosts' namespaces, links, namespaces, files.

        Each daemon is this process's child (its pid is also in its pid file): nothing else is signalled.
        """
        if self.conf.exists():
            subprocess.run(
                [_which("scancel") or "scancel", "--user", str(os.geteuid())],
                env=self.env,
                capture_output=True,
                check=False,
            )
        for name in sorted(self._procs, key=lambda n: ("slurmd", "slurmctld", "munged").index(n.split(".")[0])):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._lock_fd is not None:  # the records are the lock holder's: never another session's
            remove_recorded(self.records)  # what the records still say exists
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


def _check_namespaces() -> None:
    """Skip, with the reason, where this machine cannot make network namespaces, bridges or UTS namespaces."""
    for tool in ("ip", "unshare", "nsenter"):
        if _which(tool) is None:
            raise SlurmUnavailable(f"several test hosts need `{tool}` (iproute2 / util-linux), not found")
    probe = f"fpprobe{os.getpid() % 0xFFFF:04x}"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            raise SlurmUnavailable(f"cannot create a network namespace (ip netns add): {r.stderr.strip()}")
        r = _ip("link", "add", probe[:15], "type", "bridge", check=False)
        if r.returncode != 0:
            raise SlurmUnavailable(f"cannot create a bridge (ip link add type bridge): {r.stderr.strip()}")
        _ip("link", "del", probe[:15], check=False)
        u = subprocess.run(
            [_which("unshare") or "unshare", "--uts", "--", "true"], capture_output=True, text=True, check=False
        )
        if u.returncode != 0:
            raise SlurmUnavailable(f"cannot create a UTS namespace (unshare --uts): {u.stderr.strip()}")
    finally:
        _ip("netns", "del", probe, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 inside SUBNET_BASE that no address or route of this machine touches."""
    used = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for word in _ip(*args, check=False).stdout.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for net in SUBNET_BASE.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise SlurmUnavailable(f"no free /24 for the test hosts in {SUBNET_BASE}")


def _stop_pid(pid: int, program: str, timeout_s: float = 10.0) -> bool:
    """SIGTERM ``pid`` if it still runs ``program`` (a reused pid is left alone), SIGKILL it if it lingers;
    True if it was signalled."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if not program.startswith(comm) or not _alive(pid):  # comm is truncated to 15 characters
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    """Running and not a zombie (a container's pid 1 may never reap daemonized processes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
