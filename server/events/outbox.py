"""The outbox: events are rows written in the transaction of the money they report. The writing
itself is the ledger's (server/ledger/ledger.py, the one write path); this names it for services."""

from server.ledger.ledger import NewEvent, emit

__all__ = ["NewEvent", "emit"]
