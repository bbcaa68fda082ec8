"""Path-prefix matching on segment boundaries: the one helper every layer uses.

``/api/users`` covers ``/api/users`` and ``/api/users/7``, never ``/api/usersX``.
"""
from __future__ import annotations

import re
import typing as t

__all__ = ["PrefixMatcher", "normalize_prefix"]

# RFC 3986 pchar minus "%": a configured prefix is a literal, already-decoded path.
_SEGMENT = r"[A-Za-z0-9._~!$&'()*+,;=:@-]+"
_PREFIX = re.compile(rf"^(/{_SEGMENT})*/?$")


def normalize_prefix(prefix: str) -> str:
    """``/api/users/`` → ``/api/users``; ``/`` stays ``/``. Raises ValueError when unusable."""
    prefix = prefix.strip()
    if not prefix.startswith("/") or not _PREFIX.match(prefix) or "//" in prefix:
        raise ValueError(f"{prefix!r} is not a path prefix like /api/users")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"{prefix!r} holds a dot-segment")
    return prefix.rstrip("/") or "/"


class PrefixMatcher:
    """Finds the longest configured prefix covering a path.

    >>> m = PrefixMatcher(["/api/users", "/api"])
    >>> m.match("/api/users/7"), m.match("/api/usersX"), m.match("/other")
    ('/api/users', '/api', None)
    """

    def __init__(self, prefixes: t.Iterable[str]) -> None:
        normalized = {normalize_prefix(p) for p in prefixes}
        # Longest first, so the most specific prefix wins.
        self.prefixes: tuple[str, ...] = tuple(sorted(normalized, key=len, reverse=True))
        self._with_slash = tuple("/" if p == "/" else p + "/" for p in self.prefixes)
        self._any = tuple(self.prefixes) + self._with_slash

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def __repr__(self) -> str:
        return f"PrefixMatcher({list(self.prefixes)!r})"

    def covers(self, path: str) -> bool:
        """Whether any prefix covers ``path`` (fast path: one C-level ``startswith``)."""
        if not path.startswith(self._any):
            return False
        return self.match(path) is not None

    def match(self, path: str) -> str | None:
        for prefix, with_slash in zip(self.prefixes, self._with_slash):
            if path == prefix or path.startswith(with_slash):
                return prefix
        return None
