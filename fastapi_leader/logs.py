"""Log lines a user sees without configuring logging.

The election logs under the ``fastapi_leader`` logger: one INFO line per role change (node,
term, reason), joins, leaves, and warnings. Plain ``uvicorn app:app`` configures only its own
loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``: see ``uvicorn.config.LOGGING_CONFIG``)
and leaves the root logger without a handler, so Python would drop those INFO lines (its last
resort handler prints warnings only). gunicorn does the same with its own loggers.

So when an election starts and nobody has configured logging for us (no handler on the root
logger, none on ``fastapi_leader``, and its level untouched), we add one handler to
``fastapi_leader``: INFO and above to stderr, in uvicorn's default format (``INFO:     ...``),
and set that logger's level to INFO. The moment the application configures logging itself (a
handler on the root logger: ``logging.basicConfig``, ``dictConfig``, ``uvicorn --log-config``),
the handler steps aside for good and hands the level back, so nothing is printed twice.

To silence or route the lines, configure logging before the app starts, as for any library:
``logging.getLogger("fastapi_leader").setLevel(logging.WARNING)`` (warnings only), or give it
(or the root logger) a handler of your own.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["install_default_handler"]

LOGGER = "fastapi_leader"


class _DefaultHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, uvicorn's look, only while the application has configured no logging."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(_UvicornLike())

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            # The app configured logging after we started: its handlers rule from now on.
            logger = logging.getLogger(LOGGER)
            logger.removeHandler(self)
            if logger.level == logging.INFO:
                logger.setLevel(logging.NOTSET)
            return
        super().emit(record)


class _UvicornLike(logging.Formatter):
    """``INFO:     fastapi_leader: message``, as uvicorn's default formatter pads its level."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{record.levelname}:".ljust(9)
        return f"{prefix} {record.name}: {super().format(record)}"


def install_default_handler() -> bool:
    """Add the stderr handler to the ``fastapi_leader`` logger if nobody configured logging
    for it; whether it was added (once per process)."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers or logger.level != logging.NOTSET or logging.getLogger().handlers:
        return False
    if not logger.propagate:
        return False  # someone decided where its records go (nowhere, maybe)
    logger.addHandler(_DefaultHandler())
    logger.setLevel(logging.INFO)
    return True
