"""What every servicer mixin shares: the database thread pool, the principal, and the
idempotent runner of SPEC §3."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from server.api.auth import Principal
from server.api.interceptors import current_principal
from server.config import Settings
from server.ledger import idempotency
from server.ledger.db import Database

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class ApiBase:
    def __init__(self, settings: Settings, db: Database, executor: ThreadPoolExecutor):
        self.settings = settings
        self.db = db
        self.executor = executor

    async def on_server_start(self) -> None:
        """Start background work. Mixins that override it call `await super().on_server_start()`."""

    async def on_server_stop(self) -> None:
        """Stop background work (before the server stops). Mixins call `await super().on_server_stop()`."""

    @staticmethod
    def principal() -> Principal:
        return current_principal.get()

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Blocking database work runs in the pool, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self.in_thread(lambda: self.db.read(fn))

    async def write(self, fn: Callable[[Connection], T]) -> T:
        return await self.in_thread(lambda: self.db.run(fn))

    def replay_or_none(self, conn: Connection, method: str, request: Message, response_type: type[M]) -> M | None:
        """The stored response of an earlier identical request, or None (raises on a reused key)."""
        key = request.idempotency_key  # type: ignore[attr-defined]
        stored = idempotency.lookup(conn, self.principal().name, key, method,
                                    idempotency.request_hash(method, request.SerializeToString(deterministic=True)))
        return None if stored is None else response_type.FromString(stored.response)

    def record(self, conn: Connection, method: str, request: Message, response: Message) -> None:
        idempotency.record(conn, self.principal().name, request.idempotency_key,  # type: ignore[attr-defined]
                           method, idempotency.request_hash(method, request.SerializeToString(deterministic=True)),
                           response.SerializeToString(deterministic=True))

    async def mutate(self, context, method: str, request: Message, response_type: type[M],  # noqa: ANN001
                     work: Callable[[Connection], M]) -> M:
        """Run `work` once per idempotency key: in one transaction with the stored response.
        A retry of the same request returns the stored response with `idempotent-replay: true`."""
        idempotency.check_key(request.idempotency_key)  # type: ignore[attr-defined]
        principal = self.principal()
        replayed = False

        def txn(conn: Connection) -> M:
            nonlocal replayed
            stored = self.replay_or_none(conn, method, request, response_type)
            if stored is not None:
                replayed = True
                return stored
            replayed = False
            response = work(conn)
            self.record(conn, method, request, response)
            return response

        def run() -> M:
            token = current_principal.set(principal)
            try:
                try:
                    return self.db.run(txn)
                except IntegrityError:
                    # a concurrent request with the same key committed first: this attempt
                    # rolled back whole; the rerun finds its stored response.
                    return self.db.run(txn)
            finally:
                current_principal.reset(token)

        result = await self.in_thread(run)
        if replayed:
            context.set_trailing_metadata((("idempotent-replay", "true"),))
        return result
