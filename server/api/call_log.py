"""The line every call writes: method, principal, status, duration and request id, as JSON like
every other log line (server/logs.py, `configure_logging`), but built here directly, held, and written
once per turn of the event loop: under load one write carries the lines of many calls. The lines are
held here rather than in the stream's buffer because a stream may have none (with PYTHONUNBUFFERED
set, as container images often do, every write is a system call). Through structlog's processor
chain, flushed per line, the line was a large share of a call's server CPU (docs/performance.md).
Never a token: only these fields. A status that means a bug (INTERNAL, UNKNOWN, DATA_LOSS) is at
level error, every other at info."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from datetime import UTC, datetime

_string = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it (ASCII)
_local = threading.local()  # each thread's lines since its last flush (a server per event loop, a loop per thread)


def _held_here() -> list[str]:
    try:
        return _local.held
    except AttributeError:
        _local.held = []
        return _local.held


_stream = None  # where the lines go: set by `configure` (the server's stdout), else `sys.stdout` at first use


def configure(stream) -> None:  # noqa: ANN001 - a text stream
    """Write the lines to `stream`, fixed once: a caller that swaps `sys.stdout` later (a command
    run in-process) does not catch the server's lines."""
    global _stream
    _stream = stream


def write_call_line(method: str, principal: str | None, status: str, duration_ms: float, request_id: str,
                    level: str = "info") -> None:
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # what json.dumps writes for this dict, key for key, with only the strings encoded: cheaper than
    # json.dumps on the hot path
    line = (f'{{"method": {_string(method)}, "principal": {"null" if principal is None else _string(principal)}, '
            f'"status": {_string(status)}, "duration_ms": {float(duration_ms)!r}, "request_id": {_string(request_id)}, '
            f'"event": "rpc", "level": "{level}", "timestamp": "{stamp}"}}\n')
    held = _held_here()
    held.append(line)
    if len(held) > 1:
        return  # the write of this turn is already due
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop: at once
        flush()
        return
    loop.call_soon(flush)


def flush() -> None:
    """Write the lines this thread holds, in one write (at the end of each turn of its event loop;
    the server calls it once more as it stops)."""
    global _stream
    held = _held_here()
    if not held:
        return
    text = "".join(held)
    held.clear()
    out = _stream
    if out is None:  # not configured (a server run in-process): fixed at first use, as structlog does
        out = _stream = sys.stdout
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):  # stdout closed or gone: nothing to do about a log line
        pass
