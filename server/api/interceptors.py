"""Cross-cutting work, done once for every call by a guard around each handler of the payments service
(wrapped at registration: `GuardedRegistration`): authentication and roles, the bound on calls in flight,
the check of every string field of the request (server.api.request_check), a request id, error mapping,
the call metrics, and one structured log line (method, principal, status, duration). Never a token.

The request id is the caller's `x-request-id` (the bridge forwards the one of its HTTP request), or one
made here. It goes back in the trailing metadata of every answer, refusals and errors included, and in
the initial metadata of a stream; it is in the call's log line and bound to every other line logged
while the call runs."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import time

import grpc
import structlog

from server import deadlines, metrics
from server.api.auth import SERVICE, Authenticator, Principal, allowed
from server.api.call_limits import InFlight
from server.api.call_log import write_call_line
from server.api.errors import to_status
from server.api.request_check import check_request
from server.domain.errors import DomainError
from server.ledger import db_errors

log = structlog.get_logger("payments.rpc")

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")

_PREFIX = f"/{SERVICE}/"
DEFAULT_MAX_IN_FLIGHT = 256


class GuardedRegistration:
    """Stands in for the gRPC server in the generated `add_PaymentsServiceServicer_to_server`: each
    method handler of the payments service is wrapped by its guard there, once, and only the
    wrapped handlers reach the server (and `also`, such as accept-ahead). There is no other way for
    a call to reach a handler, so every call is authenticated and logged; and no per-call
    interceptor runs (grpc's interceptor machinery costs server CPU on every call)."""

    def __init__(self, server, authenticator: Authenticator, *, also=(),  # noqa: ANN001
                 in_flight: InFlight | None = None):
        self._targets = (server, *also)
        self._auth = authenticator
        self._in_flight = in_flight or InFlight(DEFAULT_MAX_IN_FLIGHT)
        self.wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The unwrapped generic form: replaced by the wrapped one in `add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        assert f"/{service}/" == _PREFIX, f"only the payments service is guarded here, not {service}"
        wrapped = {method: _wrap(_Guard(method, self._auth, self._in_flight), handler)
                   for method, handler in handlers.items()}
        self.wrapped.update({f"/{service}/{method}": handler for method, handler in wrapped.items()})
        for target in self._targets:
            target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            target.add_registered_method_handlers(service, wrapped)


def _wrap(guard: _Guard, handler):  # noqa: ANN001, ANN202
    guard.metrics = metrics.CallMetrics(SERVICE, guard.method, "unary" if handler.unary_unary else "server_stream")
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            guard.wrap_unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            guard.wrap_stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"{guard.method}: only unary and server-streaming methods are guarded")


REQUEST_ID = "x-request-id"
MAX_REQUEST_ID_CHARS = 128  # a caller's id longer than this is replaced, not echoed
_ERROR_STATUSES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})  # a bug or worse: logged at error level
_request_numbers = itertools.count(1)
_PROCESS_TAG = os.urandom(4).hex()  # request ids are unique across processes and restarts


def _new_request_id() -> str:
    return f"{_PROCESS_TAG}{next(_request_numbers):08x}"


def _usable_request_id(value: str | None) -> str | None:
    """A caller's request id, if it is short printable ASCII (it is echoed and logged)."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
        return value
    return None


class _Call:
    """One call of a method: who made it, whether it is refused, its request id."""

    __slots__ = ("method", "principal", "refusal", "request_id", "metadata")

    def __init__(self, method: str, principal: Principal | None, refusal, request_id: str):  # noqa: ANN001
        self.method = method
        self.principal = principal
        self.refusal = refusal
        self.request_id = request_id
        self.metadata = ((REQUEST_ID, request_id),)  # what goes back to the caller


class _Guard:
    """Authentication, roles, the bound on calls in flight, error mapping and the log line around
    one method's behaviour."""

    def __init__(self, method: str, authenticator: Authenticator, in_flight: InFlight):
        self.method = method
        self._auth = authenticator
        self._in_flight = in_flight
        self.metrics: metrics.CallMetrics | None = None

    def _begin(self, context) -> _Call:  # noqa: ANN001
        authorization = request_id = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
            elif key == REQUEST_ID:
                request_id = _usable_request_id(value)
        principal = self._auth.principal_for(authorization)
        refusal: tuple[grpc.StatusCode, str] | None = None
        if principal is None:
            refusal = (grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        elif not allowed(principal.role, self.method):
            refusal = (grpc.StatusCode.PERMISSION_DENIED, f"role {principal.role} may not call {self.method}")
        return _Call(self.method, principal, refusal, request_id or _new_request_id())

    @staticmethod
    async def _enter(call: _Call, context) -> None:  # noqa: ANN001
        context.set_trailing_metadata(call.metadata)
        if call.refusal is not None:
            await context.abort(*call.refusal, call.metadata)
        assert call.principal is not None
        current_principal.set(call.principal)
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        deadlines.note(context)
        if deadlines.expired(deadlines.current()):  # it waited for the event loop past its deadline
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call started",
                                call.metadata)

    @staticmethod
    def _keep_request_id(call: _Call, context) -> None:  # noqa: ANN001
        """A handler that set trailing metadata of its own (an idempotent replay) keeps the request id."""
        held = context.trailing_metadata()
        if held is not call.metadata and call.metadata[0] not in held:
            context.set_trailing_metadata((*held, *call.metadata))

    @staticmethod
    async def _fail(call: _Call, context, exc: Exception) -> None:  # noqa: ANN001
        """A DomainError becomes its status, and so does a database failure that means one (a lost
        database: UNAVAILABLE); an abort already under way goes on; anything else is logged once,
        with its traceback, and the caller gets INTERNAL with the request id."""
        if _is_abort(exc):
            raise exc
        mapped = exc if isinstance(exc, DomainError) else db_errors.classify(exc)
        if mapped is not None:  # a database error escaping a unit of work is mapped all the same
            status = to_status(mapped)
            await context.abort(status.code, status.details, (*status.trailing_metadata, *call.metadata))
        log.exception("unhandled error", method=call.method, request_id=call.request_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {call.request_id})",
                            call.metadata)

    def _log(self, call: _Call, context, started: float, cancelled: bool = False,  # noqa: ANN001
             answered: bool = False) -> None:
        """The call's log line and metrics. `answered`: the behaviour returned its response (no
        handler sets a status of its own), so the status is OK without asking the context."""
        if answered:
            name = "OK"
        else:
            code = context.code()
            if cancelled or (code is None and context.cancelled()):
                name = "CANCELLED"  # the caller went away or its deadline passed
            else:
                name = code.name if isinstance(code, grpc.StatusCode) else ("OK" if code is None else str(code))
        duration_s = time.perf_counter() - started
        write_call_line(call.method, call.principal.name if call.principal else None, name,
                        round(duration_s * 1000, 2), call.request_id,
                        "error" if name in _ERROR_STATUSES else "info")
        if self.metrics is not None:
            self.metrics.observe(name, duration_s)

    def wrap_unary(self, behavior):  # noqa: ANN001
        async def unary(request, context):  # noqa: ANN001
            started = time.perf_counter()
            call = self._begin(context)
            answered = False
            # Unary calls only are bounded: a stream (Subscribe) is held open for hours by design.
            entered = call.refusal is None and self._in_flight.try_enter()
            if call.refusal is None and not entered:
                call.refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the server has {self._in_flight.limit} calls in flight; retry shortly")
            try:
                await self._enter(call, context)
                try:
                    check_request(request)
                    response = await behavior(request, context)
                    answered = True
                    self._keep_request_id(call, context)
                    return response
                except Exception as exc:  # noqa: BLE001 - mapped to a status; aborts pass through
                    await self._fail(call, context, exc)
            finally:
                if entered:
                    self._in_flight.leave()
                self._log(call, context, started, answered=answered)

        return unary

    def wrap_stream(self, behavior):  # noqa: ANN001
        async def stream(request, context):  # noqa: ANN001
            started = time.perf_counter()
            call = self._begin(context)
            cancelled = False
            try:
                await self._enter(call, context)
                await context.send_initial_metadata(call.metadata)
                try:
                    check_request(request)
                    async for item in behavior(request, context):
                        yield item
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status; aborts pass through
                    await self._fail(call, context, exc)
            finally:
                self._log(call, context, started, cancelled)

        return stream


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ in ("AbortError", "UsageError") or isinstance(exc, grpc.RpcError)
