"""CPU seconds spent by every process of the stack, from /proc, taken around a run.

    with CpuMeter() as cpu:
        ...  # the load
    cpu.per_operation(count)   # ms of CPU per operation, summed over the stack
    cpu.per_group(count)       # ms of each group's CPU per operation

Each process is put in a group by its command line: a carelog process by its
subcommand (`serve commands`, `project directory`, `relay`, ...), PostgreSQL, Kafka,
Redis and the gateway by their programs. The load generator and the local SMTP capture
are counted apart: on one machine they compete for the same cores, but they stand in for
the clients and for the practice's mail relay, not parts of the stack.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from types import TracebackType

_TICKS = os.sysconf("SC_CLK_TCK")

_INFRA = {
    "postgres": "PostgreSQL",
    "redis-server": "Redis",
    "haproxy": "gateway",
    "wrk": "load generator",
}


OUTSIDE = frozenset({"load generator", "mail (local SMTP)"})
"""Groups counted apart from the stack (see the module's text)."""


def _group(pid: int, args: list[str]) -> str | None:
    if pid == os.getpid():
        return "load generator"
    if not args:
        return None
    program = Path(args[0]).name
    if program in _INFRA:
        return _INFRA[program]
    if program.startswith("postgres"):
        return "PostgreSQL"
    if program == "java" and any("kafka" in a for a in args):
        return "Kafka"
    for i, arg in enumerate(args):
        if Path(arg).name == "carelog" and i + 1 < len(args):
            words = [a for a in args[i + 1 : i + 3] if not a.startswith("-")]
            return " ".join(words)
    if any("mailcatcher" in a for a in args):
        return "mail (local SMTP)"
    return None


def snapshot() -> dict[str, float]:
    """CPU seconds (user + system) so far, by group, over every running process.

    A process that names no group (a server's worker process, say) counts for the
    group of its nearest ancestor that does.
    """
    seen: dict[int, tuple[int, str | None, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the name: state, ppid, ...; utime, stime, cutime, cstime are 11-14.
        ticks = sum(int(x) for x in fields[11:15])
        group = _group(pid, [a.decode(errors="replace") for a in args if a])
        seen[pid] = (int(fields[1]), group, ticks / _TICKS)
    totals: dict[str, float] = defaultdict(float)
    for parent, group, seconds in seen.values():
        hops = 0
        while group is None and parent in seen and hops < 8:
            parent, group = seen[parent][0], seen[parent][1]
            hops += 1
        if group is not None:
            totals[group] += seconds
    return dict(totals)


def compiler_seconds() -> float:
    """CPU seconds so far of the JVM's JIT compiler threads in the Kafka broker (0.0 when
    no broker runs here). A broker keeps compiling its hot paths for minutes after it
    starts; a benchmark that means a running system's cost waits until that is done."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [
                a.decode(errors="replace")
                for a in (entry / "cmdline").read_bytes().split(b"\0")
                if a
            ]
            if _group(int(entry.name), args) != "Kafka":
                continue
            for task in (entry / "task").iterdir():
                if (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                    stat = (task / "stat").read_text()
                    total += sum(int(x) for x in stat[stat.rindex(")") + 2 :].split()[11:13])
        except OSError:
            continue
    return total / _TICKS


def wait_until_quiet(
    cores: float = 0.25, window: float = 1.0, timeout: float = 120.0
) -> tuple[float, float]:
    """Waits until the stack (every group but the load generator) uses less than `cores`
    over a `window` of seconds, or `timeout`: a benchmark then starts on a stack that has
    worked off the one before (the consumers' backlog after a write load, say). Returns
    the seconds waited and the cores last seen."""
    started = time.perf_counter()
    while True:
        with CpuMeter() as meter:
            time.sleep(window)
        used = meter.stack / meter.seconds
        waited = time.perf_counter() - started
        if used < cores or waited >= timeout:
            return waited, used


class CpuMeter:
    """CPU seconds by group between `__enter__` and `__exit__`, and the wall time."""

    def __init__(self) -> None:
        self.used: dict[str, float] = {}
        self.seconds = 0.0

    def __enter__(self) -> CpuMeter:
        self._before = snapshot()
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start
        after = snapshot()
        self.used = {
            group: max(0.0, after[group] - self._before.get(group, 0.0))
            for group in after
            if after[group] - self._before.get(group, 0.0) > 0
        }

    @property
    def stack(self) -> float:
        """CPU seconds of everything but the load generator and the SMTP capture."""
        return sum(v for k, v in self.used.items() if k not in OUTSIDE)

    def per_operation(self, count: int) -> float:
        """Milliseconds of the stack's CPU per operation."""
        return self.stack / count * 1000 if count else 0.0

    def per_group(self, count: int) -> str:
        """`group ms, ...`: milliseconds of each group's CPU per operation, biggest first;
        the groups outside the stack marked so."""
        parts = sorted(self.used.items(), key=lambda kv: -kv[1])
        return ", ".join(
            f"{group}{' (outside)' if group in OUTSIDE else ''} {used / count * 1000:.2f}"
            for group, used in parts
            if count and used / count >= 0.00001
        )
