"""``python -m mtloop --version`` and ``python -m mtloop info``: what this
installation is and what it will do here, for bug reports and for checking
a deployment."""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import sys
from typing import Any

from . import __version__, _mtloop, default_io_threads, libevent_version, tls_stats


def info() -> dict[str, Any]:
    """The facts `python -m mtloop info` prints."""
    tls = tls_stats()
    threads = default_io_threads()
    return {
        "mtloop": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "libevent": libevent_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "cpus_usable": _mtloop.cpus_usable(),
        "default_io_threads": threads,
        "default_io_mode": "inline (on the loop thread)" if threads == 0 else "I/O threads",
        "MTLOOP_IO_THREADS": os.environ.get("MTLOOP_IO_THREADS"),
        "native_tls": tls["available"],
        "native_tls_unavailable_reason": tls["unavailable_reason"],
        "extension": _mtloop.__file__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtloop",
                                     description="mtloop, an asyncio event loop with its "
                                     "socket I/O on libevent I/O threads")
    parser.add_argument("--version", action="version", version=f"mtloop {__version__}")
    sub = parser.add_subparsers(dest="command")
    cmd = sub.add_parser("info", help="the version, libevent's, the I/O thread default and "
                         "whether native TLS is available here")
    cmd.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    if args.command != "info":
        parser.print_help()
        return 2
    facts = info()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
