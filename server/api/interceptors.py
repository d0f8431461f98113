"""Cross-cutting work, done once for every call: authentication and roles, a request id, error
mapping, and one structured log line (method, principal, status, duration). Never a token."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid

import grpc
import structlog

from server.api.auth import SERVICE, Authenticator, Principal, allowed
from server.api.errors import to_status
from server.domain.errors import DomainError

log = structlog.get_logger("payments.rpc")

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")

_PREFIX = f"/{SERVICE}/"


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator):
        self._auth = authenticator

    async def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or not full_method.startswith(_PREFIX):
            return handler  # health and reflection are open
        method = full_method[len(_PREFIX):]
        metadata = dict(handler_call_details.invocation_metadata or ())
        principal = self._auth.principal_for(metadata.get("authorization"))
        refusal: tuple[grpc.StatusCode, str] | None = None
        if principal is None:
            refusal = (grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        elif not allowed(principal.role, method):
            refusal = (grpc.StatusCode.PERMISSION_DENIED, f"role {principal.role} may not call {method}")
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]
        call = _Call(method, principal, refusal, request_id)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                call.wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _Call:
    def __init__(self, method: str, principal: Principal | None, refusal, request_id: str):  # noqa: ANN001
        self.method = method
        self.principal = principal
        self.refusal = refusal
        self.request_id = request_id

    async def _enter(self, context) -> None:  # noqa: ANN001
        if self.refusal is not None:
            await context.abort(*self.refusal)
        assert self.principal is not None
        current_principal.set(self.principal)

    async def _fail(self, context, exc: Exception) -> None:  # noqa: ANN001
        """A DomainError becomes its status; an abort already under way goes on; anything else is
        logged once, with its traceback, and the caller gets INTERNAL with the request id."""
        if _is_abort(exc):
            raise exc
        if isinstance(exc, DomainError):
            status = to_status(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)
        log.exception("unhandled error", method=self.method, request_id=self.request_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {self.request_id})")

    def _log(self, context, started: float, cancelled: bool = False) -> None:  # noqa: ANN001
        code = context.code()
        if cancelled or (code is None and context.cancelled()):
            name = "CANCELLED"  # the caller went away or its deadline passed
        else:
            name = code.name if isinstance(code, grpc.StatusCode) else ("OK" if code is None else str(code))
        log.info(
            "rpc",
            method=self.method,
            principal=self.principal.name if self.principal else None,
            status=name,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            request_id=self.request_id,
        )

    def wrap_unary(self, behavior):  # noqa: ANN001
        async def unary(request, context):  # noqa: ANN001
            started = time.perf_counter()
            try:
                await self._enter(context)
                try:
                    return await behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status; aborts pass through
                    await self._fail(context, exc)
            finally:
                self._log(context, started)

        return unary

    def wrap_stream(self, behavior):  # noqa: ANN001
        async def stream(request, context):  # noqa: ANN001
            started = time.perf_counter()
            cancelled = False
            try:
                await self._enter(context)
                try:
                    async for item in behavior(request, context):
                        yield item
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status; aborts pass through
                    await self._fail(context, exc)
            finally:
                self._log(context, started, cancelled)

        return stream


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ in ("AbortError", "UsageError") or isinstance(exc, grpc.RpcError)
