#!/usr/bin/env bash
# mtloop's main job, set up from scratch if needed: for now an echo server on
# mtloop driven by a client for a few seconds (tools/echo_demo.py); extra
# arguments go to it (--seconds, --connections, --size, --mode).
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$MT_ROOT"
mt_setup_system
venv=$(mt_venv "$(mt_pythons | sed -n 1p)")
exec "$venv/bin/python" tools/echo_demo.py "$@"
