"""Load from wrk (a C load tool): writes at a rate a Python load generator cannot send.

`run_wrk(url, lua, seconds)` runs wrk with 16 keep-alive connections and a Lua
script that builds each request, and returns its counts and latency percentiles.
The scripts here make every POST unique (its own email), and PUTs cycle over a
list of patient ids written to a file for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONNECTIONS = 16
THREADS = 2

# Reports what `done` sees as one JSON line, after wrk's own summary.
_REPORT = r"""
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
"""

# Counting statuses needs one table per thread; wrk hands each thread's table to `done`.
_DONE = r"""
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do counts[tostring(k)] = (counts[tostring(k)] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%s":%d', k, v)) end
  io.write(string.format(
    'WRK {"requests":%d,"seconds":%f,"p50":%f,"p99":%f,"socket_errors":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ",")))
end
"""


def _headers_lua(users: list[dict[str, str]]) -> str:
    """`headers(n)`: the n-th request's headers, taking each user's in turn."""
    tables = []
    for headers in users or [{}]:
        pairs = [f'["{k}"] = "{v}"' for k, v in headers.items()]
        pairs.append('["Content-Type"] = "application/json"')
        tables.append("{" + ", ".join(pairs) + "}")
    return (
        "local users = {" + ", ".join(tables) + "}\n"
        "local function headers(n) return users[(n + (tid or 0)) % #users + 1] end\n"
    )


def register_script(users: list[dict[str, str]], run: str, path: str = "/patients") -> str:
    """Each request registers a new patient (unique email per thread and count)."""
    return (
        _headers_lua(users)
        + _REPORT
        + _DONE
        + f'local run = "{run}"\nlocal path = "{path}"\n'
        + r"""
local n = 0
function request()
  n = n + 1
  local body = string.format(
    '{"name":"Bench Patient %d","email":"w-%s-%d-%d@bench.carelog.invalid",'
    .. '"address":"%d Benchmark Road","dateOfBirth":"1970-0%d-1%d","registeredDate":"2024-01-02"}',
    n, run, tid, n, n, 1 + n % 9, n % 9)
  return wrk.format("POST", path, headers(n), body)
end
"""
    )


def update_script(
    users: list[dict[str, str]], ids_file: Path, run: str, prefix: str = "/patients/"
) -> str:
    """Each request changes one of the listed patients (the list cycled per thread)."""
    return (
        _headers_lua(users)
        + _REPORT
        + _DONE
        + f'local run = "{run}"\nlocal ids_file = "{ids_file}"\nlocal prefix = "{prefix}"\n'
        + r"""
local ids = {}
for line in io.lines(ids_file) do table.insert(ids, line) end
local n = 0
function request()
  n = n + 1
  -- threads start at different places so they rarely change the same patient at once
  local id = ids[((n * 7 + tid * 104729) % #ids) + 1]
  local body = string.format(
    '{"name":"Bench Patient %d","email":"u-%s-%s@bench.carelog.invalid",'
    .. '"address":"%d Changed Road","dateOfBirth":"1970-01-01"}', n, run, id, n)
  return wrk.format("PUT", prefix .. id, headers(n), body)
end
"""
    )


def get_script(users: list[dict[str, str]], path: str, pause_ms: int = 0) -> str:
    """GETs of `path`; with `pause_ms`, each connection waits that long after an answer
    before it asks again: a steady load below what the server can do, where latency is
    the server's and not the queue's."""
    return (
        _headers_lua(users)
        + _REPORT
        + _DONE
        + f'local path = "{path}"\nlocal n = 0\n'
        + 'function request() n = n + 1 return wrk.format("GET", path, headers(n)) end\n'
        + (f"function delay() return {pause_ms} end\n" if pause_ms else "")
    )


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    socket_errors: int

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def rate(self) -> float:
        """Successful answers per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return self.requests - self.ok


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, script: str, seconds: float, connections: int = CONNECTIONS) -> WrkResult:
    """Runs wrk against `url` for `seconds` with the Lua `script`."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        done = subprocess.run(  # noqa: S603 (our own arguments)
            [
                shutil.which("wrk") or "wrk",
                f"-t{THREADS}",
                f"-c{connections}",
                f"-d{seconds:g}s",
                "--timeout",
                "10s",
                "-s",
                file.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        Path(file.name).unlink(missing_ok=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk reported nothing: {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(line[4:])
    return WrkResult(
        requests=data["requests"],
        seconds=data["seconds"],
        p50_ms=data["p50"],
        p99_ms=data["p99"],
        statuses={int(k): v for k, v in data["statuses"].items()},
        socket_errors=data["socket_errors"],
    )
