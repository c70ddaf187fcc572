"""structlog set-up shared by every faas process: one event per line on stderr,
JSON when stderr is not a terminal, a readable console format when it is."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None) -> None:
    """Configure structlog for this process (level from `FAAS_LOG_LEVEL`, default info)."""
    level_name = (level or os.environ.get("FAAS_LOG_LEVEL", "info")).upper()
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger with bound context: it picks up `configure_logging` whenever that runs."""
    return structlog.get_logger(**bound)
