"""Cold paths of the C core that are easier to get right in Python.

The C types call these by name (see src/pyext/module.c): formatting and
debug-mode bookkeeping, never anything on a per-callback hot path unless
debug mode is on.
"""

from __future__ import annotations

import sys
from asyncio import format_helpers
from typing import Any


def extract_stack() -> Any:
    """The creation traceback of a handle, ending at the caller of call_soon()."""
    # Frame 0 is this function; C frames do not appear, so frame 1 is the
    # Python code that called the loop method.
    return format_helpers.extract_stack(sys._getframe(1))


def handle_repr(handle: Any) -> str:
    info = [type(handle).__name__]
    if handle._cancelled:
        info.append("cancelled")
    if hasattr(handle, "_when"):
        info.append(f"when={handle._when}")
    if handle._callback is not None:
        info.append(format_helpers._format_callback_source(handle._callback, handle._args))
    tb = handle._source_traceback
    if tb:
        frame = tb[-1]
        info.append(f"created at {frame[0]}:{frame[1]}")
    return "<{}>".format(" ".join(info))


def log_warning(message: str) -> None:
    """A warning on the asyncio logger, as the stock loop logs it."""
    from asyncio.log import logger

    logger.warning(message)
