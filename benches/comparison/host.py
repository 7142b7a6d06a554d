"""This machine and its processes: logging, free ports, CPU pinning and fd limits for children,
apt installs, and process facts from /proc (RSS, CPU time, the machine and its contention).

SERVER_CPU and LOAD_CPU are read at each use (host.SERVER_CPU), not imported by value: main sets both
to None on a one-CPU machine, which turns pinning off everywhere.
"""

import os
import platform
import resource
import socket
import subprocess
import sys

SERVER_CPU, LOAD_CPU = 0, 1


def log(msg):
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(cpu):
    """preexec_fn: the child runs on `cpu` only (what `taskset -c CPU` does) with many fds."""
    def setup():
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        raise_nofile()
    return setup


def apt_install(packages):
    log(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, env=env, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    return r.returncode == 0


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, **kw)


# Process facts from /proc


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """User + system CPU time of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def contention():
    r = subprocess.run(["pgrep", "-c", "rustc"], capture_output=True, text=True)
    rustc = int(r.stdout.strip() or 0)
    return {"rustc_processes": rustc, "loadavg": os.getloadavg()[0]}
