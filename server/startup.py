"""What every command that starts a part checks first: a free port (one clear line rather than a
library's traceback or log lines), and the version it reports."""

from __future__ import annotations

import errno
import socket
from importlib import metadata as package_metadata

from server.config import split_addr


class StartupError(Exception):
    """A part cannot start (a busy port, an unreachable database): its message is the one line logged."""


def version() -> str:
    try:
        return package_metadata.version("cobalt-payments")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def ensure_port_free(addr: str, setting: str) -> None:
    """A busy port is one clear StartupError here, before grpc tries it (and logs its own lines)."""
    host, port = split_addr(addr)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{setting}={addr}: the host cannot be resolved ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"{setting}={addr}: the port is in use (is another server running there?)"
                                       ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(f"{setting}={addr}: this machine has no such address") from None
                raise StartupError(f"{setting}={addr}: cannot listen there ({exc.strerror})") from None
