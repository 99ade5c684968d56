#!/usr/bin/env bash
# Builds the extension with a sanitizer and runs the pytest suite's mtloop
# tests against it:
#   tools/sanitize.sh address [pytest args...]   # AddressSanitizer + UBSan
#   tools/sanitize.sh thread  [pytest args...]   # ThreadSanitizer
# CPython itself is not instrumented, so the sanitizer runtime is preloaded.
# Any sanitizer report fails the run (halt_on_error / exitcode).  The venv
# lives in build/venv-<kind>, the build in build/<kind>-ext.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$MT_ROOT"

kind=${1:-}
case "$kind" in
  address) preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" ;;
  thread) preload="$(gcc -print-file-name=libtsan.so)" ;;
  *) echo "usage: $0 address|thread [pytest args...]" >&2; exit 2 ;;
esac
shift

mt_setup_system
py=$(mt_pythons | sed -n 1p)
[ -n "$py" ] || { mt_log "no supported Python (3.11-3.13) found"; exit 1; }
venv="$MT_ROOT/build/venv-$kind"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv" >&2
mt_venv_has_packages "$venv" || mt_venv_install_packages "$venv"
mt_log "building mtloop with MTLOOP_SANITIZE=$kind"
"$venv/bin/python" -m pip install -q --no-build-isolation . \
  -Ccmake.define.MTLOOP_SANITIZE="$kind" -Ccmake.define.MTLOOP_WERROR=ON \
  -Cbuild-dir="build/$kind-ext" >&2

# Leak checking is off: CPython's own allocations at exit would drown it.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# die_after_fork=0: the fork tests start the pool again in the child of a
# threaded parent, which TSan refuses by default (it cannot vouch for locks
# held across the fork; mtloop's child touches none of the parent's).
export TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:die_after_fork=0"
# uvloop's parameters stay out: under TSan libuv's worker thread races
# CPython's own fds (a write to a socketpair), which is not mtloop's to fix.
mt_log "pytest (mtloop tests) under $kind sanitizer"
LD_PRELOAD="$preload" "$venv/bin/pytest" -p no:cacheprovider -q \
  -k "mtloop or test_runtime or test_multiloop or (test_tls_native and not uvloop) or test_spin" \
  --deselect tests/test_cpython_suites.py "$@"
