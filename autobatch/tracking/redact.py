"""Passwords out of URLs before they reach a log, a parameter or the terminal."""

from __future__ import annotations

import re

# ``scheme://user:password@host``. The password runs to the last "@" of the URL, so one that
# holds an unescaped "@" or "/" is hidden whole; at worst a host is hidden with it.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*):\S*@")
# ``...?password=secret&...`` as some database drivers accept it.
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret)=)[^&#\s]*", re.I)


def redact_url(url: str) -> str:
    """The URL (or any text holding URLs) with each password replaced by ``***``.

    Example::

        >>> redact_url("postgresql://optuna:s3cret@db:5432/studies")
        'postgresql://optuna:***@db:5432/studies'
    """
    text = _USERINFO.sub(r"\g<head>:***@", str(url))
    return _QUERY_SECRET.sub(r"\g<head>***", text)
