"""The benchmark instrument runs end to end (tools/bench.py --smoke).

A smoke test only: it starts each loop's echo server, drives it with the C
load generator, samples /proc, and writes parseable JSON.  It checks that
the numbers exist and that every echoed byte was right (errors == 0), never
how fast anything was.
"""

import json
import pathlib
import subprocess
import sys

import mtloop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--smoke",
         "--loops", "asyncio,mtloop", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    results = data["results"]
    echo = results["protocol 1KiB x4"]
    for loop in ("asyncio", "mtloop"):
        med = echo[loop]["median"]
        assert med["rps"] > 0 and med["cpu_us_per_req"] > 0
        assert med["p50_us"] <= med["p99_us"]
        assert all(r["errors"] == 0 and r["requests"] > 0 for r in echo[loop]["runs"])
        idle = results["idle x50"][loop]["median"]
        assert idle["rss_per_conn_kib"] >= 0 and idle["idle_cpu_pct"] >= 0
        storm = results["storm 10KB x50"][loop]
        assert all(r["errors"] == 0 and r["requests"] == 50 and r["storm"]
                   for r in storm["runs"])
        assert storm["median"]["seconds"] > 0
        assert all(r.get("listen_overflows", 0) >= 0 for r in storm["runs"])
    # mtloop's I/O threads did the socket work: its servers have CPU outside
    # the loop thread, the stock loop's none to speak of.  Inline ($MTLOOP_IO_THREADS
    # 0, or one CPU) the loop thread is the only one.
    med = echo["mtloop"]["median"]
    if mtloop.default_io_threads() == 0:
        assert med["cpu_us_per_req"] >= med["loop_cpu_us_per_req"]
    else:
        assert med["cpu_us_per_req"] > med["loop_cpu_us_per_req"]
    assert "rps/uvloop" in proc.stdout or "protocol 1KiB x4" in proc.stdout


def run_short(tmp_path, *args):
    """bench.py with `args`, one 0.3 s run per loop (asyncio and mtloop): the
    results by scenario, then loop."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), *args, "--repeat", "1",
         "--seconds", "0.3", "--loops", "asyncio,mtloop", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())["results"]


def runs_of(results, scenarios):
    """Every run of those scenarios, for both loops; each must have some."""
    runs = [r for name in scenarios for loop in ("asyncio", "mtloop")
            for r in results[name][loop]["runs"]]
    assert len(runs) >= 2 * len(scenarios)
    return runs


def test_bench_patterns_smoke(tmp_path):
    """--pattern both runs an echo scenario with each of the load generator's
    traffic patterns, every echoed byte right; --fixed-heap and --warmup (the
    earlier defaults) still run, and the JSON says how it was measured."""
    out = tmp_path / "results.json"
    results = run_short(tmp_path, "-k", "protocol 1KiB x32", "--pattern", "both")
    runs = runs_of(results, ["protocol 1KiB x32", "protocol 1KiB x32 [level]"])
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in runs)
    assert {r["pattern"] for r in runs} == {"edge", "level"}
    machine = json.loads(out.read_text())["machine"]
    assert (machine["warmup"], machine["malloc_trim_threshold"]) == (False, "default")
    run_short(tmp_path, "-k", "protocol 1KiB x32", "--fixed-heap", "--warmup")
    machine = json.loads(out.read_text())["machine"]
    assert machine["warmup"] and machine["malloc_trim_threshold"] != "default"


def test_bench_tls_smoke(tmp_path):
    """The TLS scenarios run: servers with a certificate made for the run, the
    load generator speaking TLS, every echoed byte right."""
    results = run_short(tmp_path, "--tls", "-k", "tls 1KiB x32")
    runs = runs_of(results, ["tls 1KiB x32"])
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in runs)


def test_bench_procs_smoke(tmp_path):
    """The subprocess scenarios run: bytes through cat come back whole, every
    child of the burst exits 0, and the stall figures exist."""
    results = run_short(tmp_path, "--procs")
    runs = runs_of(results, ["pipe through cat", "spawn burst x500"])
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in runs)
    assert all(0 < r["p50_us"] <= r["max_gap_us"] for r in runs)


def test_bench_udp_smoke(tmp_path):
    """The datagram scenarios run: every echoed datagram right, loss counted;
    one way, the server received some of what was sent, and no more."""
    results = run_short(tmp_path, "--udp")
    runs = runs_of(results, ["udp echo 64B x32", "udp echo 1KiB x32"])
    assert all(r["errors"] == 0 and r["requests"] > 0 and "lost" in r for r in runs)
    oneway = runs_of(results, ["udp receive 64B x32"])
    assert all(r["errors"] == 0 and 0 < r["requests"] <= r["sent"] for r in oneway)
