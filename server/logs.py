"""One JSON object per line on stdout, the same schema for the server and the webhook bridge:
`event`, `level`, `timestamp`, `logger` where there is one, and what the line binds (a call's
`request_id` among them, through structlog's context variables)."""

from __future__ import annotations

import logging
import sys

import structlog

from server.api import call_log


def configure_logging(level: int = logging.INFO) -> None:
    """structlog and the standard library's loggers (Alembic, grpc, aiohttp, libraries) alike."""
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level, stamp],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    call_log.configure(sys.stdout)
