"""What a new user meets first: `python -m mtloop`, and a build that says
what is missing or lets a compiler's extra warnings through (issue #14)."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mtloop

from test_loadgen import REPO, _tool

TIMEOUT = 120


def mtloop_main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mtloop", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, cwd="/")


def test_version():
    proc = mtloop_main("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mtloop {mtloop.__version__}"


def test_info_tells_what_this_installation_does_here():
    proc = mtloop_main("info", "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    tls = mtloop.tls_stats()
    assert facts["mtloop"] == mtloop.__version__
    assert facts["libevent"] == mtloop.libevent_version()
    assert facts["default_io_threads"] == mtloop.default_io_threads()
    assert facts["native_tls"] is tls["available"]
    assert facts["native_tls_unavailable_reason"] == tls["unavailable_reason"]
    assert Path(facts["extension"]).parent == Path(mtloop.__file__).parent
    # The table form says the same things, one per line.
    table = mtloop_main("info")
    assert table.returncode == 0, table.stderr
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in table.stdout.splitlines()}
    assert lines["libevent"] == mtloop.libevent_version()
    assert lines["default_io_threads"] == str(mtloop.default_io_threads())


def test_info_follows_the_environment():
    env = dict(os.environ, MTLOOP_IO_THREADS="0")
    facts = json.loads(mtloop_main("info", "--json", env=env).stdout)
    assert facts["default_io_threads"] == 0
    assert facts["MTLOOP_IO_THREADS"] == "0"
    assert facts["default_io_mode"].startswith("inline")


def test_no_command_is_a_usage_error():
    proc = mtloop_main()
    assert proc.returncode == 2
    assert "info" in proc.stdout


def cmake_configure(build, *defines, env=None):
    cmake = _tool("cmake")
    if cmake is None:
        pytest.fail("cmake not found on PATH nor next to %s" % sys.executable)
    cmd = [cmake, "-S", str(REPO), "-B", str(build), *defines]
    ninja = _tool("ninja")
    if ninja is not None:
        cmd += ["-G", "Ninja", "-DCMAKE_MAKE_PROGRAM=" + ninja]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=env)


def test_missing_libevent_names_the_package(tmp_path):
    """With no libevent for pkg-config to find, configuring fails with a
    message naming the package to install, not CMake's bare module error."""
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(tmp_path / "empty"),
               PKG_CONFIG_PATH=str(tmp_path / "empty"))
    proc = cmake_configure(tmp_path / "build", env=env)
    assert proc.returncode != 0
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "libevent 2.1 or newer" in out
    assert "apt-get install libevent-dev" in out


def test_pip_builds_let_extra_warnings_through(tmp_path):
    """pip's builds (pyproject.toml's defines) do not turn warnings into
    errors: the core builds with a warning flag our sources do not satisfy.
    CMake's own default (development, CI) does, and fails on it."""
    defines = tomllib.loads((REPO / "pyproject.toml").read_text())
    werror = defines["tool"]["scikit-build"]["cmake"]["define"]["MTLOOP_WERROR"]
    cmake = _tool("cmake")
    flags = "-DCMAKE_C_FLAGS=-Wpadded"  # our structs have padding, by choice
    results = {}
    for name, extra in (("pip", [f"-DMTLOOP_WERROR={werror}"]), ("cmake", [])):
        build = tmp_path / name
        proc = cmake_configure(build, flags, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        built = subprocess.run([cmake, "--build", str(build), "--target", "mtloop_core"],
                               capture_output=True, text=True, timeout=300)
        results[name] = built
    assert results["pip"].returncode == 0, results["pip"].stdout[-3000:]
    assert "-Wpadded" in results["pip"].stdout
    assert results["cmake"].returncode != 0
    assert "-Werror" in results["cmake"].stdout or "error:" in results["cmake"].stdout


def test_metadata_is_true_to_what_is_tested():
    """The installed metadata carries the license file, and its Python
    classifiers are the versions tools/env.sh tests (MT_SUPPORTED)."""
    from importlib import metadata

    meta = metadata.metadata("mtloop")
    assert meta["Version"] == mtloop.__version__
    files = [str(f) for f in metadata.files("mtloop")]
    assert any(f.endswith("LICENSE") for f in files), files
    env_sh = (REPO / "tools" / "env.sh").read_text()
    supported = next(line for line in env_sh.splitlines() if line.startswith("MT_SUPPORTED="))
    tested = set(supported.split("=", 1)[1].strip('"').split())
    prefix = "Programming Language :: Python :: 3."
    declared = {c.rsplit(" ", 1)[1] for c in meta.get_all("Classifier") if c.startswith(prefix)}
    assert declared == tested
    assert f">={min(tested, key=lambda v: tuple(map(int, v.split('.'))))}" == \
        meta["Requires-Python"]
