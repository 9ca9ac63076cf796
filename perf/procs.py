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


def stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    rss_kb, threads = 0, 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return ProcStat(pid=pid, cpu_s=cpu, rss_mb=rss_kb / 1024, fds=fds, threads=threads)


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


def job_processes(worker_pid: int) -> list[int]:
    """The worker's job processes: children of its forkserver (idle pre-started ones included)."""
    out: list[int] = []
    for c in children(worker_pid):
        cmd = cmdline(c)
        if "forkserver" in cmd and "resource_tracker" not in cmd:
            out += [p for p in children(c) if "resource_tracker" not in cmdline(p)]
    return out


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
