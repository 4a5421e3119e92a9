"""The one cookie parser every reader shares (auth token, rate-limit keys); pure."""

from __future__ import annotations

import pytest

from server.edge.cookies import cookie_value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["sid=one"], "one"),
        (["theme=dark; sid=one; other=x"], "one"),
        (["  sid =  one  "], "one"),
        (['sid="one"'], "one"),
        (['sid="'], '"'),  # a lone quote is not a quoted value
        (["sid=a=b"], "a=b"),
        (["sid=one; sid=two"], "one"),  # the first occurrence wins
        (["theme=dark", "sid=two"], "two"),  # over every header (HTTP/2 splits them)
        (["garbage;;;=x; sid=one"], "one"),  # what cannot be parsed does not hide the rest
        (["sid="], None),
        (['sid=""'], None),
        (["sidx=one; xsid=two"], None),
        (["sid"], None),
        ([], None),
    ],
)
def test_cookie_value(headers: list[str], expected: str | None) -> None:
    assert cookie_value(headers, "sid") == expected
