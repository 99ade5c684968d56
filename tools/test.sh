#!/usr/bin/env bash
# Runs every test of mtloop on this machine, setting up what is missing:
#   1. the CMocka unit tests (ctest), in a plain, an ASan+UBSan and a TSan build;
#   2. the pytest suite (asyncio vs uvloop vs mtloop, and CPython's own
#      test_asyncio suites against mtloop) on every supported Python found,
#      with the wheel test (tools/wheel.sh) on the first;
#   3. mtloop's tests again with inline I/O (io_threads=0) on the first.
# Extra arguments go to pytest (e.g. --stress, -k pattern, -x).
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$MT_ROOT"

mt_setup_system
pythons=$(mt_pythons)
[ -n "$pythons" ] || { mt_log "no supported Python (3.11-3.13) found"; exit 1; }

first_venv=$(mt_venv "$(echo "$pythons" | head -n1)")
export PATH="$first_venv/bin:$PATH"   # cmake and ninja from the venv

for variant in plain address thread; do
  dir="build/ctest-$variant"
  sanitize=$([ "$variant" = plain ] && echo "" || echo "$variant")
  mt_log "C unit tests ($variant build)"
  cmake -S . -B "$dir" -G Ninja -DMTLOOP_BUILD_TESTS=ON -DMTLOOP_SANITIZE="$sanitize" >/dev/null
  cmake --build "$dir" >/dev/null
  (cd "$dir" && ctest --output-on-failure)
done

status=0
first_py=$(echo "$pythons" | head -n1)
for py in $pythons; do
  venv=$(mt_venv "$py")
  mt_log "pytest on $("$venv/bin/python" -V)"
  # The wheel test (tools/wheel.sh, a fresh virtualenv) once, on the first.
  wheel=()
  [ "$py" = "$first_py" ] && wheel=(--wheel)
  # The venv's pytest script, not "python -m pytest": that would put the
  # source tree (without the built extension) first on sys.path.
  "$venv/bin/pytest" -p no:cacheprovider "${wheel[@]}" "$@" || status=1
done

# Inline I/O (io_threads=0, the default on one CPU): every mtloop parameter
# and CPython's network suites again with the loop running its own I/O, on
# the first Python.  test_ssl is left out: it spends its minute on timeouts
# the stock loop's column waits out, and test_tls* already run inline here.
venv=$(mt_venv "$(echo "$pythons" | head -n1)")
mt_log "pytest, inline I/O (MTLOOP_IO_THREADS=0), on $("$venv/bin/python" -V)"
MTLOOP_IO_THREADS=0 "$venv/bin/pytest" -p no:cacheprovider -k "mtloop or network_suite" \
  --deselect "tests/test_cpython_suites.py::test_cpython_network_suite_has_no_regressions[test_ssl]" \
  "$@" || status=1
exit $status
