"""Reading one cookie out of ``Cookie`` request headers; pure.

One parser for every reader (the auth token's cookie, rate-limit keys), so a cookie means the same
to each. Not ``http.cookies``, which drops every cookie after one it cannot parse.
"""

from __future__ import annotations

from collections.abc import Iterable


def cookie_value(headers: Iterable[str], name: str) -> str | None:
    """The value of cookie ``name`` in ``Cookie`` header values (HTTP/2 may split one header in
    several): the first occurrence wins; surrounding whitespace and one pair of double quotes are
    removed; ``None`` when the cookie is absent or its value is empty."""
    for header in headers:
        for part in header.split(";"):
            key, eq, value = part.partition("=")
            if eq and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value or None
    return None
