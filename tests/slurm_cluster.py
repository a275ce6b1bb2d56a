"""A real single-node SLURM cluster on localhost for tests (Slurm 22.05 from Debian's packages).

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
"""

from __future__ import annotations

import fcntl
import os
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


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
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

    def stop(self) -> None:
        try:
            self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld"):
                proc = self.processes.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)


def write_config(root: Path, node: str, cpus: int, memory_mb: int) -> Path:
    ctld_port, slurmd_port = free_ports(2)
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=vsatest",
        f"SlurmctldHost={node}(127.0.0.1)",
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
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
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
        "SlurmdTimeout=60",
        "MaxArraySize=1001",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_cluster(root: Path, startup_timeout: float = 60) -> SlurmCluster:
    """Write the config under `root`, start slurmctld + slurmd, wait until the node is idle."""
    root = Path(root)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = write_config(root, node, cpus, memory_mb)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus)
    env = cluster.env
    try:
        for name, args in (("slurmctld", ["-D", "-i", "-f", str(conf)]),
                           ("slurmd", ["-D", "-f", str(conf), "-N", node])):
            out = open(root / "log" / f"{name}.out", "wb")
            proc = subprocess.Popen([_which(name), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
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
            return cluster.node_state() in ("idle", "mixed", "allocated")

        wait_until(idle, startup_timeout, what=f"node {node} to become idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster
