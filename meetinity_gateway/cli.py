"""``meetinity-gateway serve | check | routes | init`` (also ``python -m meetinity_gateway``)."""
from __future__ import annotations

import argparse
import configparser
import logging
import os
import secrets
import sys
from pathlib import Path

from meetinity_gateway import __version__
from meetinity_gateway.config import ConfigError, expand, load_env

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


def create_server(app, **kw):
    """Moved to :func:`meetinity_gateway.server.create_server`; kept here for callers."""
    from meetinity_gateway.server import create_server as create

    return create(app, **kw)


def cmd_init(args) -> int:
    """Write a ``.env`` beside the ini file with a fresh random ``JWT_SECRET``, once.

    The shipped gateway.ini refuses to start without a JWT secret (never an empty or guessable
    one); this gives a newcomer a working start without committing a secret anywhere.
    """
    env_file = args.config.resolve().parent / ".env"
    existing = env_file.read_text(encoding="utf-8") if env_file.is_file() else ""
    if os.environ.get("JWT_SECRET") or any(
        line.split("=", 1)[0].strip() == "JWT_SECRET" and line.split("=", 1)[1].strip()
        for line in existing.splitlines() if "=" in line and not line.lstrip().startswith("#")
    ):
        print(f"JWT_SECRET is already set ({env_file} or the environment): nothing to do")
        return 0
    secret = secrets.token_urlsafe(48)
    block = (
        "# Written by `meetinity-gateway init`: a random secret so the gateway can start.\n"
        "# Set it to the user service's JWT secret to accept that service's tokens.\n"
        "# Every other variable is documented in .env.example.\n"
        f"JWT_SECRET={secret}\n"
    )
    with env_file.open("a", encoding="utf-8") as handle:
        if existing and not existing.endswith("\n"):
            handle.write("\n")
        handle.write(block)
    print(f"wrote a new random JWT_SECRET to {env_file}")
    return 0


def cmd_serve(args) -> int:
    from meetinity_gateway import server as serving

    settings = serving.read_settings(args.config, listen=args.listen, threads=args.threads,
                                     server=args.server, workers=args.workers)
    # The app section sizes its connection pools from GATEWAY_THREADS: keep them equal.
    os.environ["GATEWAY_THREADS"] = str(settings["threads"])
    pipeline = _load(args.config)
    started = f"meetinity-gateway {__version__}: " + " -> ".join(pipeline.names)
    try:
        return serving.serve(pipeline, settings, config=args.config, started=started)
    finally:
        logging.shutdown()  # write out buffered log lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meetinity-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", type=Path, default=Path(
            os.environ.get("GATEWAY_CONFIG", "gateway.ini")), help="ini file (gateway.ini)")
        command.set_defaults(func=func)
        return command

    serve = add("serve", cmd_serve, "serve the gateway (waitress unless --server says)")
    serve.add_argument("--listen", help="HOST:PORT (default: [server:main] listen, "
                                        f"else {DEFAULT_LISTEN})")
    serve.add_argument("--threads", help="worker threads (default: [server:main] "
                                         f"threads, else {DEFAULT_THREADS})")
    serve.add_argument("--server", help="waitress (default), granian or gunicorn "
                                        "(default: [server:main] server)")
    serve.add_argument("--workers", help="processes, granian and gunicorn only "
                                         "(default: [server:main] workers, else 1)")
    add("check", cmd_check, "validate the configuration, print pipeline and routes")
    add("init", cmd_init, "write .env beside the ini with a random JWT_SECRET (once)")
    add("routes", cmd_routes, "print the route table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup_logging()
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
