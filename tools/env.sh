# Shared set-up for the project's commands; sourced, not run.
#
# mt_setup_system   installs the Debian packages the build and the tests need (once)
# mt_setup_bench    installs what only the benchmark needs (wrk)
# mt_pythons        prints the interpreters of each supported Python found
# mt_venv_has_packages V / mt_venv_install_packages V: the Python packages in venv V
# mt_venv PY        creates/refreshes .venv-X.Y for PY and builds mtloop in it;
#                   prints the venv's directory on stdout (logs go to stderr)
# Every step is idempotent: rerunning costs only the checks.

MT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MT_SUPPORTED="3.11 3.12 3.13"
MT_PY_PACKAGES="scikit-build-core>=0.8 cmake>=3.18 ninja pytest>=7 uvloop>=0.19 trustme matplotlib uvicorn aiohttp redis hypercorn granian"

mt_log() { printf '[mtloop] %s\n' "$*" >&2; }

mt_setup_system() {
  local need=()
  command -v cc >/dev/null 2>&1 || need+=(build-essential)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  pkg-config --exists libevent_core 2>/dev/null || need+=(libevent-dev)
  pkg-config --exists cmocka 2>/dev/null || need+=(libcmocka-dev)
  pkg-config --exists libssl 2>/dev/null || need+=(libssl-dev)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # tests/test_integrations.py
  if ! ls /usr/lib/*/libtsan.so* >/dev/null 2>&1 && ! ls /usr/lib/gcc/*/*/libtsan.so >/dev/null 2>&1; then
    need+=(libtsan2)
  fi
  if [ -z "$(mt_pythons)" ]; then
    need+=(python3 python3-dev python3-venv)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    mt_log "installing system packages: ${need[*]}"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
  fi
}

# What only the benchmark needs: wrk, the HTTP client of its HTTPS scenario.
mt_setup_bench() {
  command -v wrk >/dev/null 2>&1 && return 0
  mt_log "installing system packages: wrk"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >&2
}

# One interpreter per supported version: on PATH, else under pyenv.
mt_pythons() {
  local v py
  for v in $MT_SUPPORTED; do
    py=""
    if command -v "python$v" >/dev/null 2>&1 && "python$v" -c pass >/dev/null 2>&1; then
      py=$(command -v "python$v")
    else
      for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
        [ -x "$cand" ] && py=$cand
      done
    fi
    [ -n "$py" ] && echo "$py"
  done
}

# Whether the venv V has every package of MT_PY_PACKAGES; installs them.
mt_venv_has_packages() {
  "$1/bin/python" -c 'import scikit_build_core, pytest, uvloop, trustme, ninja, cmake, matplotlib, uvicorn, aiohttp, redis, hypercorn, granian' \
    >/dev/null 2>&1
}

mt_venv_install_packages() {
  mt_log "installing Python packages into $1"
  "$1/bin/python" -m pip install -q --upgrade pip >&2
  "$1/bin/python" -m pip install -q $MT_PY_PACKAGES >&2
}

mt_venv() {
  local py=$1 ver venv
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv="$MT_ROOT/.venv-$ver"
  if [ ! -x "$venv/bin/python" ]; then
    mt_log "creating $venv"
    "$py" -m venv "$venv" >&2
  fi
  if ! mt_venv_has_packages "$venv"; then
    mt_venv_install_packages "$venv"
    # rloop is a benchmark reference only: used when it installs.
    "$venv/bin/python" -m pip install -q rloop >&2 ||
      mt_log "rloop did not install for Python $ver; the benchmark leaves it out"
  fi
  mt_log "building mtloop for Python $ver"
  (cd "$MT_ROOT" && "$venv/bin/python" -m pip install -q --no-build-isolation \
    -C cmake.define.MTLOOP_WERROR=ON . >&2) || return 1
  echo "$venv"
}
