"""Logging setup for FedCT's entry points (the CLI, the Flower apps). Library code only calls
``logging.getLogger(__name__)``; nothing configures logging at import time."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def configure_logging(verbosity: int = 0) -> None:
    """Send FedCT's log records to stderr through rich.

    ``verbosity`` is -1 (quiet: warnings and errors), 0 (info) or 1 and above (debug).
    """
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = RichHandler(show_path=verbosity > 0, rich_tracebacks=verbosity > 0, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fedct")  # every FedCT module logs below it, and nothing else
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
