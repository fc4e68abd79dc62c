"""Warnings on stderr, credentials removed: the one way components/ reports something it carries on after."""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/\s@]+@")


def redact_text(text: str) -> str:
    """Drop user:password@ from every URL inside a message (exceptions quote the URLs they called)."""
    return _USERINFO.sub(r"\1", text)


def redact(value: str) -> str:
    """Drop user:password@ from URLs so a credential never lands in params or logs."""
    if "://" not in value or "@" not in value:
        return value
    parts = urlsplit(value)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host))


def warn(text: str) -> None:
    """One line on stderr (credentials in URLs removed), flushed at once."""
    # Not print(): inside Ray Train workers print is patched and the line would show twice.
    sys.stderr.write(redact_text(text) + "\n")
    sys.stderr.flush()
