"""One line of a message, for errors that quote another's: an exception, a traceback, a server's answer."""
from __future__ import annotations


def first_line(text, default: str = "unknown error", limit: int = 300) -> str:
    """The first non-blank line of ``text`` (an exception's message leads), at most ``limit`` long."""
    return _line(text, 0, default, limit)


def last_line(text, default: str = "unknown error", limit: int = 300) -> str:
    """The last non-blank line of ``text`` (a traceback ends with its exception), at most ``limit`` long."""
    return _line(text, -1, default, limit)


def _line(text, index: int, default: str, limit: int) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[index] if lines else default)[:limit]
