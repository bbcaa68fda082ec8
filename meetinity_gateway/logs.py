"""Log output: the access record and the JSON / text formatters.

The access layer (:mod:`meetinity_gateway.middleware.observe`) logs one
:class:`AccessRecord` per request on the ``meetinity_gateway.access`` logger. The record is
rendered lazily, only when a handler really emits it, so a disabled logger costs the request
no formatting at all. Rendered alone (``str(record)``, what any logging setup prints as the
message) it is one JSON object or one ``key=value`` line.

:func:`configure_logging` is what ``meetinity-gateway serve`` uses: ``LOG_FORMAT=json`` (the
default) writes every log line as one JSON object — the access record's fields as they are,
other messages as ``{"ts", "level", "logger", "message"[, "exc"]}`` — and ``text`` writes the
classic ``time level logger: message`` lines. Under another server (gunicorn…) point its
logging configuration at :class:`JsonFormatter` for the same output.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import typing as t
from urllib.parse import urlsplit

__all__ = [
    "AccessRecord",
    "BufferedStreamHandler",
    "JsonFormatter",
    "configure_logging",
    "iso_time",
    "make_record",
    "without_query",
]

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# A text value that needs no quotes: no space, quote, '=' or control character.
_BARE = re.compile(r"^[^\s\"'=\\\x00-\x1f\x7f]+$")


# A query string inside a message (urllib3 puts the request URL in its errors): up to the
# next blank, quote or parenthesis.
_QUERY = re.compile(r"\?[^\s'\"()]*")


def without_query(text: str) -> str:
    """``text`` with every URL query string replaced by ``?…`` (queries may hold secrets)."""
    return _QUERY.sub("?…", text) if "?" in text else text


def redact_uri(uri: str) -> str:
    """The URI with its password masked (``redis://:***@host:6379/0``), for logs, error
    messages and the status page."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        return "(unparsable URI)"


_second: tuple[int, str] = (-1, "")  # the last second rendered (one per second, not per line)


def iso_time(timestamp: float) -> str:
    """``2024-05-01T12:00:00.123Z`` (UTC, milliseconds)."""
    global _second
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    last = _second
    if last[0] != seconds:
        last = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{last[1]}.{millis:03d}Z"


# json.dumps with any option builds a new encoder per call: one, built once.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode

# -- log records without LogRecord.__init__'s per-record work --------------------------------

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):  # POSIX: a forked worker logs its own process id
    os.register_at_fork(after_in_child=_forked)

_templates: dict[tuple[str, int, str, str | None], tuple[int, dict[str, t.Any]]] = {}


def make_record(name: str, level: int, msg: t.Any, pathname: str,
                func: str | None = None) -> logging.LogRecord:
    """The record ``Logger.makeRecord`` would make for ``msg`` (no arguments, no exception,
    ``lineno`` 0), with the fields that are the same for every record of a process (level
    name, file and module, process id and name) worked out once, not per record: the access
    log writes one record per request, and ``LogRecord.__init__`` took a path apart and
    asked the kernel for the process id each time. An application's own record factory
    (``logging.setLogRecordFactory``) is used as it is."""
    factory = logging.getLogRecordFactory()
    if factory is not logging.LogRecord:
        return factory(name, level, pathname, 0, msg, None, None, func)
    key = (name, level, pathname, func)
    pid, template = _templates.get(key) or (None, {})
    if pid != _pid:  # first use, or a forked child
        template = {k: v for k, v in vars(
            logging.LogRecord(name, level, pathname, 0, "", None, None, func)).items()
            if k not in ("msg", "created", "msecs", "relativeCreated", "thread", "threadName")}
        _templates[key] = (_pid, template)
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = record.__dict__
    fields.update(template)
    now = time.time()
    fields["msg"] = msg
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0
    fields["relativeCreated"] = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
    if logging.logThreads:
        fields["thread"] = threading.get_ident()
        fields["threadName"] = threading.current_thread().name
    else:  # pragma: no cover
        fields["thread"] = fields["threadName"] = None
    return record


class AccessRecord:
    """One request's access fields, rendered on demand (see the module docstring).

    ``fields`` keeps insertion order; its ``ts`` is a Unix timestamp, rendered as ISO 8601.
    """

    __slots__ = ("fields", "as_json", "_rendered")

    def __init__(self, fields: dict[str, t.Any], as_json: bool = True) -> None:
        self.fields = fields
        self.as_json = as_json
        self._rendered: str | None = None

    def _values(self) -> dict[str, t.Any]:
        values = dict(self.fields)
        if isinstance(values.get("ts"), float):
            values["ts"] = iso_time(values["ts"])
        return values

    def to_json(self) -> str:
        return _compact_json(self._values())

    def to_text(self) -> str:
        parts = []
        for key, value in self._values().items():
            if value is None:
                text = "-"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
                if not _BARE.match(text):
                    text = json.dumps(text)  # quoted and escaped: one line, no injection
            parts.append(f"{key}={text}")
        return " ".join(parts)

    def __str__(self) -> str:
        # Several handlers may format the same record: render once.
        if self._rendered is None:
            self._rendered = self.to_json() if self.as_json else self.to_text()
        return self._rendered


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object per line (access records: their own fields)."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, AccessRecord) and not record.args:
            return record.msg.to_json()
        payload: dict[str, t.Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            payload["request_id"] = request_id
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"), default=str)


class BufferedStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes in batches: at most every ``interval`` seconds, at once
    for a WARNING or worse, when ``max_bytes`` are waiting, and at exit.

    One write (and one flush) per request was a good share of the gateway's per-request cost
    under load: each is a system call that hands the GIL to another thread. A line waits at
    most ``interval`` seconds; a process killed outright (SIGKILL) loses at most that much.

    A record is formatted by the thread that logs it, outside any lock; the lock taken per
    record only appends the line. (``logging.Handler.handle`` would hold the handler's lock
    while formatting, and the writer holds it across the write: under load every request
    thread then queued on it, a futex round trip each.) Writes are ordered by their own
    lock, which no request thread waits for.
    """

    def __init__(self, stream: t.TextIO | None = None, interval: float = 0.2,
                 max_bytes: int = 64 * 1024) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_bytes = max_bytes
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_periodically,
                                         name="log-flusher", daemon=True)
        self._flusher.start()

    def _flush_periodically(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def handle(self, record: logging.LogRecord) -> t.Any:
        # As logging.Handler.handle, without holding the handler's lock around emit().
        passed = self.filter(record)
        if isinstance(passed, logging.LogRecord):  # Python 3.12+: a filter may replace it
            record = passed
        if passed:
            self.emit(record)
        return passed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        with self._pending_lock:
            self._pending.append(line)
            self._pending_bytes += len(line)
            urgent = record.levelno >= logging.WARNING or self._pending_bytes >= self.max_bytes
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            with self._pending_lock:
                if not self._pending:
                    return
                text, self._pending, self._pending_bytes = "".join(self._pending), [], 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                pass  # a closed stderr must not take requests down with it

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


def configure_logging(level: str = "INFO", log_format: str = "json",
                      stream: t.TextIO | None = None, force: bool = False) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) at ``level``, as JSON or as text.

    As ``logging.basicConfig``: when the root logger already has handlers (an embedding
    application configured logging) nothing changes, unless ``force``. Raises
    ValueError for an unknown level or format.
    """
    log_format = (log_format or "json").strip().lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    name = (level or "INFO").strip().upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown LOG_LEVEL {level!r} (DEBUG, INFO, WARNING, ERROR)")
    handler = BufferedStreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if root.handlers and not force:
        return root.handlers[0]
    root.setLevel(numeric)
    # urllib3 logs every request URL, query string included, at DEBUG.
    logging.getLogger("urllib3").setLevel(max(numeric, logging.INFO))
    if numeric > logging.DEBUG:
        # waitress warns "Task queue depth is N" for nearly every request once all threads
        # are busy: under load that logging alone costs a good share of the CPU it lacks.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return handler
