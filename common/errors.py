"""FedCT's exception types. Each message says what is wrong, why, and how to fix it."""

from __future__ import annotations


class FedCTError(Exception):
    """Base class for failures FedCT explains to its user (the CLI prints the message only)."""


class ConfigError(FedCTError, ValueError):
    """A setting is missing, malformed or out of range."""


class SiteDataError(FedCTError):
    """A hospital's data folder cannot be used as a whole (no images, one class, bad labels)."""
