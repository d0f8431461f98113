"""Accept ahead: keep several requests for the next call of each method open in gRPC core.

grpc.aio's server asks core for a method's next call one request at a time. It asks, waits for the
answer to come back through the event loop, starts the call, and only then asks again. Under load
the event loop is busy, so each new call waits a turn or more of the loop before it is even
started: under load a call spends most of its time in that queue rather than being handled, and
the group-commit statements carry few payments each (docs/performance.md). Here `depth` more requests per method of the payments service are kept open, each in
a task of its own, so calls that arrive together are started together. A call taken here starts
exactly as one that grpc.aio takes: grpc's own `_handle_rpc` runs it, with the same method
handlers, each already wrapped by its guard (authentication, the call log: `GuardedRegistration`).

This reaches into grpc's private Cython module (it is written against the version in
requirements.lock). At start every piece it needs is checked. When one is missing or has another
shape, accept-ahead stays off with a warning, and the server runs on grpc.aio's own loop alone, as
it would without this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc
import structlog

log = structlog.get_logger("payments.server")

# the parameters of the private functions used, as the pinned grpcio has them
_HANDLE_RPC_ARGS = ("method_name", "method_resolver", "interceptors", "rpc_state", "loop", "concurrency_exceeded")
_SCHEDULE_RPC_ARGS = ("rpc_coro", "rpc_state", "loop", "method_name")


def _parameters(fn: object) -> tuple[str, ...]:
    code = getattr(fn, "__code__", None)
    return tuple(code.co_varnames[:code.co_argcount]) if code is not None else ()


def _missing_internals(server: grpc.aio.Server) -> str:
    """Why accept-ahead cannot run on this grpcio (empty when it can)."""
    try:
        from grpc._cython import cygrpc
    except ImportError as exc:
        return f"grpc's Cython module did not import: {exc}"
    core = getattr(server, "_server", None)
    if core is None or not hasattr(core, "_request_registered_call"):
        return "grpc.aio's server has no _request_registered_call"
    for name in ("_MethodResolver", "_RequestCallError"):
        if not hasattr(cygrpc, name):
            return f"grpc has no {name}"
    if _parameters(getattr(cygrpc, "_handle_rpc", None)) != _HANDLE_RPC_ARGS:
        return "grpc's _handle_rpc is missing or takes other parameters"
    if _parameters(getattr(cygrpc, "_schedule_rpc_coro", None)) != _SCHEDULE_RPC_ARGS:
        return "grpc's _schedule_rpc_coro is missing or takes other parameters"
    return ""


class AcceptAhead:
    """Registered with alongside the server (`GuardedRegistration`), it keeps the service's method
    handlers; once the server has started, it keeps `depth` requests open for the next call of each."""

    def __init__(self, depth: int):
        self.depth = depth
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}  # "/package.Service/Method" -> handler
        self.unavailable = ""  # why it is off, when it is
        self.accepted = 0  # calls started here, not by grpc.aio's own loop
        self._acceptors: set[asyncio.Task] = set()
        self._calls: set[asyncio.Task] = set()  # the event loop holds tasks weakly: held here
        self._stopping = False

    # -- as the generated registration function sees a server
    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The generic form of the same handlers: not needed here."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self.handlers[f"/{service}/{method}"] = handler

    # -- running
    @property
    def open_requests(self) -> int:
        return sum(not task.done() for task in self._acceptors)

    def start(self, server: grpc.aio.Server) -> None:
        """After `server.start()`; the handlers must be those registered with the server (the server
        has no interceptors: each handler is guarded itself)."""
        if self.depth <= 0:
            self.unavailable = "turned off (PAYMENTS_GRPC_ACCEPT_AHEAD=0)"
            return
        why = _missing_internals(server)
        if why:
            self.unavailable = why
            log.warning("accept-ahead is off: grpc.aio accepts calls on its own", reason=why)
            return
        from grpc._cython import cygrpc

        resolver = cygrpc._MethodResolver([], dict(self.handlers))
        loop = asyncio.get_running_loop()
        for method in self.handlers:
            for _ in range(self.depth):
                task = loop.create_task(self._accept(server._server, method, resolver, loop))
                self._acceptors.add(task)

    async def _accept(self, core, method: str, resolver, loop: asyncio.AbstractEventLoop) -> None:  # noqa: ANN001
        from grpc._cython import cygrpc

        method_bytes = method.encode()
        while not self._stopping:
            try:
                rpc_state = await core._request_registered_call(method_bytes)
            except cygrpc._RequestCallError:
                return  # the server is shutting down: core fails every open request
            except Exception as exc:  # noqa: BLE001 - one request fewer; grpc.aio's own loop still accepts
                if not self._stopping:
                    log.warning("accept-ahead request failed", method=method, error=repr(exc))
                return
            self.accepted += 1
            call = loop.create_task(cygrpc._schedule_rpc_coro(
                cygrpc._handle_rpc(method, resolver, (), rpc_state, loop, False), rpc_state, loop, method))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """After the server's stop (core has failed every open request by then, and every call
        has finished or been cancelled): wait for the acceptors to end."""
        self._stopping = True
        if not self._acceptors:
            return
        _, pending = await asyncio.wait(self._acceptors, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._acceptors.clear()
