"""``meetinity-gateway serve | check | routes | init`` (also ``python -m meetinity_gateway``).

Before anything else — logging included — the command line picks the ini file (``--config``,
else ``GATEWAY_CONFIG``, else ``gateway.ini``) and reads the ``.env`` beside it, so every
variable of docs/configuration.md may live in that file.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from meetinity_gateway import __version__
from meetinity_gateway.config import (
    ConfigError,
    config_path,
    env_file,
    load_env,
    refresh_env,
)
from meetinity_gateway.pipeline import described, upstream_list
from meetinity_gateway.reload import install_sighup, serving_app
from meetinity_gateway.settings import DEFAULT_LISTEN, DEFAULT_THREADS

log = logging.getLogger("meetinity_gateway")


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
        router = pipeline.router
        print("routes:")
        for line in router.describe():
            print(f"  {line}")
        print("upstreams mounted: " + upstream_list(router))
        print("upstreams not mounted (empty URL): "
              + (", ".join(router.unmounted_upstreams) or "none"))
        print("upstream policy per route (effective values):")
        for name, note in router.notes.items():
            print(f"  {name}: {note}")
    layers = described(pipeline)
    if pipeline.router is not None:
        from meetinity_gateway.routeview import route_policies

        print("effective policy per route (what each layer decides for a path it serves):")
        for view in route_policies(pipeline.router,
                                   [(layer.name, layer.app) for layer in layers]):
            print(f"  {view.route}: {view.methods} {view.sample}")
            for name, text in view.layers:
                print(f"    {name}: {text}")
            print(f"    upstream: {view.upstream}")
    for layer in layers:  # outermost first: what each one is set to
        lines = layer.describe()
        heading = f"layer {layer.name} ({layer.kind}"
        if layer.kind == "authorize":
            heading += ", most specific rule wins"
        print(f"{heading}):" if lines else f"{heading}): —")
        for line in lines:
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
    """Moved to :func:`meetinity_gateway.serving.hardened.create_server`; kept for callers."""
    from meetinity_gateway.serving.hardened import create_server as create

    return create(app, **kw)


def _write_starting_files(config: Path) -> None:
    """The shipped ``gateway.ini`` at ``config`` (which does not exist), and the shipped
    ``.env.example`` beside it unless one is there: an installed package's starting point."""
    from meetinity_gateway.shipped import shipped_file

    if not config.parent.is_dir():
        raise ConfigError("the folder of the configuration file does not exist",
                          file=str(config))
    for name, target in (("gateway.ini", config),
                         (".env.example", config.parent / ".env.example")):
        if target.exists():
            continue
        try:
            target.write_bytes(shipped_file(name).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot write the shipped {name}: {exc.strerror or exc}",
                              file=str(target)) from None
        print(f"wrote the shipped {name} to {target}")


def cmd_init(args) -> int:
    """Write a starting ``gateway.ini`` (and ``.env.example``) when there is none, and a
    ``.env`` beside the ini file with a fresh random ``JWT_SECRET``, once.

    The shipped gateway.ini refuses to start without a JWT secret (never an empty or guessable
    one); this gives a newcomer a working start without committing a secret anywhere. An ini
    file that exists is never touched, and the ``.env`` is readable by its owner only (0600)
    where the platform has file modes.
    """
    if not args.config.is_file():
        _write_starting_files(args.config)
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
    lines = existing.splitlines(keepends=True)
    # A copied .env.example has an empty `JWT_SECRET=` line: fill that one in, rather than
    # leave a second JWT_SECRET line below it (the first one read would win elsewhere).
    empty = [index for index, line in enumerate(lines)
             if not line.lstrip().startswith("#") and "=" in line
             and line.split("=", 1)[0].strip() == "JWT_SECRET"]
    if empty:
        lines[empty[0]] = f"JWT_SECRET={secret}\n"
        for index in reversed(empty[1:]):
            del lines[index]
        text = "".join(lines)
        mode = "w"
    else:
        text = ("\n" if existing and not existing.endswith("\n") else "") + block
        mode = "a"
    # Created 0600 (os.open applies the mode before any byte is written); an existing file
    # that others could read is narrowed too. Windows has no such modes: ACLs of the folder
    # apply there.
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
    flags |= os.O_APPEND if mode == "a" else os.O_TRUNC
    descriptor = os.open(env_path, flags, 0o600)
    with os.fdopen(descriptor, mode, encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    if os.name == "posix":
        os.chmod(env_path, 0o600)
    refresh_env(args.config)  # this process read the file before: let it see the secret
    print(f"wrote a new random JWT_SECRET to {env_path}")
    return 0


def cmd_serve(args) -> int:
    from meetinity_gateway import server as serving
    from meetinity_gateway.serving.launchers import prepare_metrics_directory
    from meetinity_gateway.settings import read_settings

    settings = read_settings(args.config, listen=args.listen, threads=args.threads,
                             server=args.server, workers=args.workers)
    # The app section sizes its connection pools from GATEWAY_THREADS: keep them equal.
    os.environ["GATEWAY_THREADS"] = str(settings["threads"])
    if args.reload:
        os.environ["RELOAD"] = "true"  # granian's and gunicorn's workers read it too
    # Several workers: one /metrics for all (before the pipeline imports prometheus-client).
    cleanup = prepare_metrics_directory(settings)
    try:
        return _serve(args, serving, settings)
    finally:
        cleanup()


def _serve(args, serving, settings) -> int:
    pipeline, app = serving_app(args.config)  # reload.py: a ReloadingApp when RELOAD is on
    install_sighup(app)
    try:
        return serving.serve(pipeline, settings, config=args.config, app=app)
    finally:
        logging.shutdown()  # write out buffered log lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meetinity-gateway",
        description="The Meetinity API gateway: serve it, check its configuration, print its "
                    "routes, or write a first gateway.ini and .env (also: python -m "
                    "meetinity_gateway).",
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

    serve = add("serve", cmd_serve, "serve the gateway (waitress unless --server says)")
    serve.add_argument("--listen", help="HOST:PORT (default: [server:main] listen, "
                                        f"else {DEFAULT_LISTEN})")
    serve.add_argument("--threads", help="worker threads (default: [server:main] "
                                         f"threads, else {DEFAULT_THREADS})")
    serve.add_argument("--server", help="waitress (default), granian or gunicorn "
                                        "(default: [server:main] server)")
    serve.add_argument("--workers", help="processes, granian and gunicorn only "
                                         "(default: [server:main] workers, else 1)")
    serve.add_argument("--reload", action="store_true",
                       help="reload the ini file and its .env when they change, without a "
                            "restart (also RELOAD=true; SIGHUP where it exists)")
    add("check", cmd_check, "validate the configuration, print pipeline and routes")
    add("init", cmd_init, "write the shipped gateway.ini when there is none, and .env beside "
                          "it with a random JWT_SECRET (once)")
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
    except BrokenPipeError:
        # `meetinity-gateway check | head`: the reader has gone, which is no error. Point
        # stdout at nothing so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
