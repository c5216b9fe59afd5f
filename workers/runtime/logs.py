"""structlog set-up: JSON when not on a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"password", "password_hash", "token", "token_hash"})


def _drop_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Last line of defence: a secret passed to a log call by mistake is never written."""
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


class _Stderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was set up.

    Embedders and test runners swap `sys.stderr`; a logger holding the old one would
    write to a closed file.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: str | None = None, level: str = "info") -> None:
    """Configure structlog once per process; output goes to stderr."""
    if log_format is None:
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
