"""Process statistics from /proc (Linux): CPU seconds, RSS, open file descriptors, threads, process trees."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    cpu_s: float
    """user + system CPU seconds so far"""
    rss_mb: float
    fds: int
    threads: int
    reaped_cpu_s: float = 0.0
    """cutime + cstime: CPU seconds of its children that ended and were waited for"""


def stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    reaped = (int(fields[13]) + int(fields[14])) / CLK_TCK  # cutime, cstime
    rss_kb, threads = 0, 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return ProcStat(pid=pid, cpu_s=cpu, rss_mb=rss_kb / 1024, fds=fds, threads=threads, reaped_cpu_s=reaped)


def private_mb(pid: int) -> float | None:
    """Memory only this process maps (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup), MB: unlike RSS it
    leaves out the pages a forked job process still shares with its forkserver. None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = sum(
        int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean:", "Private_Dirty:"))
    )
    return kb / 1024


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for c in children(pid):
        out += [c, *descendants(c)]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def forkservers(worker_pid: int) -> list[int]:
    """The worker's multiprocessing forkserver(s): the parents of its job processes."""
    return [c for c in children(worker_pid) if "forkserver" in (cmd := cmdline(c)) and "resource_tracker" not in cmd]


def job_processes(worker_pid: int) -> list[int]:
    """The worker's job processes: children of its forkserver (idle pre-started ones included)."""
    return [p for f in forkservers(worker_pid) for p in children(f) if "resource_tracker" not in cmdline(p)]


def jobs_cpu_s(worker_pid: int) -> float:
    """CPU seconds used so far by every job process the worker ever had: the live ones' own CPU plus, in the
    forkserver's cutime/cstime, that of the ones that ended (the forkserver waits for its children). Exact over a
    window, unlike sampling, which misses a process's CPU before it is first seen and after it is last seen."""
    total = 0.0
    for f in forkservers(worker_pid):
        live = [s for p in children(f) if "resource_tracker" not in cmdline(p) and (s := stat(p)) is not None]
        fs = stat(f)
        total += sum(s.cpu_s + s.reaped_cpu_s for s in live) + (fs.reaped_cpu_s if fs else 0.0)
    return total


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GB"


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class CpuMeter:
    """CPU use (% of one core) of named process groups between successive `sample()` calls. A group is a function
    returning its pids now; processes that appeared or ended in between count from/until when they were seen."""

    def __init__(self) -> None:
        self._last: dict[int, float] = {}
        self._t = time.monotonic()

    def sample(self, groups: dict[str, list[int]]) -> dict[str, float]:
        now = time.monotonic()
        dt = max(1e-6, now - self._t)
        seen: dict[int, float] = {}
        out: dict[str, float] = {}
        for name, pids in groups.items():
            used = 0.0
            for p in pids:
                s = stat(p)
                if s is None:
                    continue
                seen[p] = s.cpu_s
                used += s.cpu_s - self._last.get(p, s.cpu_s if p not in self._last and self._last else 0.0)
            out[name] = 100.0 * used / dt
        self._last, self._t = seen, now
        return out
