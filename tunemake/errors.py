"""Errors a user can act on.

Every stage raises :class:`TunemakeError` (or a subclass) for bad input; the CLI and the rule
scripts print its message, without a traceback, and exit non-zero.
"""

from __future__ import annotations


class TunemakeError(Exception):
    """Bad input the user can fix: the message names the file and line, or the config key."""


class ConfigError(TunemakeError):
    """A config value of the wrong type, range or reference. The message starts with the key path."""


class DataError(TunemakeError):
    """Bad raw data: the message starts with ``file:line:`` (or ``file: row N:``)."""


def at(location: str, message: str) -> str:
    """Format ``location: message``, the one shape every error message takes."""
    return f"{location}: {message}"
