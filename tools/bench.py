"""Side-by-side benchmark of mtloop against asyncio, uvloop (and rloop).

    python tools/bench.py                 # the quick set, about a minute and a half
    python tools/bench.py --full          # the whole matrix (many minutes)
    python tools/bench.py --smoke         # seconds: checks that it all runs
    python tools/bench.py --targets       # the scenarios issue #4 sets targets for
    python tools/bench.py --scaling       # mtloop with 1, 2, 4, 8 I/O threads (many cores)
    python tools/bench.py --tls           # TLS echo and handshakes (issue #10)
    python tools/bench.py --procs         # pipes through cat, a spawn burst (issue #11)
    python tools/bench.py --udp           # datagram echo (issue #12)
    python tools/bench.py --storm         # a connection storm (issue #13)
    python tools/bench.py --baseline 88cf932   # the working tree against a commit, one run

For each scenario, each loop's echo server (tools/bench_server.py, one
process per run) is driven by the C load generator (tools/loadgen.c,
pinned to the last CPU).  Runs are interleaved across loops and repeated;
the report gives medians, ratios against uvloop and asyncio, the server's
CPU per request split into its loop thread and its other threads (mtloop's
I/O threads) from /proc/PID/task, and its peak RSS.  It writes JSON
(--json, default build/bench/results.json) and, when matplotlib is
importable, a PNG chart next to it.  Progress goes to stderr.

Servers are measured as users run them: glibc's default heap settings,
and no warm-up run (issue #13).  --fixed-heap gives every server the same
fixed heap thresholds instead (MALLOC_TRIM_THRESHOLD_=64 MiB,
MALLOC_MMAP_THRESHOLD_=4 MiB): with the defaults, which glibc moves as a
process frees large blocks, a server that allocates 64 KiB buffers per
request landed, run by run, in one of two modes twice apart (17-30 page
faults per request in the slow one), for asyncio and uvloop as much as for
mtloop, and asyncio's 256 KiB recv() buffers were mmap()ed afresh per read
until its first connection closed.  --warmup drives each server once,
unmeasured, before its measured run.  Report both where they differ.

--pattern level drives the echo scenarios with the load generator's
level-triggered pattern (one send() and one recv() of at most 64 KiB per
readiness, as a client on an event loop of its own does) instead of its
default edge-triggered one; --pattern both runs each echo scenario both
ways, the level runs named "... [level]".

TLS scenarios (--tls) give every server the same certificate, made for the
run by trustme, and the load generator speaks TLS without verifying it and
without resuming sessions; the handshake scenario makes a connection per
request.  The HTTPS scenario runs uvicorn (HTTP/1.1 with h11, a 13-byte
response) on each loop under wrk over https (keep-alive), when wrk is on
PATH; its p50/p99 are wrk's.

Subprocess scenarios (--procs) run their workload inside the server
process (tools/bench_server.py --mode pipe|spawn): a "request" there is a
MiB pushed through a `cat` child and read back, or a child spawned and
waited for; p50/p99 are the loop's stalls (gaps between the wakeups of a
task sleeping 1 ms), and the largest gap is reported too.  CPU is the
server process's own (its children's is not counted).

UDP scenarios (--udp) serve a datagram echo endpoint (mode udp) to the load
generator's --udp: a connected socket per "connection", one datagram in
flight each, every echo checked; a datagram not echoed within 0.1 s is
counted as lost ("lost" in the JSON) and the next one goes.  "udp receive"
is one way: the load generator's --udp-flood sends back to back from every
socket into a server that only counts (mode udp-sink); "requests" are the
datagrams its protocol received, "lost" the ones the kernel dropped.

The storm (--storm, and in --full) starts 10,000 clients at once against a
streams echo server (listen backlog 4096, the kernel's cap; the load
generator's --storm): each echoes 100 KB in chunks of 1 to 16,384 bytes,
one chunk in flight, every byte checked, then closes.  A run is one storm:
"seconds" from the first connect to the last close (the column to read),
"rps" connections per second, p50/p99 a connection's life from connect()
to close(), CPU per request the server's CPU per connection, and
"listen_overflows" the SYNs the kernel dropped for want of room in the
listen queue meanwhile (TcpExtListenOverflows, machine-wide).

A loop named mtloop:N runs mtloop with N I/O threads.  --clients K splits
the connections over K load generators pinned to the last K CPUs (requests
add up; p50 is the clients' mean, p99 their maximum), and --server-cpus
pins the server, for machines with cores to spare.

--baseline REF measures the working tree's mtloop against git revision REF
in one interleaved run ("before and after, same run").  REF's tree is
exported with `git archive` and pip-installed (with this interpreter,
--no-build-isolation) into build/bench-baseline/<sha>/site-<cache tag>/,
once per commit and Python; later runs reuse it.  Every mtloop loop of
--loops (mtloop, mtloop:N) gets a twin, mtloop@<short sha>[:N], whose
server runs the same tools/bench_server.py with --loop mtloop and that
directory first on PYTHONPATH; each such server reports the mtloop file it
imported, and a run whose file is not the baseline's fails.  The report
adds a line per scenario with the working tree's ratios to the baseline
(req/s, p99, CPU per request), --markdown adds columns for them, and the
JSON records the baseline's sha under "baseline".  The working tree's side
is the mtloop installed for this Python: ./tools/bench.sh rebuilds it from
the working tree first; run directly, rebuild it yourself.

Benchmarks are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tools" / "bench_server.py"
TICK = os.sysconf("SC_CLK_TCK")
BASELINE_DIR = ROOT / "build" / "bench-baseline"


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    mode: str = "protocol"
    size: int = 1024
    connections: int = 32
    pipeline: int = 1
    work_us: float = 0.0
    idle: bool = False
    tls: bool = False
    reconnect: bool = False     # a connection (a TLS handshake) per request
    http: bool = False          # an HTTP server (mode asgi) under wrk, not an echo
    proc: bool = False          # a subprocess workload run by the server (mode pipe, spawn)
    udp: bool = False           # datagrams (mode udp, the load generator's --udp)
    flood: bool = False         # one way: --udp-flood into mode udp-sink
    pattern: str = "edge"       # the load generator's --pattern (stream echoes)
    storm: bool = False         # all connections at once, one echo each (--storm)


QUICK = [
    Scenario("protocol 1KiB x32"),
    Scenario("streams 1KiB x32", mode="streams"),
    Scenario("heavy 64KiB x16 (50us/req)", size=64 * 1024, connections=16, work_us=50),
]
FULL = (
    [Scenario(f"{mode} {label} x{c}", mode=mode, size=size, connections=c)
     for mode in ("protocol", "buffered", "streams", "sock")
     for size, label in ((1024, "1KiB"), (10 * 1024, "10KiB"), (100 * 1024, "100KiB"))
     for c in (1, 32, 1000)]
    + [Scenario("ping-pong 1KiB x1", connections=1),
       Scenario("heavy 64KiB x16 (50us/req)", size=64 * 1024, connections=16, work_us=50),
       Scenario("idle x10000", connections=10000, idle=True)]
)
# Issue #13: 10,000 clients at once, each echoing 100 KB in random chunks.
STORM = [Scenario("storm 100KB x10000", mode="streams", size=100_000, connections=10000,
                  storm=True)]
FULL += STORM
# The scenarios issue #4 sets targets for, in the order of its table.
TARGETS = [
    Scenario("protocol 1KiB x32"),
    Scenario("protocol 100KiB x32", size=100 * 1024),
    Scenario("streams 1KiB x32", mode="streams"),
    Scenario("ping-pong 1KiB x1", connections=1),
    Scenario("heavy 64KiB x16 (50us/req)", size=64 * 1024, connections=16, work_us=50),
    Scenario("idle x10000", connections=10000, idle=True),
]
SCALING = [
    Scenario("protocol 1KiB x256", connections=256),
    Scenario("protocol 10KiB x256", size=10 * 1024, connections=256),
]
TLS = [
    Scenario("tls 1KiB x32", tls=True),
    Scenario("tls 64KiB x16", size=64 * 1024, connections=16, tls=True),
    Scenario("tls streams 1KiB x32", mode="streams", tls=True),
    Scenario("tls handshakes x8", connections=8, tls=True, reconnect=True),
    Scenario("https uvicorn x32", mode="asgi", tls=True, http=True),
    Scenario("tls idle x1000", connections=1000, idle=True, tls=True),
]
# Issue #11: a "request" is a MiB through `cat` (pipe) or a child (spawn).
PROCS = [
    Scenario("pipe through cat", mode="pipe", proc=True),
    Scenario("spawn burst x500", mode="spawn", size=500, proc=True),
]
# Issue #12: datagram echo (the load generator counts loss rather than wait).
UDP = [
    Scenario("udp echo 64B x32", mode="udp", size=64, udp=True),
    Scenario("udp echo 1KiB x32", mode="udp", size=1024, udp=True),
    Scenario("udp receive 64B x32", mode="udp-sink", size=64, udp=True, flood=True),
]
UNITS = {"pipe": "MiB", "spawn": "children", "udp": "datagrams", "udp-sink": "datagrams"}  # a "request", by mode
SMOKE = [Scenario("protocol 1KiB x4", connections=4),
         Scenario("storm 10KB x50", mode="streams", size=10_000, connections=50, storm=True),
         Scenario("idle x50", connections=50, idle=True)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_loop(loop: str) -> tuple[str, str | None, str]:
    """'mtloop@abc1234:2' -> ('mtloop', 'abc1234', '2'); 'uvloop' -> ('uvloop', None, '')."""
    name, _, io_threads = loop.partition(":")
    module, _, rev = name.partition("@")
    return module, rev or None, io_threads


def loop_order(loop: str) -> tuple:
    """Sort key: by module, then I/O threads, each baseline after its working-tree twin."""
    module, rev, io_threads = parse_loop(loop)
    return module, int(io_threads or 0), rev or ""


def baseline_pairs(loops: list[str]) -> list[tuple[str, str]]:
    """(working-tree loop, its baseline twin) for each baseline loop whose twin is in `loops`."""
    pairs = []
    for loop in loops:
        module, rev, io_threads = parse_loop(loop)
        twin = module + (f":{io_threads}" if io_threads else "")
        if rev and twin in loops:
            pairs.append((twin, loop))
    return pairs


def available_loops(wanted: list[str]) -> list[str]:
    out = []
    for name in wanted:
        module = parse_loop(name)[0]
        if module == "asyncio" or importlib.util.find_spec(module) is not None:
            out.append(name)
        else:
            log(f"bench: {name} is not importable; left out")
    return out


def build_loadgen(given: Path | None = None) -> Path:
    """Builds tools/loadgen.c with CMake (once) and returns the binary."""
    if given is not None:
        return given
    build = ROOT / "build" / "bench-loadgen"
    binary = build / "tools" / "mtloop-loadgen"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmake = shutil.which("cmake", path=env["PATH"]) or "cmake"
    gen = (["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"])
           and not (build / "CMakeCache.txt").exists() else [])
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen,
                    "-DMTLOOP_BUILD_TOOLS=ON", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build), "--target", "mtloop-loadgen"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return binary


# ---- the baseline revision ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Baseline:
    ref: str            # as given
    sha: str
    short: str
    site: Path          # the directory put first on the baseline servers' PYTHONPATH
    mtloop_file: str    # mtloop.__file__ as imported with it
    build_s: float | None  # seconds the build took; None when an earlier one was reused


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def with_pythonpath(env: dict[str, str], site: Path) -> dict[str, str]:
    old = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": str(site) + (os.pathsep + old if old else "")}


def is_under(file: str, site: Path) -> bool:
    try:
        return Path(file).resolve().is_relative_to(site.resolve())
    except OSError:
        return False


def import_from(site: Path) -> tuple[str | None, str]:
    """Imports mtloop as a baseline server would (`site` first on PYTHONPATH,
    not run from the repository) and returns (its __file__ when it lies in
    `site`, else None; what happened)."""
    proc = subprocess.run([sys.executable, "-c", "import mtloop; print(mtloop.__file__)"],
                          cwd=site, env=with_pythonpath(dict(os.environ), site),
                          capture_output=True, text=True)
    if proc.returncode:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    file = proc.stdout.strip()
    return (file if is_under(file, site) else None), f"imported {file}"


def build_baseline(ref: str) -> Baseline:
    """Builds mtloop as of git revision `ref` into build/bench-baseline/<sha>/
    (once per commit and Python) and returns where it is."""
    try:
        sha = git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
        short = git("rev-parse", "--short=7", sha)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench: --baseline {ref}: {exc.stderr.strip() or exc}")
    home = BASELINE_DIR / sha
    site = home / f"site-{sys.implementation.cache_tag}"
    if site.is_dir():
        file, what = import_from(site)
        if file is not None:
            log(f"bench: baseline {short} ({ref}): reusing {site}")
            return Baseline(ref, sha, short, site, file, None)
        log(f"bench: baseline {short}: {site} is unusable ({what}); rebuilding")
        shutil.rmtree(site)
    home.mkdir(parents=True, exist_ok=True)
    build_log = home / "build.log"
    log(f"bench: baseline {short} ({ref}): building mtloop into {site} (log: {build_log})")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="build-", dir=home) as tmp:
        src, partial = Path(tmp) / "src", Path(tmp) / "site"
        src.mkdir()
        archive = subprocess.Popen(["git", "archive", "--format=tar", sha], cwd=ROOT,
                                   stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
        archive.stdout.close()  # type: ignore[union-attr]
        if archive.wait():
            raise SystemExit(f"bench: git archive {sha} failed")
        with open(build_log, "w") as out:
            rc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                                 "--no-deps", "--target", str(partial), str(src)],
                                stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            raise SystemExit(f"bench: building mtloop at {short} failed; see {build_log}")
        partial.rename(site)
    build_s = time.monotonic() - t0
    file, what = import_from(site)
    if file is None:
        raise SystemExit(f"bench: the baseline built in {site} does not import from there: {what}")
    log(f"bench: baseline {short} built in {build_s:.0f} s")
    return Baseline(ref, sha, short, site, file, build_s)


def add_baseline(wanted: list[str], loops: list[str], short: str) -> list[str]:
    """`loops` with each mtloop loop of `wanted` followed by its baseline twin
    (kept even when the working tree's mtloop is not importable here)."""
    out = []
    for name in wanted:
        if name in loops and name not in out:
            out.append(name)
        module, rev, io_threads = parse_loop(name)
        twin = f"mtloop@{short}" + (f":{io_threads}" if io_threads else "")
        if module == "mtloop" and rev is None and twin not in out:
            out.append(twin)
    if not any(parse_loop(lp)[1] for lp in out):
        out.append(f"mtloop@{short}")
    return out


# ---- the server process ------------------------------------------------------

def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user+system) of each thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost: (certificate chain, key) files."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


class Server:
    env: dict[str, str] = {}          # set by main(): extra environment for every server
    tls_files: tuple[Path, Path] | None = None  # set by main() for TLS scenarios
    cpus: set[int] | None = None      # set by main(): the server's CPU affinity
    baselines: dict[str, Path] = {}   # set by main(): short sha -> the baseline's site dir

    def __init__(self, loop: str, sc: Scenario) -> None:
        module, rev, io_threads = parse_loop(loop)
        cmd = [sys.executable, str(SERVER), "--loop", module, "--mode", sc.mode,
               "--size", str(sc.size), "--work-us", str(sc.work_us)]
        if sc.tls:
            assert Server.tls_files is not None
            cmd += ["--tls-cert", str(Server.tls_files[0]), "--tls-key", str(Server.tls_files[1])]
        env = {**os.environ, **Server.env}
        site = Server.baselines[rev] if rev else None
        if site is not None:
            env = with_pythonpath(env, site)
        if io_threads:
            env["MTLOOP_IO_THREADS"] = io_threads
        cpus = Server.cpus
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env=env,
            stdin=subprocess.PIPE if sc.proc or sc.flood else None,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"{loop} server did not start: {line!r}")
        _, port, *origin = line.split(maxsplit=2)
        self.port = int(port)
        self.pid = self.proc.pid
        # The loop's module file, as the server imported it.
        self.origin = origin[0].strip() if origin else ""
        if site is not None and not is_under(self.origin, site):
            self.stop()
            raise RuntimeError(f"{loop} server imported {self.origin or 'an unknown mtloop'}, "
                               f"not the baseline in {site}")

    def run(self, seconds: float) -> dict:
        """A pipe or spawn server's workload, once (tools/bench_server.py)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"RUN {seconds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the server ended during its workload")
        return json.loads(line)

    def received(self) -> int:
        """A udp-sink server's count of datagrams received so far."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("COUNT\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["received"]

    def cpu(self) -> tuple[float, float]:
        """(loop thread, other threads) CPU seconds so far."""
        per = thread_cpu(self.pid)
        main = per.pop(self.pid, 0.0)
        return main, sum(per.values())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- one run ---------------------------------------------------------------------

def loadgen(binary: Path, port: int, sc: Scenario, seconds: float,
            cpus: list[int | None]) -> dict:
    """Runs one load generator per entry of `cpus` (each pinned there when
    not None), splitting the connections, and merges their reports."""
    procs = []
    for i, cpu in enumerate(cpus):
        conns = sc.connections // len(cpus) + (i < sc.connections % len(cpus))
        cmd = [str(binary), "--port", str(port), "-c", str(conns), "-s", str(sc.size),
               "-p", str(sc.pipeline), "-d", str(seconds), "--json"]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        if sc.tls:
            cmd.append("--tls")
        if sc.reconnect:
            cmd.append("--reconnect")
        if sc.udp:
            cmd.append("--udp-flood" if sc.flood else "--udp")
        if sc.pattern != "edge":
            cmd += ["--pattern", sc.pattern]
        if sc.storm:
            cmd.append("--storm")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        try:
            reports.append(json.loads(out))
        except ValueError:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.strip()}")
    if len(reports) == 1:
        return reports[0]
    merged = {k: sum(r.get(k, 0) for r in reports)
              for k in ("requests", "rps", "mib_s", "errors", "connections", "lost")}
    merged["p50_us"] = statistics.mean(r["p50_us"] for r in reports)
    merged["p99_us"] = max(r["p99_us"] for r in reports)
    merged["clients"] = len(reports)
    return merged


WARMUP = False  # --warmup


def measure(server: Server, drive: Any, seconds: float) -> dict:
    """drive(seconds) once measured (after a warm-up run with --warmup): its
    report plus the server's CPU per request (loop thread, other threads)
    and peak RSS.  Stops the server."""
    try:
        if WARMUP:
            drive(min(0.3, seconds / 3))
        m0, o0 = server.cpu()
        t0 = time.monotonic()
        r = drive(seconds)
        wall = time.monotonic() - t0
        m1, o1 = server.cpu()
        peak = status_kib(server.pid, "VmHWM")
    finally:
        server.stop()
    n = max(r["requests"], 1)
    return {**r, "loop_cpu_us_per_req": (m1 - m0) / n * 1e6,
            "other_cpu_us_per_req": (o1 - o0) / n * 1e6,
            "cpu_us_per_req": (m1 - m0 + o1 - o0) / n * 1e6,
            "server_cpu_share": (m1 - m0 + o1 - o0) / wall, "peak_rss_mib": peak / 1024}


def run_echo(binary: Path, loop: str, sc: Scenario, seconds: float,
             cpu: list[int | None]) -> dict:
    server = Server(loop, sc)
    return measure(server, lambda s: loadgen(binary, server.port, sc, s, cpu), seconds)


def run_flood(binary: Path, loop: str, sc: Scenario, seconds: float,
              cpu: list[int | None]) -> dict:
    """One way: the load generator sends for `seconds`, the server counts
    what its protocol received; "requests" are datagrams received, "lost"
    those sent and never received (the kernel dropped them)."""
    server = Server(loop, sc)

    def drive(s: float) -> dict:
        before = server.received()
        r = loadgen(binary, server.port, sc, s, cpu)
        time.sleep(0.05)  # what is in flight still counts
        got = server.received() - before
        return {**r, "requests": got, "rps": got / max(r.get("seconds", s), 1e-9),
                "sent": r["requests"], "lost": max(r["requests"] - got, 0)}

    return measure(server, drive, seconds)


WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def is_stream_echo(sc: Scenario) -> bool:
    """A scenario the load generator drives over TCP without TLS: one whose
    traffic pattern --pattern chooses."""
    return not (sc.idle or sc.proc or sc.http or sc.udp or sc.tls or sc.storm)


def with_pattern(scenarios: list[Scenario], pattern: str) -> list[Scenario]:
    """The scenarios under --pattern: "edge" as they are, "level" with the
    stream echoes level-triggered, "both" with each stream echo twice."""
    if pattern == "edge":
        return scenarios
    out = []
    for sc in scenarios:
        if pattern == "both" or not is_stream_echo(sc):
            out.append(sc)
        if is_stream_echo(sc):
            out.append(dataclasses.replace(sc, name=f"{sc.name} [level]", pattern="level"))
    return out


def wrk(port: int, sc: Scenario, seconds: float, cpu: int | None) -> dict:
    """One wrk run (one thread, sc.connections connections, keep-alive) over
    https, parsed into the load generator's keys."""
    cmd = ["wrk", "-t1", f"-c{sc.connections}", f"-d{max(1, round(seconds))}s", "--latency",
           f"https://127.0.0.1:{port}/"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    out = proc.stdout
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or out}")
    result: dict = {"errors": 0, "connections": sc.connections}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(words[1])
        elif "requests in" in line:
            result["requests"] = int(words[0])
        elif words and words[0] in ("50%", "99%") and len(words) == 2:
            value = words[1]
            unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
            key = "p50_us" if words[0] == "50%" else "p99_us"
            result[key] = float(value[: -len(unit)]) * WRK_UNITS[unit]
        elif line.strip().startswith(("Socket errors:", "Non-2xx")):
            result["errors"] += sum(int(w.strip(",")) for w in words if w.strip(",").isdigit())
    if "rps" not in result or "requests" not in result:
        raise RuntimeError(f"cannot read wrk's output: {out!r}")
    return result


STORM_DEADLINE = 60.0  # seconds: a storm that takes longer fails its stragglers


def listen_overflows() -> int | None:
    """The kernel's count of connections its listen queues had no room for
    (TcpExtListenOverflows, machine-wide), or None where /proc does not
    say."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()
                 if ln.startswith("TcpExt:")]
        return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def run_storm(binary: Path, loop: str, sc: Scenario, cpus: list[int | None]) -> dict:
    """One storm: "seconds" from the first connect to the last close,
    "rps" connections per second, p50/p99 a connection's whole life, and
    "listen_overflows" the SYNs the kernel dropped meanwhile (each costs
    its client a second; machine-wide, so the count is the run's only on
    an otherwise quiet machine)."""
    server = Server(loop, sc)
    before = listen_overflows()
    r = measure(server, lambda s: loadgen(binary, server.port, sc, STORM_DEADLINE, cpus),
                STORM_DEADLINE)
    after = listen_overflows()
    if before is not None and after is not None:
        r["listen_overflows"] = after - before
    return r


def run_http(loop: str, sc: Scenario, seconds: float, cpus: list[int | None]) -> dict:
    server = Server(loop, sc)
    return measure(server, lambda s: wrk(server.port, sc, s, cpus[0]), seconds)


def run_proc(loop: str, sc: Scenario, seconds: float) -> dict:
    server = Server(loop, sc)
    return measure(server, server.run, seconds)


def run_idle(loop: str, sc: Scenario, seconds: float) -> dict:
    server = Server(loop, sc)
    socks: list[socket.socket] = []
    client_ctx = None
    if sc.tls:  # the handshake done and one echo each: the connection is in use
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
    try:
        time.sleep(0.2)
        base = status_kib(server.pid, "VmRSS")
        for _ in range(sc.connections):
            s = socket.socket()
            s.connect(("127.0.0.1", server.port))
            if client_ctx is not None:
                s = client_ctx.wrap_socket(s)
                s.sendall(b"x")
                s.recv(1)
            socks.append(s)
        time.sleep(1.0)  # let the server accept and settle
        rss = status_kib(server.pid, "VmRSS")
        m0, o0 = server.cpu()
        time.sleep(seconds)
        m1, o1 = server.cpu()
    finally:
        for s in socks:
            s.close()
        server.stop()
    return {"connections": sc.connections, "errors": 0,
            "rss_per_conn_kib": (rss - base) / sc.connections,
            "idle_cpu_pct": (m1 - m0 + o1 - o0) / seconds * 100}


# ---- the report ----------------------------------------------------------------

ECHO_KEYS = ("rps", "p50_us", "p99_us", "loop_cpu_us_per_req", "cpu_us_per_req", "peak_rss_mib")
IDLE_KEYS = ("rss_per_conn_kib", "idle_cpu_pct")
PROC_KEYS = ECHO_KEYS + ("max_gap_us",)
STORM_KEYS = ECHO_KEYS + ("seconds", "listen_overflows")
UDP_KEYS = ECHO_KEYS + ("lost",)


def keys_of(sc_or_median: Any) -> tuple[str, ...]:
    if isinstance(sc_or_median, Scenario):
        sc = sc_or_median
        return (IDLE_KEYS if sc.idle else PROC_KEYS if sc.proc else
                UDP_KEYS if sc.udp else STORM_KEYS if sc.storm else ECHO_KEYS)
    med = sc_or_median
    return (IDLE_KEYS if "rss_per_conn_kib" in med else PROC_KEYS if "max_gap_us" in med else
            UDP_KEYS if "lost" in med else STORM_KEYS if "seconds" in med else ECHO_KEYS)


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}


def times(r: float | None) -> str:
    """A ratio as the tables print it ("-" where there is none: one-way
    runs have no latency)."""
    return f"{r:.2f}x" if r is not None else "-"


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def vs_baseline(per_loop: dict[str, dict], loop: str, base: str) -> str:
    """One line: `loop`'s ratios to its baseline twin `base` in one scenario."""
    what = f"  {loop} vs {base}: "
    missing = [lp for lp in (loop, base) if lp not in per_loop]
    if missing:
        return what + f"- (no result for {' or '.join(missing)})"
    m, b = per_loop[loop]["median"], per_loop[base]["median"]

    def x(key: str) -> str:
        r = ratio(m[key], b[key]) if key in m and key in b else None
        return f"{r:.2f}x" if r is not None else "-"
    if "rss_per_conn_kib" in m:
        return what + (f"RSS/conn {x('rss_per_conn_kib')}, "
                       f"idle CPU {m['idle_cpu_pct']:.2f}% vs {b['idle_cpu_pct']:.2f}%")
    return what + (f"req/s {x('rps')}, p99 {x('p99_us')}, CPU/req {x('cpu_us_per_req')} "
                   f"(loop thread {x('loop_cpu_us_per_req')})")


def report(results: dict[str, dict[str, dict]], loops: list[str]) -> str:
    lines = []
    width = max([8] + [len(lp) for lp in loops])
    pairs = baseline_pairs(loops)
    for name, per_loop in results.items():
        keys = keys_of(next(iter(per_loop.values()))["median"])
        idle = keys is IDLE_KEYS
        lines.append(f"\n{name}")
        head = f"  {'loop':{width}}" + "".join(f"{k:>22}" for k in keys)
        if not idle:
            head += f"{'rps/uvloop':>12}{'rps/asyncio':>12}{'p99/uvloop':>12}"
        lines.append(head)
        for loop in loops:
            if loop not in per_loop:
                continue
            med = per_loop[loop]["median"]
            row = f"  {loop:{width}}" + "".join(f"{med.get(k, float('nan')):>22.2f}" for k in keys)
            if not idle:
                for base, key in (("uvloop", "rps"), ("asyncio", "rps"), ("uvloop", "p99_us")):
                    other = per_loop.get(base, {}).get("median", {}).get(key)
                    r = ratio(med[key], other) if other else None
                    row += f"{r:>12.2f}" if r is not None else f"{'-':>12}"
            lines.append(row)
        lines += [vs_baseline(per_loop, loop, base) for loop, base in pairs]
    return "\n".join(lines)


def markdown(results: dict[str, dict[str, dict]], loops: list[str]) -> str:
    """The README's form: one row per scenario, req/s per loop, and mtloop's
    ratios (req/s and p99 against uvloop; its loop thread's CPU per request
    against uvloop's whole process).  With a baseline, the same ratios for
    the baseline's twin, then the working tree's against the baseline
    (req/s, p99, the whole process's CPU per request)."""
    mt = next((lp for lp in loops if lp.startswith("mtloop") and not parse_loop(lp)[1]), None)
    pair = next(((lp, base) for lp, base in baseline_pairs(loops) if lp == mt), None)
    if pair is None and mt is None:
        mt = next((lp for lp in loops if lp.startswith("mtloop")), None)
    mts = list(pair) if pair else [mt] if mt else []
    head = ["scenario"] + [f"{lp} req/s" for lp in loops]
    if "uvloop" in loops:
        for m in mts:
            head += [f"{m}/uvloop req/s", f"{m}/uvloop p99",
                     "loop-thread CPU/req vs uvloop" if len(mts) == 1
                     else f"{m} loop-thread CPU/req vs uvloop"]
    if pair:
        head += [f"{pair[0]}/{pair[1]} req/s", f"{pair[0]}/{pair[1]} p99",
                 f"{pair[0]}/{pair[1]} CPU/req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    idle_rows = []
    for name, per_loop in results.items():
        med = {lp: d["median"] for lp, d in per_loop.items()}
        if "rss_per_conn_kib" in next(iter(med.values())):
            cells = [f"{med[lp]['rss_per_conn_kib']:.2f} KiB/conn, "
                     f"{med[lp]['idle_cpu_pct']:.2f}% CPU" if lp in med else "-" for lp in loops]
            if pair:
                r = (ratio(med[pair[0]]["rss_per_conn_kib"], med[pair[1]]["rss_per_conn_kib"])
                     if pair[0] in med and pair[1] in med else None)
                cells.append(f"{r:.2f}x" if r is not None else "-")
            idle_rows.append(f"| {name} | " + " | ".join(cells) + " |")
            continue
        row = [name] + [f"{med[lp]['rps']:,.0f}" if lp in med else "-" for lp in loops]
        against = [(m, "uvloop", "loop_cpu_us_per_req") for m in mts] if "uvloop" in loops else []
        against += [(pair[0], pair[1], "cpu_us_per_req")] if pair else []
        for m, b, cpu in against:
            if m in med and b in med:
                x, y = med[m], med[b]
                row += [times(ratio(x["rps"], y["rps"])), times(ratio(x["p99_us"], y["p99_us"])),
                        times(ratio(x[cpu], y["cpu_us_per_req"]))]
            else:
                row += ["-"] * 3
        lines.append("| " + " | ".join(row) + " |")
    if idle_rows:
        idle_head = loops + ([f"{pair[0]}/{pair[1]} RSS/conn"] if pair else [])
        lines += ["", "| idle | " + " | ".join(idle_head) + " |",
                  "|" + "---|" * (len(idle_head) + 1)]
        lines += idle_rows
    return "\n".join(lines)


def chart(results: dict[str, dict[str, dict]], loops: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    echo = {n: r for n, r in results.items()
            if "rps" in next(iter(r.values()))["median"] and "uvloop" in r}
    if not echo:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(echo) * len(loops) / 2), 4))
    width = 0.8 / len(loops)
    for i, loop in enumerate(loops):
        vals = [echo[n][loop]["median"]["rps"] / echo[n]["uvloop"]["median"]["rps"]
                if loop in echo[n] else 0 for n in echo]
        ax.bar([j + i * width for j in range(len(echo))], vals, width, label=loop)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + width * (len(loops) - 1) / 2 for j in range(len(echo))])
    ax.set_xticklabels(list(echo), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("requests/s relative to uvloop")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_cpus(spec: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the whole matrix")
    group.add_argument("--smoke", action="store_true", help="a few seconds, to see it runs")
    group.add_argument("--targets", action="store_true",
                       help="the scenarios issue #4 sets targets for")
    group.add_argument("--tls", action="store_true",
                       help="TLS echo and handshake scenarios (issue #10)")
    group.add_argument("--procs", action="store_true",
                       help="pipe throughput through cat and a spawn burst (issue #11)")
    group.add_argument("--udp", action="store_true",
                       help="datagram echo, 64 B and 1 KiB (issue #12)")
    group.add_argument("--storm", action="store_true",
                       help="10,000 clients at once, 100 KB echoed by each (issue #13)")
    group.add_argument("--scaling", action="store_true",
                       help="mtloop with 1, 2, 4 and 8 I/O threads beside asyncio and uvloop "
                            "(for a machine with many cores; use with --clients)")
    parser.add_argument("--loops", default="asyncio,uvloop,rloop,mtloop")
    parser.add_argument("--repeat", type=int, default=None, help="runs per loop (default 5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per run")
    parser.add_argument("-k", dest="pattern_filter", default=None,
                        help="only scenarios containing this")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "results.json")
    parser.add_argument("--clients", type=int, default=1,
                        help="load generators, pinned to the last CPUs (default 1)")
    parser.add_argument("--server-cpus", default=None,
                        help="CPUs for the servers, e.g. 0-9 (default: unpinned)")
    parser.add_argument("--loadgen", type=Path, default=None,
                        help="a built mtloop-loadgen (default: build it with CMake)")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the results as the README's markdown table")
    parser.add_argument("--report", type=Path, default=None,
                        help="print the report of an earlier run's JSON and exit")
    parser.add_argument("--fixed-heap", action="store_true",
                        help="fix glibc's heap thresholds for every server (see above)")
    parser.add_argument("--warmup", action="store_true",
                        help="drive each server once, unmeasured, before its measured run")
    parser.add_argument("--pattern", choices=("edge", "level", "both"), default="edge",
                        help="the load generator's traffic pattern for stream echoes "
                             "(default edge; both: each echo scenario both ways)")
    parser.add_argument("--baseline", metavar="REF", default=None,
                        help="also run mtloop as of git revision REF (built once into "
                             "build/bench-baseline/), interleaved, as mtloop@<sha>")
    args = parser.parse_args()

    if args.report is not None:
        saved = json.loads(args.report.read_text())
        order = [lp for lp in ("asyncio", "uvloop", "rloop") if any(
            lp in per for per in saved["results"].values())]
        order += sorted({lp for per in saved["results"].values() for lp in per} - set(order),
                        key=loop_order)
        if saved.get("baseline"):
            b = saved["baseline"]
            print(f"baseline: mtloop@{b['short']} = {b['sha']} ({b['ref']})")
        print(report(saved["results"], order))
        print()
        print(markdown(saved["results"], order))
        return 0
    if args.scaling and args.loops == parser.get_default("loops"):
        args.loops = "asyncio,uvloop,mtloop:1,mtloop:2,mtloop:4,mtloop:8"
    if args.fixed_heap:
        Server.env = {"MALLOC_TRIM_THRESHOLD_": str(64 * 1024 * 1024),
                      "MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024)}
    global WARMUP
    WARMUP = args.warmup
    if args.server_cpus:
        Server.cpus = parse_cpus(args.server_cpus)
    scenarios = (FULL if args.full else SMOKE if args.smoke else
                 SCALING if args.scaling else TARGETS if args.targets else
                 TLS if args.tls else PROCS if args.procs else UDP if args.udp else
                 STORM if args.storm else QUICK)
    if args.pattern_filter:
        scenarios = [s for s in scenarios if args.pattern_filter in s.name]
    scenarios = with_pattern(scenarios, args.pattern)
    if any(sc.http for sc in scenarios) and shutil.which("wrk") is None:
        log("bench: wrk is not on PATH; the HTTPS scenario is left out")
        scenarios = [s for s in scenarios if not s.http]
    repeat = args.repeat or (1 if args.smoke else 5)
    seconds = args.seconds or (0.5 if args.smoke else 1.0 if not args.full else 2.0)
    wanted = args.loops.split(",")
    if any("@" in lp for lp in wanted):
        parser.error("--loops: name a baseline with --baseline REF, not loop@REF")
    loops = available_loops(wanted)
    baseline = None
    if args.baseline:
        baseline = build_baseline(args.baseline)
        Server.baselines[baseline.short] = baseline.site
        loops = add_baseline(wanted, loops, baseline.short)
        log(f"bench: mtloop@{baseline.short} imports {baseline.mtloop_file}")
    raise_fd_limit()
    binary = build_loadgen(args.loadgen)
    certdir = None
    if any(sc.tls for sc in scenarios):
        certdir = tempfile.TemporaryDirectory(prefix="mtloop-bench-")
        Server.tls_files = make_certificate(Path(certdir.name))
    ncpu = os.cpu_count() or 1
    nclients = max(1, args.clients)
    client_cpus: list[int | None] = ([ncpu - nclients + i for i in range(nclients)]
                                     if ncpu > nclients else [None] * nclients)

    results: dict[str, dict[str, dict]] = {}
    total = len(scenarios) * repeat * len(loops)
    done = 0
    for sc in scenarios:
        runs: dict[str, list[dict]] = {loop: [] for loop in loops}
        for rep in range(repeat):
            # Interleaved, and rotated so no loop always runs first.
            order = loops[rep % len(loops):] + loops[:rep % len(loops)]
            for loop in order:
                done += 1
                try:
                    r = (run_idle(loop, sc, seconds) if sc.idle
                         else run_proc(loop, sc, seconds) if sc.proc
                         else run_http(loop, sc, seconds, client_cpus) if sc.http
                         else run_flood(binary, loop, sc, seconds, client_cpus) if sc.flood
                         else run_storm(binary, loop, sc, client_cpus) if sc.storm
                         else run_echo(binary, loop, sc, seconds, client_cpus))
                except Exception as exc:  # a failing loop must not hide the others
                    log(f"[{done}/{total}] {sc.name} {loop}: FAILED: {exc}")
                    continue
                runs[loop].append(r)
                unit = "conn" if sc.storm else UNITS.get(sc.mode, "req")
                took = (f"{r['seconds']:.2f} s, {r.get('listen_overflows', '?')} SYNs dropped, "
                        if sc.storm else "")
                summary = (f"{r['rss_per_conn_kib']:.1f} KiB/conn, {r['idle_cpu_pct']:.2f}% CPU"
                           if sc.idle else
                           f"{r['rps']:,.0f} {unit}/s, {took}p99 {r['p99_us']:.0f} us, "
                           f"errors {r['errors']}")
                log(f"[{done}/{total}] {sc.name} {loop}: {summary}")
        keys = keys_of(sc)
        results[sc.name] = {loop: {"median": medians(rs, keys), "runs": rs}
                            for loop, rs in runs.items() if rs}

    machine = {"cpus": ncpu, "platform": platform.platform(), "python": sys.version.split()[0],
               "client_cpus": client_cpus, "server_cpus": args.server_cpus,
               "malloc_trim_threshold": Server.env.get("MALLOC_TRIM_THRESHOLD_", "default"),
               "warmup": WARMUP, "pattern": args.pattern}
    text = report(results, loops)
    print(f"machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}; "
          f"medians of {repeat} interleaved runs of {seconds:g} s")
    if baseline:
        print(f"baseline: mtloop@{baseline.short} = {baseline.sha} ({baseline.ref}), "
              f"from {baseline.site.relative_to(ROOT)}")
    print(text)
    if args.markdown:
        print()
        print(markdown(results, loops))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    saved = {"machine": machine, "repeat": repeat, "seconds": seconds, "loops": loops,
             "results": results}
    if baseline:
        saved["baseline"] = {"ref": baseline.ref, "sha": baseline.sha, "short": baseline.short,
                             "loops": [lp for lp in loops if parse_loop(lp)[1]],
                             "site": str(baseline.site), "mtloop_file": baseline.mtloop_file,
                             "build_s": baseline.build_s}
    args.json.write_text(json.dumps(saved, indent=1))
    png = args.json.with_suffix(".png")
    drew = chart(results, loops, png)
    print(f"\nJSON: {args.json}" + (f"\nchart: {png}" if drew else ""))
    errors = sum(r.get("errors", 0) for per in results.values() for d in per.values()
                 for r in d["runs"])
    return 1 if errors or not results else 0


if __name__ == "__main__":
    sys.exit(main())
