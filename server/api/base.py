"""What every servicer mixin shares: the database thread pool, the principal, and the
idempotent runner of SPEC §3."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from server.api import call_limits
from server.api.auth import Principal
from server.api.interceptors import current_principal
from server.config import Settings
from server.ledger import idempotency
from server.ledger.db import Database
from server.services.cards import Once
from server.stripe_gateway import StripeGateway

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M", bound=Message)


class ApiBase:
    def __init__(self, settings: Settings, db: Database, executor: ThreadPoolExecutor):
        self.settings = settings
        self.db = db
        self.executor = executor

    _gateway: StripeGateway | None = None

    @property
    def gateway(self) -> StripeGateway:
        if self._gateway is None:
            self._gateway = StripeGateway(self.settings.stripe_secret_key, self.settings.stripe_api_base,
                                          self.settings.currency)
        return self._gateway

    async def on_server_start(self) -> None:
        """Start background work. Mixins that override it call `await super().on_server_start()`."""

    async def on_server_stop(self) -> None:
        """Stop background work (before the server stops). Mixins call `await super().on_server_stop()`."""

    def close(self) -> None:
        """Release what the calls used, once the server has stopped (its calls have ended). Mixins
        that override it call `super().close()`."""

    @staticmethod
    def principal() -> Principal:
        return current_principal.get()

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Blocking database work runs in the pool, never on the event loop; the call's first piece
        of it does not start once the call's deadline has passed (`call_limits.guarded`)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, call_limits.guarded(fn))

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self.in_thread(lambda: self.db.read(fn))

    async def write(self, fn: Callable[[Connection], T]) -> T:
        return await self.in_thread(lambda: self.db.run(fn))

    def pending(self, method: str, request: Message) -> idempotency.Pending:
        """The idempotency record this request will leave (the key checked first)."""
        key = request.idempotency_key  # type: ignore[attr-defined]
        idempotency.check_key(key)
        return idempotency.Pending(self.principal().name, key, method,
                                   idempotency.request_hash(method, request.SerializeToString(deterministic=True)))

    @staticmethod
    def replayed(context) -> None:  # noqa: ANN001
        context.set_trailing_metadata((("idempotent-replay", "true"),))

    async def mutate(self, context, method: str, request: Message, work: Callable[[Connection], R],  # noqa: ANN001
                     to_pb: Callable[[R], M]) -> M:
        """Run `work` once per idempotency key, in one unit of work with its stored result. A retry of
        the same request is answered from the stored result with `idempotent-replay: true`."""
        pending = self.pending(method, request)
        principal = self.principal()

        def unit(conn: Connection) -> tuple[R, bool]:
            stored = idempotency.lookup(conn, pending)
            if stored is not None:
                return stored.result, True
            result = work(conn)
            pending.record(conn, result)
            return result, False

        def run() -> tuple[R, bool]:
            token = current_principal.set(principal)
            try:
                try:
                    return self.db.run(unit)
                except IntegrityError:
                    # a concurrent request with the same key committed first: this attempt rolled
                    # back whole, and the rerun finds its stored result
                    return self.db.run(unit)
            finally:
                current_principal.reset(token)

        result, replayed = await self.in_thread(run)
        if replayed:
            self.replayed(context)
        return to_pb(result)

    # ---------------------------------------------------------------- flows that call Stripe
    async def in_context(self, fn: Callable[[], T]) -> T:
        """Run a blocking flow (database and Stripe) in the pool, with the caller's principal.
        A flow whose final write lost a race with a concurrent retry of the same request (same
        idempotency key, or the same pending card payment) runs once more: it then finds the
        stored result, and Stripe's idempotency key makes its Stripe calls the same ones."""
        ctx = contextvars.copy_context()

        def run() -> T:
            try:
                return ctx.run(fn)
            except IntegrityError:
                return ctx.run(fn)

        return await self.in_thread(run)

    def once(self, method: str, request: Message) -> Once:
        pending = self.pending(method, request)
        return Once(pending.principal, pending.key, pending.method, pending.request_hash)

    def answer(self, context, result: Any, to_pb: Callable[[Any], M]) -> M:  # noqa: ANN001
        if isinstance(result, idempotency.Replayed):
            self.replayed(context)
            return to_pb(result.result)
        return to_pb(result)
