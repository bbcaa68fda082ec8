"""Configuration reload without a restart.

``meetinity-gateway serve --reload`` (or ``RELOAD=true``) serves a :class:`ReloadingApp`: a
WSGI app that hands each new request to the current pipeline and watches the ini file and the
``.env`` beside it.

* **When.** A background thread compares the files' modification time and size every
  ``RELOAD_INTERVAL`` seconds (default 1; portable, no file-system events or signals
  needed). Where the platform has ``SIGHUP``, ``serve`` also reloads on it
  (:meth:`ReloadingApp.request_reload`). A change that leaves the contents as they were
  (``touch``) changes nothing.
* **How.** The ``.env`` is read again (variables it set before follow the file; real
  environment variables still win), then the whole pipeline is built and validated as at
  start. Only a pipeline that built completely is swapped in, with one reference
  assignment: each request runs entirely on the pipeline it started with, so requests in
  flight finish on the old one while new requests take the new one.
* **What survives.** Objects asked for through :func:`meetinity_gateway.shared.shared`
  carry over when their identity is unchanged: the ``memory://`` rate-limit counters (same
  storage URI), each upstream's pool with its targets' health, in-flight counts and
  keep-alive connections (same name, URL and settings), the metrics. An upstream whose
  URL or settings changed starts afresh.
* **A bad file.** Any error (a ConfigError names file, section, key and value) is logged as
  one line, the ``.env`` variables are put back, and the running pipeline stays untouched;
  the same bad contents are not retried until the files change again.
* **Not reloaded** (a restart applies them): the listen address, the threads, waitress' own
  body cap, ``LOG_LEVEL``/``LOG_FORMAT`` of the process' logging, ``RELOAD`` itself.

Every pipeline carries its configuration's fingerprint (12 hex digits of SHA-256 over the
ini file, the ``.env`` and the environment values the file reads, see
:func:`~meetinity_gateway.config.config_fingerprint`), shown in the start-up log, in each
reload's log line, in the ``/health`` detail and on ``/status``.
"""
from __future__ import annotations

import logging
import os
import threading
import typing as t
from pathlib import Path

from meetinity_gateway.config import (
    ConfigError,
    as_bool,
    as_positive_float,
    config_fingerprint,
    env_file,
    refresh_env,
)
from meetinity_gateway.runtime_metrics import count_reload
from meetinity_gateway.shared import SharedState

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from meetinity_gateway.pipeline import Pipeline

__all__ = ["ReloadingApp", "reload_settings", "serving_app"]

log = logging.getLogger("meetinity_gateway.reload")

DEFAULT_INTERVAL = 1.0


def reload_settings(flag: bool = False) -> tuple[bool, float]:
    """``(enabled, interval)`` from ``--reload`` and ``RELOAD`` / ``RELOAD_INTERVAL``."""
    values = {}
    for name, caster, default in (("RELOAD", as_bool, False),
                                  ("RELOAD_INTERVAL", as_positive_float, DEFAULT_INTERVAL)):
        text = os.environ.get(name, "")
        try:
            values[name] = caster(text) if text.strip() else default
        except ValueError as exc:
            raise ConfigError(str(exc), key=name, value=text) from None
    return flag or values["RELOAD"], values["RELOAD_INTERVAL"]


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class ReloadingApp:
    """Serves the current pipeline of ``config`` and reloads it when its files change.

    :param config: the ini file.
    :param interval: seconds between two looks at the files' modification times.
    :param loader: builds a :class:`~meetinity_gateway.pipeline.Pipeline` from a path
        (default :func:`~meetinity_gateway.assembly.load_pipeline`).
    :param watch: start the polling thread (``False``: only :meth:`check` reloads).

    The first pipeline is built here (a ConfigError stops the start, as without reload).
    """

    def __init__(
        self,
        config: str | Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        loader: t.Callable[[Path], Pipeline] | None = None,
        watch: bool = True,
    ) -> None:
        if loader is None:
            from meetinity_gateway.assembly import load_pipeline as loader
        self.config = Path(config).resolve()
        self.interval = interval
        self.loader = loader
        self.state = SharedState()
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None
        self._check_lock = threading.Lock()
        self._wake = threading.Event()
        self._forced = False
        self._stop = threading.Event()
        self._seen = self._stamps()
        with self.state.build():
            self.pipeline: Pipeline = self.loader(self.config)
        self._thread: threading.Thread | None = None
        if watch:
            self._thread = threading.Thread(target=self._watch, name="config-reload",
                                            daemon=True)
            self._thread.start()

    # -- serving ---------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        # One read of the reference: this request (its body included) stays on that pipeline.
        return self.pipeline.app(environ, start_response)

    @property
    def fingerprint(self) -> str | None:
        return self.pipeline.fingerprint

    # -- watching --------------------------------------------------------------------------

    def _stamps(self) -> tuple:
        return (_stamp(self.config), _stamp(env_file(self.config)))

    def request_reload(self) -> None:
        """Reload now, even if the files look unchanged (safe from a signal handler)."""
        self._forced = True
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            forced, self._forced = self._forced, False
            try:
                self.check(force=forced)
            except Exception:  # the watcher must outlive any surprise
                log.exception("configuration reload failed unexpectedly")

    def check(self, force: bool = False) -> bool | None:
        """Reload if the files changed (or ``force``): True swapped, False refused, None idle."""
        with self._check_lock:
            stamps = self._stamps()
            if stamps == self._seen and not force:
                return None
            if not force and config_fingerprint(self.config) == self.pipeline.fingerprint:
                self._seen = stamps  # touched, not changed
                return None
            result = self.reload()
            if self._stamps() == stamps:
                # Unchanged while it was read: this version is settled (a bad one is not
                # retried every second). Changed meanwhile: the next look reloads again.
                self._seen = stamps
            return result

    def reload(self) -> bool:
        """Build the configuration as the files say now; swap it in if it is valid."""
        old = self.pipeline
        undo = refresh_env(self.config)
        try:
            with self.state.build():
                new = self.loader(self.config)
        except Exception as exc:
            undo()
            self.failures += 1
            count_reload(False)
            if isinstance(exc, ConfigError):
                message = f"configuration error: {exc}"
            else:
                message = f"configuration reload failed: {type(exc).__name__}: {exc}"
            message = " ".join(message.split())  # one line, whatever the cause said
            self.last_error = message
            log.error("%s (still serving configuration %s)", message, old.fingerprint)
            return False
        self.pipeline = new
        self.reloads += 1
        count_reload(True)
        self.last_error = None
        log.info("configuration reloaded: %s -> %s (%s)", old.fingerprint, new.fingerprint,
                 " -> ".join(new.names))
        return True

    def close(self) -> None:
        """Stop watching (the pipeline keeps serving)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)


def serving_app(config: str | Path, reload: bool = False) -> tuple[Pipeline, t.Any]:
    """``(pipeline, app)`` for a server: with reload (``--reload`` or ``RELOAD=true``) the app
    is a :class:`ReloadingApp`, else the pipeline's own app."""
    enabled, interval = reload_settings(reload)
    if not enabled:
        from meetinity_gateway.assembly import load_pipeline

        pipeline = load_pipeline(config)
        return pipeline, pipeline.app
    app = ReloadingApp(config, interval=interval)
    log.info("watching %s and %s for changes every %ss", app.config, env_file(app.config),
             interval)
    return app.pipeline, app


def install_sighup(app: t.Any) -> bool:
    """Reload ``app`` on SIGHUP where the platform has it (main thread only)."""
    import signal

    if not isinstance(app, ReloadingApp) or not hasattr(signal, "SIGHUP"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGHUP, lambda signum, frame: app.request_reload())
    return True
