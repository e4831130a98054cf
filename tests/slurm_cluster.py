"""A real one-node Slurm cluster for the tests (Debian's slurmctld + slurmd + munge).

``start_cluster()`` installs the packages when they are missing (root and apt-get needed),
writes a one-node configuration (this machine's CPUs and memory, partition ``debug``,
``OverSubscribe=YES`` so small jobs share the two cores) and starts munged, slurmctld
and slurmd; ``stop_cluster()`` stops what it started. When the cluster cannot be started
the reason comes back as a string, for ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
_started: list[str] = []


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _install() -> str | None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "Slurm is not installed and this is not a root Debian machine to install it on"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        return f"could not install Slurm: {out.stderr.strip().splitlines()[-1:]}"
    return None


def _config() -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    return "\n".join(
        [
            "ClusterName=qmathtest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "StateSaveLocation=/var/spool/slurmctld",
            "SlurmdSpoolDir=/var/spool/slurmd",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
            "SlurmdLogFile=/var/log/slurm/slurmd.log",
            "SchedulerParameters=defer_batch=0",
            f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=YES",
            "",
        ]
    )


def _node_idle() -> bool:
    out = _run(["sinfo", "-h", "-o", "%T"], timeout=10)
    return out.returncode == 0 and any(
        s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split()
    )


def start_cluster() -> str | None:
    """Start the cluster (or find it running); None when it is up, else why not."""
    try:
        if shutil.which("sinfo") and _node_idle():
            return None
        why = _install()
        if why:
            return why
        for d in ("/etc/slurm", "/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            os.makedirs(d, exist_ok=True)
        os.makedirs("/run/munge", exist_ok=True)
        CONF.write_text(_config())
        if _run(["pgrep", "-x", "munged"], timeout=10).returncode != 0:
            shutil.chown("/run/munge", "munge", "munge")
            out = _run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], timeout=30)
            if out.returncode != 0:
                return f"munged did not start: {out.stderr.strip()}"
            _started.append("munged")
        for daemon in ("slurmctld", "slurmd"):
            if _run(["pgrep", "-x", daemon], timeout=10).returncode != 0:
                out = _run([daemon], timeout=30)
                if out.returncode != 0:
                    return f"{daemon} did not start: {out.stderr.strip()}"
                _started.append(daemon)
        deadline = time.time() + 60
        while time.time() < deadline:
            if _node_idle():
                return None
            time.sleep(0.5)
        return "the Slurm node did not come up within 60 s"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not start Slurm: {exc}"


def stop_cluster() -> None:
    for daemon in reversed(_started):
        _run(["pkill", "-x", daemon], timeout=10)
    _started.clear()
