"""What every servicer mixin shares: the database thread pool, the principal, and the
idempotent runner of SPEC §3."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from server.api.auth import Principal
from server.api.interceptors import current_principal
from server.config import Settings
from server.domain.errors import DomainError
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

    def close(self) -> None:
        """Release what the calls used, once the server has stopped (its calls have ended). Mixins
        that override it call `super().close()`."""

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

    async def mutate(self, context, method: str, request: Message, response_type: type[M],  # noqa: ANN001
                     work: Callable[[Connection], M]) -> M:
        """Run `work` once per idempotency key: in one transaction with the stored response.
        A retry of the same request returns the stored response with `idempotent-replay: true`."""
        response, _ = await self.mutate_once(context, method, request, response_type, work)
        return response

    async def mutate_once(self, context, method: str, request: Message, response_type: type[M],  # noqa: ANN001
                          work: Callable[[Connection], M], *, optimistic: bool = False,
                          first_try: Callable[[idempotency.Pending], Awaitable[M | None]] | None = None,
                          ) -> tuple[M, bool]:
        """`mutate`, answering (response, replayed). With `optimistic` (for work that only touches
        the database), where the record is written with the COMMIT the stored response is not looked
        up first: a repeated key fails the commit on the record's unique key, the attempt rolls back
        whole, and the request runs again the careful way (as does any refusal, which may be a
        repeat of a request that succeeded): one round trip less for every first request.
        `first_try` (PostgreSQL) does the whole request and its record in one statement, or answers
        None having changed nothing; the ways above follow only then, in a database thread."""
        key = request.idempotency_key  # type: ignore[attr-defined]
        idempotency.check_key(key)
        principal = self.principal()
        req_hash = idempotency.request_hash(method, request.SerializeToString(deterministic=True))
        replayed = False
        if first_try is not None and self.db.records_with_commit:
            response = await first_try(idempotency.Pending(principal.name, key, method, req_hash))
            if response is not None:
                return response, False

        def work_then_record(conn: Connection) -> M:
            response = work(conn)
            idempotency.record(conn, principal.name, key, method, req_hash, response.SerializeToString(deterministic=True))
            return response

        def lookup_then_work(conn: Connection) -> M:
            nonlocal replayed
            stored = idempotency.lookup(conn, principal.name, key, method, req_hash)
            replayed = stored is not None
            return response_type.FromString(stored.response) if stored is not None else work_then_record(conn)

        def run() -> M:
            token = current_principal.set(principal)
            try:
                if optimistic and self.db.records_with_commit:
                    try:
                        return self.db.run(work_then_record)
                    except (IntegrityError, DomainError):
                        pass  # the key is taken, or a refusal that may be a repeat: look first
                try:
                    return self.db.run(lookup_then_work)
                except IntegrityError:
                    # a concurrent request with the same key committed first: this attempt
                    # rolled back whole; the rerun finds its stored response.
                    return self.db.run(lookup_then_work)
            finally:
                current_principal.reset(token)

        result = await self.in_thread(run)
        if replayed:
            context.set_trailing_metadata((("idempotent-replay", "true"),))
        return result, replayed
