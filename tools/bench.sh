#!/usr/bin/env bash
# mtloop's main job, set up from scratch if needed: the side-by-side benchmark
# (tools/bench.py: asyncio, uvloop, rloop when importable, and mtloop, driven
# by the C load generator; quick set by default, about a minute).  Extra
# arguments go to it (--full, --smoke, -k PATTERN, --repeat N, --seconds S,
# --baseline REF).
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$MT_ROOT"
mt_setup_system
mt_setup_bench
venv=$(mt_venv "$(mt_pythons | sed -n 1p)")
exec "$venv/bin/python" tools/bench.py "$@"
