"""``meetinity-gateway serve | check | routes | init`` (also ``python -m meetinity_gateway``).

Before anything else — logging included — the command line picks the ini file (``--config``,
else ``GATEWAY_CONFIG``, else ``gateway.ini``) and reads the ``.env`` beside it, so every
variable the README lists may live in that file.
"""
from __future__ import annotations

import argparse
import configparser
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from meetinity_gateway import __version__
from meetinity_gateway.config import (
    ConfigError,
    as_positive_int,
    config_path,
    env_file,
    expand,
    load_env,
    refresh_env,
)
from meetinity_gateway.reload import install_sighup, serving_app

log = logging.getLogger("meetinity_gateway")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_THREADS = 8


def _server_settings(config: Path) -> dict[str, str]:
    """``[server:main]`` values, expanded (only ``listen`` and ``threads`` are used)."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(config, encoding="utf-8")
    except configparser.Error:
        return {}  # load_pipeline reports the file's problems with more detail
    if not parser.has_section("server:main"):
        return {}
    load_env({"here": str(config.parent)})
    out = {}
    for key in ("listen", "threads"):
        if parser.has_option("server:main", key):
            try:
                out[key] = expand(parser.get("server:main", key), key=key)
            except ConfigError as exc:
                raise exc.locate(file=str(config), section="server:main")
    return out


def _setup_logging() -> None:
    """``LOG_LEVEL`` (INFO) and ``LOG_FORMAT`` (json | text) from the environment."""
    from meetinity_gateway.logs import configure_logging

    try:
        configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                          os.environ.get("LOG_FORMAT") or "json")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _print_pipeline(pipeline) -> None:
    print(f"config: {pipeline.file}")
    print(f"fingerprint: {pipeline.fingerprint}")
    print("pipeline (outermost first):")
    for position, name in enumerate(pipeline.names, 1):
        print(f"  {position}. {name}")
    if pipeline.router is not None:
        print("routes:")
        for line in pipeline.router.describe():
            print(f"  {line}")


def _load(config: Path):
    from meetinity_gateway.assembly import load_pipeline

    return load_pipeline(config)


def cmd_check(args) -> int:
    pipeline = _load(args.config)
    _print_pipeline(pipeline)
    print("configuration OK")
    return 0


def cmd_routes(args) -> int:
    pipeline = _load(args.config)
    for line in pipeline.router.describe() if pipeline.router else []:
        print(line)
    return 0


def create_server(
    app,
    *,
    listen: str = DEFAULT_LISTEN,
    threads: int = DEFAULT_THREADS,
    max_body_size: int | None = None,
    **kw,
):
    """A waitress server for ``app`` with the settings the gateway needs.

    waitress reads (and spools to disk) a whole request body before the app sees it. Its own
    cap is set to twice the gateway's ``max_body_size``: a body somewhat over the limit still
    reaches the proxy and gets the JSON 413, an absurd one is refused by waitress (plain-text
    413) before it fills the disk.
    """
    import waitress

    if max_body_size is not None:
        kw.setdefault("max_request_body_size", 2 * max_body_size + 1)
    return waitress.create_server(
        app,
        listen=listen,
        threads=threads,
        ident="meetinity-gateway",
        # waitress would strip X-Forwarded-* from every peer it does not trust; the gateway
        # applies its own TRUSTED_PROXIES rule, which needs to see them.
        clear_untrusted_proxy_headers=False,
        **kw,
    )


def cmd_init(args) -> int:
    """Write a ``.env`` beside the ini file with a fresh random ``JWT_SECRET``, once.

    The shipped gateway.ini refuses to start without a JWT secret (never an empty or guessable
    one); this gives a newcomer a working start without committing a secret anywhere. The ini
    file must exist (a ``.env`` anywhere else would configure nothing), and the ``.env`` is
    readable by its owner only (0600) where the platform has file modes.
    """
    if not args.config.is_file():
        raise ConfigError("configuration file not found: init writes the .env beside an "
                          "existing ini file (see --config)", file=str(args.config))
    env_path = env_file(args.config)
    existing = env_path.read_text(encoding="utf-8") if env_path.is_file() else ""
    if os.environ.get("JWT_SECRET") or any(
        line.split("=", 1)[0].strip() == "JWT_SECRET" and line.split("=", 1)[1].strip()
        for line in existing.splitlines() if "=" in line and not line.lstrip().startswith("#")
    ):
        if os.name == "posix" and env_path.is_file() and env_path.stat().st_mode & 0o077:
            os.chmod(env_path, 0o600)  # it may hold the secret: owner only
            print(f"{env_path} was readable by others: now 0600")
        print(f"JWT_SECRET is already set ({env_path} or the environment): nothing to do")
        return 0
    secret = secrets.token_urlsafe(48)
    block = (
        "# Written by `meetinity-gateway init`: a random secret so the gateway can start.\n"
        "# Set it to the user service's JWT secret to accept that service's tokens.\n"
        "# Every other variable is documented in .env.example.\n"
        f"JWT_SECRET={secret}\n"
    )
    # Created 0600 (os.open applies the mode before any byte is written); an existing file
    # that others could read is narrowed too. Windows has no such modes: ACLs of the folder
    # apply there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
    descriptor = os.open(env_path, flags, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8", newline="\n") as handle:
        if existing and not existing.endswith("\n"):
            handle.write("\n")
        handle.write(block)
    if os.name == "posix":
        os.chmod(env_path, 0o600)
    refresh_env(args.config)  # this process read the file before: let it see the secret
    print(f"wrote a new random JWT_SECRET to {env_path}")
    return 0


def _stop_on_terminate() -> None:
    """Make SIGTERM (what service managers and ``kill`` send) end ``serve`` like Ctrl+C, so
    buffered log lines are written. Where the platform has no such signal, nothing to do."""
    if hasattr(signal, "SIGTERM"):
        def stop(signum, frame):
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)


def cmd_serve(args) -> int:
    settings = _server_settings(args.config)
    if args.threads is not None:
        # The app section sizes its connection pools from GATEWAY_THREADS: keep them equal.
        os.environ["GATEWAY_THREADS"] = str(args.threads)
    threads = args.threads or as_positive_int(settings.get("threads") or str(DEFAULT_THREADS))
    listen = args.listen or settings.get("listen") or DEFAULT_LISTEN
    pipeline, app = serving_app(args.config, reload=args.reload)  # reload.py
    log.info("meetinity-gateway %s: %s (config %s)", __version__, " -> ".join(pipeline.names),
             pipeline.fingerprint)
    install_sighup(app)
    server = create_server(
        app, listen=listen, threads=threads, max_body_size=pipeline.max_body_size
    )
    server.print_listen("Serving on http://{}:{}")
    _stop_on_terminate()
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C, Ctrl+Break, or a polite kill
        pass
    finally:
        server.close()
        logging.shutdown()  # write out buffered log lines
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meetinity-gateway",
        description="The Meetinity API gateway: serve it, check its configuration, print its "
                    "routes, or write a first .env (also: python -m meetinity_gateway).",
        epilog="The ini file is --config, else GATEWAY_CONFIG, else gateway.ini; the .env "
               "beside it is read first (real environment variables win).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", type=Path, default=None,
                             help="ini file (default: GATEWAY_CONFIG, else gateway.ini)")
        command.set_defaults(func=func)
        return command

    serve = add("serve", cmd_serve, "serve the gateway with waitress")
    serve.add_argument("--listen", help="HOST:PORT (default: [server:main] listen, "
                                        f"else {DEFAULT_LISTEN})")
    serve.add_argument("--threads", type=int, help="worker threads (default: [server:main] "
                                                   f"threads, else {DEFAULT_THREADS})")
    serve.add_argument("--reload", action="store_true",
                       help="reload the ini file and its .env when they change, without a "
                            "restart (also RELOAD=true; SIGHUP where it exists)")
    add("check", cmd_check, "validate the configuration, print pipeline and routes")
    add("init", cmd_init, "write .env beside the ini with a random JWT_SECRET (once)")
    add("routes", cmd_routes, "print the route table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.config = config_path(args.config)
        # .env first: LOG_LEVEL, LOG_FORMAT and every other variable may be set there.
        load_env({"here": str(args.config.resolve().parent)})
        _setup_logging()
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
