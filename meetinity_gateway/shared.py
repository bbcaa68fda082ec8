"""State that outlives one loaded configuration: what a reload must not reset.

A configuration reload (:mod:`meetinity_gateway.reload`) builds a whole new pipeline from the
changed files. Some objects inside it hold state that must carry over to the new pipeline:
the ``memory://`` rate-limit counters, the upstream pools with their targets' health and
keep-alive connections, the metrics. The code creating such an object asks for it by kind and
identity instead::

    storage = shared("ratelimit-storage", (uri, timeout), lambda: open_storage(uri, timeout))

Outside a reload-aware build (tests, embedding, ``gunicorn --paste``) this simply calls the
factory: nothing is shared, nothing is kept. Inside :meth:`SharedState.build` (used by the
reloader for the first build and every reload), an object with the same kind and identity
as in the previous configuration is handed out again; a new identity (changed URL, changed
setting) gets a fresh object. Identities are counted within one build, so two rate-limit
layers with the same storage URI keep two separate storages, matched in pipeline order.

A build that fails leaves the registry as it was, and the objects it created are closed.
After a successful build, the registry keeps only what the new configuration uses; objects
left behind stay alive as long as requests still in flight on the old pipeline use them.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import typing as t

__all__ = ["SharedState", "shared"]

log = logging.getLogger("meetinity_gateway.reload")

T = t.TypeVar("T")
Key = t.Tuple[str, t.Hashable, int]

_current: contextvars.ContextVar[_Build | None] = contextvars.ContextVar(
    "meetinity_gateway_shared_build", default=None)


class _Build:
    """The objects one build asked for."""

    def __init__(self, state: SharedState) -> None:
        self.state = state
        self.used: dict[Key, t.Any] = {}
        self.created: list[t.Any] = []
        self._ordinals: dict[tuple[str, t.Hashable], int] = {}

    def get(self, kind: str, identity: t.Hashable, factory: t.Callable[[], T]) -> T:
        ordinal = self._ordinals.get((kind, identity), 0)
        self._ordinals[(kind, identity)] = ordinal + 1
        key = (kind, identity, ordinal)
        found = self.state._objects.get(key, _MISSING)
        if found is _MISSING:
            found = factory()
            self.created.append(found)
        self.used[key] = found
        return found


_MISSING = object()


class SharedState:
    """A registry of objects kept from one configuration to the next (see the module)."""

    def __init__(self) -> None:
        self._objects: dict[Key, t.Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._objects)

    def kinds(self) -> dict[str, int]:
        """How many objects of each kind are kept (for the status page and tests)."""
        counts: dict[str, int] = {}
        for kind, _, _ in self._objects:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    @contextlib.contextmanager
    def build(self) -> t.Iterator[_Build]:
        """Run a pipeline build in this block: :func:`shared` calls reuse kept objects.

        Builds are serialized. On success the registry becomes exactly what this build used;
        on an exception it stays as it was and the objects created meanwhile are closed.
        """
        with self._lock:
            build = _Build(self)
            token = _current.set(build)
            try:
                yield build
            except BaseException:
                for created in build.created:
                    _close(created)
                raise
            finally:
                _current.reset(token)
            self._objects = dict(build.used)


def _close(thing: t.Any) -> None:
    close = getattr(thing, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # a half-built object must not hide the real error
            log.debug("closing %r after a failed build failed", thing, exc_info=True)


def shared(kind: str, identity: t.Hashable, factory: t.Callable[[], T]) -> T:
    """The object of this kind and identity kept from the previous configuration, or a new
    one from ``factory`` (always a new one outside :meth:`SharedState.build`)."""
    build = _current.get()
    if build is None:
        return factory()
    return build.get(kind, identity, factory)
