"""The wheel tools/wheel.sh builds installs into a fresh virtualenv and
works there with the system's libevent hidden from the dynamic loader, the
bundled copy being the one loaded (issue #14).

It builds a wheel and a virtualenv, so it runs with --wheel only;
tools/test.sh passes that on the first Python."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_loadgen import REPO

pytestmark = pytest.mark.wheel

PROBE = r'''
import json, ssl, sys
import mtloop

async def echo():
    import asyncio
    async def handle(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    writer.write(b"wheel")
    got = await reader.read()
    writer.close()
    server.close()
    await server.wait_closed()
    return got.decode()

import os
maps = [line.split()[-1] for line in open("/proc/self/maps")
        if "libevent" in os.path.basename(line.split()[-1])]
print(json.dumps({"mtloop": mtloop.__file__, "libevent_files": sorted(set(maps)),
                  "echo": mtloop.run(echo()), "native_tls": mtloop.tls_stats()["available"]}))
'''


def system_libevent_files():
    """The system's libevent_core shared objects (the real files)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")
    found = set()
    for d in {Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), libdir}:
        if d.is_dir():
            found |= {p.resolve() for p in d.glob("libevent_core*.so*")}
    return sorted(found)


def test_wheel_bundles_libevent(tmp_path):
    dist = tmp_path / "dist"
    env = dict(os.environ, MT_WHEEL_DIST=str(dist), MT_WHEEL_PYTHON=sys.executable)
    built = subprocess.run([str(REPO / "tools" / "wheel.sh")], env=env, capture_output=True,
                           text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    wheels = list(dist.glob(f"mtloop-*-{tag}-{tag}-manylinux_*_x86_64.whl"))
    assert len(wheels) == 1, list(dist.iterdir())
    bundled = (dist / "BUNDLED.txt").read_text()
    assert "mtloop.libs/libevent_core" in bundled, bundled
    assert "libssl" not in bundled and "libcrypto" not in bundled, bundled

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr

    hidden = system_libevent_files()
    assert hidden, "no system libevent_core to hide (tools/env.sh installs it)"
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to hide the system's libevent")
    # A private mount namespace in which every system libevent_core file is
    # an empty file: only the wheel's own copy can load.
    mounts = " && ".join(f"mount --bind /dev/null {p}" for p in hidden)
    script = f'{mounts} && exec "$0" -c "$1"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(py), PROBE],
                           capture_output=True, text=True, timeout=120, cwd="/")
    if probe.returncode != 0 and "mount" in probe.stderr and "permission" in probe.stderr.lower():
        pytest.fail("cannot make a mount namespace here to hide libevent: " + probe.stderr)
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    site = venv.resolve()
    assert Path(facts["mtloop"]).resolve().is_relative_to(site), facts
    assert facts["libevent_files"], facts
    for path in facts["libevent_files"]:
        assert Path(path).resolve().is_relative_to(site), facts
        assert "mtloop.libs" in path, facts
    assert facts["echo"] == "wheel"
    # OpenSSL stays the system's, shared with the ssl module: native TLS holds.
    assert facts["native_tls"] is True, facts
