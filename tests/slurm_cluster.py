"""A real SLURM cluster for tests (Slurm 22.05 from Debian's packages): one node on localhost, or
several nodes, each a network namespace with its own address.

`start_cluster(folder)` writes a slurm.conf under `folder` (free localhost ports, state/spool/logs
inside `folder`, no munge: AuthType=auth/none + CredType=cred/none, no accounting daemon), starts
`slurmctld` and `slurmd` in their own sessions and waits until the node is idle. The returned
`SlurmCluster` runs client commands with `SLURM_CONF` set (`cluster.env` is the environment to give
any subprocess that talks to SLURM, e.g. `train.py -m hydra/launcher=slurm`), and `stop()` cancels
every job first (job processes outlive slurmd), then SIGTERMs the two daemons by their PIDs.

`ensure_slurm()` returns None when SLURM is installed. When it is missing it installs Debian's
packages with apt-get only when asked to (`VSA_TEST_INSTALL_SLURM=1`, which `.ci/run` sets; root
and apt-get needed): the test suite does not change the machine unless asked. Otherwise it
returns the reason to skip, naming the variable.

Choices (see docs/slurm.md):
- No slurmdbd, so `sacct` has no data. submitit reads job states through sacct, so a job killed
  from outside would make `job.result()` wait forever: the tests never wait without a timeout and
  cancel every job before giving up.
- `cred_expire=5` and `sched_interval=2,bf_interval=1`: a requeued job starts again in ~7 s
  instead of ~134 s.
- `DefMemPerCPU=1024`: without a default, one job takes the whole node's memory.

Several nodes (`start_cluster(folder, nodes=2)`; `NodeNetwork`): a Linux bridge on the test
machine holds the controller's address (x.x.x.1); each node `n1`, `n2`, ... is a network namespace
joined to the bridge by a veth pair (the node side is named `eth0`, address x.x.x.(10+i)), with
its own `/etc/hosts` (every node's name and the controller's; bind-mounted in a private mount
namespace) and its own hostname (UTS namespace). Its `slurmd` and every job step it starts run
inside, so the jobs of a 2-node allocation talk to each other over the bridge, by node name, as
on a real cluster; the filesystem is shared, as a cluster's shared file system is. Traffic stays
on the bridge and the loopback (no route leaves the machine). Needs root and `ip`, `nsenter`,
`unshare` (`namespaces_unavailable()` says what is missing, and the tests skip with it).
Everything (slurmds, namespaces, bridge, /etc/netns/<name>) is torn down by `stop()`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
INSTALL_VARIABLE = "VSA_TEST_INSTALL_SLURM"  # "1": install PACKAGES with apt-get when missing
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun"]
SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _apt_install(timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]  # wait for another apt run, do not fail
    command = [*apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:  # stale package lists on a fresh machine: update once, retry
        subprocess.run([*apt, "update"], env=env, capture_output=True, timeout=timeout)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return result


def ensure_slurm(install_timeout: float = 600) -> str | None:
    """Make sure the SLURM daemons and clients are installed. Returns None when they are, else
    the reason they are not (the caller skips with it)."""
    if all(_which(b) for b in BINARIES):
        return None
    if os.environ.get(INSTALL_VARIABLE) != "1":
        return (f"SLURM is not installed; set {INSTALL_VARIABLE}=1 to let the tests install it "
                f"(as root: apt-get install -y {' '.join(PACKAGES)}), or install it yourself")
    if os.geteuid() != 0:
        return ("SLURM is not installed and installing it needs root: "
                f"`apt-get install -y {' '.join(PACKAGES)}`")
    if not _which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    # pytest-xdist workers may get here together: one installs, the others wait for it.
    with open(Path(tempfile.gettempdir()) / "vsa_slurm_install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_which(b) for b in BINARIES):
            return None
        result = _apt_install(install_timeout)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(result.args)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise RuntimeError(f"installed {PACKAGES} but {missing} are still missing")
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.5,
               what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy (returned); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def namespaces_unavailable() -> str | None:
    """Why network namespaces for cluster nodes cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "a multi-node test cluster needs root (network namespaces, a bridge, veth pairs)"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if not _which(tool)]
    if missing:
        return f"a multi-node test cluster needs {', '.join(missing)} (iproute2, util-linux)"
    probe = f"vsaprobe{secrets.token_hex(2)}"
    result = subprocess.run([_which("ip"), "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot make a network namespace (`ip netns add`): {result.stderr.strip()}"
    subprocess.run([_which("ip"), "netns", "del", probe], capture_output=True)
    return None


@dataclass
class NodeNetwork:
    """A bridge plus one network namespace per node (see the module docstring)."""

    tag: str                     # 4 hex digits in every interface and namespace name
    prefix: str                  # "10.a.b": the bridge is .1, node i is .(10 + i)
    nodes: list[str]
    made: list[tuple[str, ...]] = field(default_factory=list)  # undo commands, in order

    @property
    def controller_address(self) -> str:
        return f"{self.prefix}.1"

    def address(self, node: str) -> str:
        return f"{self.prefix}.{10 + self.nodes.index(node) + 1}"

    def namespace(self, node: str) -> str:
        return f"vsa{self.tag}{node}"

    @classmethod
    def create(cls, count: int) -> NodeNetwork:
        tag = secrets.token_hex(2)
        octets = int(tag, 16)
        network = cls(tag=tag, prefix=f"10.{200 + octets % 50}.{octets % 251}",
                      nodes=[f"n{i + 1}" for i in range(count)])
        try:
            network._make()
        except BaseException:
            network.remove()
            raise
        return network

    def _ip(self, *args: str, undo: tuple[str, ...] | None = None) -> None:
        result = subprocess.run([_which("ip"), *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
        if undo:
            self.made.append(undo)

    def _make(self) -> None:
        bridge = f"vsa{self.tag}br"
        self._ip("link", "add", bridge, "type", "bridge", undo=("link", "del", bridge))
        self._ip("addr", "add", f"{self.controller_address}/24", "dev", bridge)
        self._ip("link", "set", bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(n)} {n}\n" for n in self.nodes)
        for i, node in enumerate(self.nodes):
            ns, host_side, node_side = self.namespace(node), f"vsa{self.tag}h{i}", f"vsa{self.tag}p{i}"
            self._ip("netns", "add", ns, undo=("netns", "del", ns))
            self._ip("link", "add", host_side, "type", "veth", "peer", "name", node_side,
                     undo=("link", "del", host_side))
            self._ip("link", "set", host_side, "master", bridge)
            self._ip("link", "set", host_side, "up")
            self._ip("link", "set", node_side, "netns", ns)
            self._ip("-n", ns, "link", "set", node_side, "name", "eth0")
            self._ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts)

    def command(self, node: str, args: list[str]) -> list[str]:
        """`args` run on `node`: in its network namespace, with its /etc/hosts and hostname."""
        ns = self.namespace(node)
        script = ('mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"')
        return [_which("nsenter"), f"--net=/run/netns/{ns}", _which("unshare"), "--mount", "--uts",
                "--propagation", "private", "sh", "-c", script, "sh", f"/etc/netns/{ns}/hosts", node, *args]

    def remove(self) -> None:
        for undo in reversed(self.made):
            subprocess.run([_which("ip"), *undo], capture_output=True)
        self.made = []
        for node in self.nodes:
            shutil.rmtree(Path("/etc/netns") / self.namespace(node), ignore_errors=True)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str                    # the first node
    cpus: int                    # per node
    nodes: list[str] = field(default_factory=list)
    network: NodeNetwork | None = None   # several nodes: their namespaces
    pids: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """os.environ + SLURM_CONF (and the sbin folders on PATH) for subprocesses."""
        path = os.environ.get("PATH", "")
        extra = [d for d in SBIN if d not in path.split(os.pathsep)]
        # Variables of an enclosing SLURM job would confuse Lightning's SLURM detection in jobs.
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, "SLURM_CONF": str(self.conf), "PATH": os.pathsep.join([path, *extra])}

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A client command (`scontrol`, `squeue`, `sbatch`, ...) against this cluster."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {result.returncode}: {result.stderr.strip()}")
        return result

    def node_state(self) -> str:
        """The nodes' states, one per line ("idle", "idle\nidle", ...)."""
        result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.stdout.strip().lower()

    def job_ids(self) -> list[str]:
        """Ids of the jobs SLURM knows about that are not finished (array tasks as A_T)."""
        result = self.run("squeue", "-h", "-o", "%i", check=False)
        return [line.strip() for line in result.stdout.splitlines() if line.strip()]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, BatchFlag, ...); {} once SLURM forgot it."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        info: dict[str, str] = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job and wait (bounded) until none is left running."""
        ids = self.job_ids()
        if ids:
            self.run("scancel", *ids, check=False)
            try:
                wait_until(lambda: not self.job_ids(), timeout, what="cancelled jobs to end")
            except TimeoutError:
                pass

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else ""

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one daemon ("slurmctld", "slurmd" or "slurmd-n2"): `sig`, then SIGKILL after 15 s."""
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)  # its session: the namespace wrappers and the daemon
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def kill_node(self, node: str) -> list[int]:
        """Lose `node` as in a crash: SIGKILL every process in its network namespace (its slurmd,
        job steps and tasks); returns their PIDs. SLURM declares it DOWN after SlurmdTimeout."""
        if self.network is None:
            raise RuntimeError("kill_node needs a cluster of several nodes (start_cluster(nodes=...))")
        ns = self.network.namespace(node)
        listed = subprocess.run([_which("ip"), "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(p) for p in listed.stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        try:
            self.cancel_all()
        finally:
            try:
                for name in [n for n in self.processes if n != "slurmctld"] + ["slurmctld"]:
                    self.stop_daemon(name)
            finally:
                if self.network is not None:
                    self.network.remove()


def write_config(root: Path, node: str, cpus: int, memory_mb: int,
                 network: NodeNetwork | None = None) -> Path:
    """slurm.conf for one node `node` on localhost, or (`network`) for its nodes, whose slurmds
    keep their spool, pid and log files apart by node name (%n)."""
    ctld_port, slurmd_port = free_ports(2)
    host = socket.gethostname().split(".")[0]
    each = "-%n" if network else ""
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=vsatest",
        f"SlurmctldHost={host}({network.controller_address if network else '127.0.0.1'})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        # No munged: no authentication at all (fine inside a test sandbox, never on a real cluster).
        "AuthType=auth/none",
        "CredType=cred/none",
        # Requeued jobs wait for the launch credential of the previous run to expire: 5 s, not 120.
        "AuthInfo=cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}{'/%n' if network else ''}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / f'slurmd{each}.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / f'slurmd{each}.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "DefMemPerCPU=1024",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=1",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "MinJobAge=600",            # keep finished jobs visible to `scontrol show job` for 10 min
        "KillWait=5",               # SIGTERM -> SIGKILL grace of a cancelled or requeued job
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        # Several nodes: a node lost mid-job is declared DOWN after 10 s (the jobs' requeue tests).
        f"SlurmdTimeout={10 if network else 60}",
        "MaxArraySize=1001",
    ]
    nodes = network.nodes if network else [node]
    for name in nodes:
        address = network.address(name) if network else "127.0.0.1"
        lines.append(f"NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN")
        if network:
            (root / "spool" / name).mkdir(parents=True, exist_ok=True)
    lines.append(f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_cluster(root: Path, startup_timeout: float = 60, nodes: int = 1) -> SlurmCluster:
    """Write the config under `root`, start slurmctld and a slurmd per node, wait until every
    node is idle. `nodes` > 1: each node in its own network namespace (NodeNetwork; root)."""
    root = Path(root)
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    network = NodeNetwork.create(nodes) if nodes > 1 else None
    names = network.nodes if network else [socket.gethostname().split(".")[0]]
    try:
        memory_mb //= len(names)
        conf = write_config(root, names[0], cpus, memory_mb, network)
    except BaseException:
        if network:
            network.remove()
        raise
    cluster = SlurmCluster(root=root, conf=conf, node=names[0], cpus=cpus, nodes=names, network=network)
    env = cluster.env
    daemons = [("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])]
    for name in names:
        args = [_which("slurmd"), "-D", "-f", str(conf), "-N", name]
        daemons.append((f"slurmd-{name}", network.command(name, args)) if network else ("slurmd", args))
    try:
        for name, command in daemons:
            out = open(root / "log" / f"{name}.out", "wb")
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
            cluster.processes[name] = proc
            cluster.pids[name] = proc.pid
            if name == "slurmctld":
                wait_until(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0
                           or proc.poll() is not None, startup_timeout, what="slurmctld to answer")

        def idle() -> bool:
            for name, proc in cluster.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{cluster.log(name)}"
                                       f"{(root / 'log' / f'{name}.out').read_text(errors='replace')[-2000:]}")
            states = cluster.node_state().split()
            return len(states) == len(names) and all(st in ("idle", "mixed", "allocated") for st in states)

        wait_until(idle, startup_timeout, what=f"node(s) {', '.join(names)} to become idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster
