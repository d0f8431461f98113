"""A rig for one fault scenario: a database in the suite's own cluster, the server as a subprocess
on it, organisations and funded members, and the ledger check at the end.

    with PgCluster.create() as pg, Rig(pg, "kill9") as rig:
        load = rig.pay_load(clients=16).start()
        rig.server.kill(); rig.server.start()
        load.stop()
        outcome = rig.check(load)
"""

from __future__ import annotations

import contextlib
import uuid

import grpc

from clients.payments_client import PaymentsClient
from faults import invariants
from faults.load import PayLoad, Workload
from faults.pgcluster import PgCluster
from faults.serverproc import TOKENS, ServerProc

FUNDING_CENTS = 900_000_000  # per member: no payment of a run is ever short


class Rig:
    def __init__(self, pg: PgCluster, name: str, *, members: int = 40, organisations: int = 8, **server_env: str):
        self.pg = pg
        self.dbname = f"faults_{name}_{uuid.uuid4().hex[:6]}"
        self.members = tuple(range(1, members + 1))
        self.organisations = tuple(range(1, organisations + 1))
        self.server_env = server_env
        self.server: ServerProc | None = None

    @property
    def dsn(self) -> str:
        return self.pg.dsn(self.dbname)

    @property
    def url(self) -> str:
        return self.pg.url(self.dbname)

    def __enter__(self) -> Rig:
        self.pg.create_database(self.dbname)
        self.server = ServerProc(self.url, **self.server_env).start()
        self.seed()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(Exception):
            self.pg.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    def client(self, role: str = "admin") -> PaymentsClient:
        assert self.server is not None
        return PaymentsClient(self.server.target, TOKENS[role], timeout_s=30)

    def seed(self) -> None:
        """Organisations and members, each member funded by an adjustment."""
        with self.client("admin") as admin:
            for org in self.organisations:
                admin.upsert_organisation(org, f"Club {org}")
            for member in self.members:
                admin.upsert_member(member, f"Member {member}")
                admin.adjust(FUNDING_CENTS, "funding", member_id=member)

    def workload(self, **kw: int) -> Workload:
        return Workload(self.members, self.organisations, **kw)

    def pay_load(self, **kw: object) -> PayLoad:
        assert self.server is not None
        workload = kw.pop("workload", None) or self.workload()
        return PayLoad(self.server.target, TOKENS["app"], workload, **kw)  # type: ignore[arg-type]

    def check(self, *loads: PayLoad) -> invariants.LedgerCheck:
        records = [r for load in loads for r in load.records.values()]
        return invariants.check(self.dsn, records, url=self.url)

    def wait_pay_works(self, timeout_s: float = 30) -> None:
        """Until one Pay goes through (the server and its database are back)."""
        import time

        deadline = time.monotonic() + timeout_s
        key = uuid.uuid4().hex  # the same key on every try: booked once at most
        with self.client("app") as app:
            while True:
                try:
                    app.pay(self.members[0], 1, organisation_id=self.organisations[0], description="probe",
                            idempotency_key=key)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
