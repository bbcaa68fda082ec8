"""Configuration helpers shared by every ``filter_factory`` / ``app_factory``.

The factories receive strings, whoever loaded the ini file (our :mod:`assembly` loader or
PasteDeploy), and turn them into typed keyword arguments here:

* :func:`config_path` says which ini file (``--config``, else ``GATEWAY_CONFIG`` from the
  environment or from ``./.env``, else ``gateway.ini``) and :func:`load_env` reads the ``.env``
  file beside it once (a real environment variable always wins over ``.env``), before
  anything else (logging included) reads a variable; :func:`refresh_env` re-reads it for a
  configuration reload and :func:`config_fingerprint` names one version of ini + ``.env``;
* :func:`expand` replaces ``${VAR}`` and ``${VAR:-default}`` from the environment;
* :func:`cast_settings` casts every key through a table of ``name -> caster`` (as waitress'
  ``Adjustments`` does) and rejects unknown keys.

Every problem is a :class:`ConfigError` naming file, section, key and value, raised when the
gateway starts, never at the first request.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import typing as t
from pathlib import Path

from dotenv import dotenv_values

__all__ = [
    "ConfigError",
    "as_bool",
    "as_cpu_affinity",
    "as_list",
    "as_listen",
    "as_non_negative_float",
    "as_non_negative_int",
    "as_optional_list",
    "as_optional_str",
    "as_positive_float",
    "as_positive_int",
    "as_size",
    "as_str",
    "cast_settings",
    "config_fingerprint",
    "config_path",
    "env_file",
    "expand",
    "load_env",
    "parse_listen",
    "prepare",
    "refresh_env",
    "split_named",
]

Caster = t.Callable[[str], t.Any]


class ConfigError(ValueError):
    """A configuration problem, located as precisely as the caller knows it.

    A ``ValueError``, so a middleware used alone can raise it for a bad keyword argument
    (naming the argument as ``key``) and the factory adds file and section.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        section: str | None = None,
        key: str | None = None,
        value: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.section = section
        self.key = key
        self.value = value

    def locate(self, *, file: str | None = None, section: str | None = None) -> ConfigError:
        """Fill in the file and section where the raiser did not know them."""
        self.file = self.file or file
        self.section = self.section or section
        return self

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.section:
            where.append(f"[{self.section}]")
        if self.key:
            where.append(self.key if self.value is None else f"{self.key} = {self.value!r}")
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


# -- environment -------------------------------------------------------------------------

_loaded_env_files: set[Path] = set()
_env_lock = threading.Lock()
#: Variables this process took from a ``.env`` file, with the value it set: only those may be
#: replaced or removed when the file is read again (a real environment variable never is).
_from_env_file: dict[str, str] = {}

DEFAULT_CONFIG = "gateway.ini"


def config_path(explicit: str | Path | None = None) -> Path:
    """The ini file to use: ``explicit`` (``--config``), else ``GATEWAY_CONFIG`` from the
    environment, else ``GATEWAY_CONFIG`` from the ``.env`` of the current folder, else
    ``gateway.ini``."""
    if explicit:
        return Path(explicit)
    named = os.environ.get("GATEWAY_CONFIG")
    if not named:
        local = Path(".env")
        if local.is_file():
            named = dotenv_values(local).get("GATEWAY_CONFIG")
    return Path(named or DEFAULT_CONFIG)


def env_file(config: str | Path) -> Path:
    """The ``.env`` that belongs to ``config``: the one beside it."""
    return Path(config).resolve().parent / ".env"


def _apply_env(values: t.Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if name not in os.environ:
            os.environ[name] = value
            _from_env_file[name] = value


def load_env(global_conf: t.Mapping[str, str] | None = None) -> None:
    """Read the ``.env`` beside the ini file (``here`` in ``global_conf``), once per file.

    A variable already in the real environment is never replaced.
    """
    here = (global_conf or {}).get("here") or os.getcwd()
    path = (Path(here) / ".env").resolve()
    with _env_lock:
        if path in _loaded_env_files:
            return
        _loaded_env_files.add(path)
        if path.is_file():
            _apply_env(dotenv_values(path))


def refresh_env(config: str | Path) -> t.Callable[[], None]:
    """Read the ``.env`` beside ``config`` again (a reload); returns a function undoing it.

    Variables the process took from ``.env`` earlier follow the file: changed, added, or
    removed when the file no longer sets them. Real environment variables stay as they are.
    The undo function puts back what was there (for a new configuration that failed
    validation).
    """
    path = env_file(config)
    values = dotenv_values(path) if path.is_file() else {}
    with _env_lock:
        _loaded_env_files.add(path)
        before = {name: (os.environ.get(name), _from_env_file.get(name))
                  for name in set(values) | set(_from_env_file)}
        for name, ours in list(_from_env_file.items()):
            if os.environ.get(name) != ours:
                del _from_env_file[name]  # someone else set it since: no longer ours
            elif values.get(name) is None:
                del os.environ[name]
                del _from_env_file[name]
        for name, value in values.items():
            if value is not None and name in _from_env_file:
                os.environ[name] = value
                _from_env_file[name] = value
        _apply_env(values)

    def undo() -> None:
        with _env_lock:
            for name, (environ_value, ours) in before.items():
                if environ_value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = environ_value
                if ours is None:
                    _from_env_file.pop(name, None)
                else:
                    _from_env_file[name] = ours

    return undo


#: Variables the gateway reads from the environment itself (not through the ini file); they
#: count in the fingerprint too.
CODE_VARIABLES = ("LOG_LEVEL", "RELOAD", "RELOAD_INTERVAL", "OTEL_SDK_DISABLED",
                  "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME",
                  "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")


def config_fingerprint(config: str | Path) -> str:
    """12 hex digits naming this version of the configuration: the ini file, the ``.env``
    beside it, and the real environment's value of every variable the ini file reads
    (``${VAR}``) or the gateway reads itself (:data:`CODE_VARIABLES`). Containers and
    systemd units configure through the environment: two processes differently configured
    that way have different fingerprints. Each value enters as its SHA-256, inside the
    fingerprint's own hash: no value can be read back from it."""
    digest = hashlib.sha256()
    texts = []
    for path in (Path(config), env_file(config)):
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        texts.append(data)
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    names = set(CODE_VARIABLES)
    names.update(match.group(1) for match in _VAR.finditer(texts[0].decode("utf-8", "replace")))
    for name in sorted(names):
        value = os.environ.get(name)
        if value is None or _from_env_file.get(name) == value:
            continue  # unset, or from the .env (whose bytes are in already): as if unread
        digest.update(f"\0{name}=".encode())
        digest.update(hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest())
    return digest.hexdigest()[:12]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand(value: str, key: str | None = None, environ: t.Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``value``.

    ``${VAR:-default}`` uses the default when VAR is unset *or empty* (as the shell does);
    ``${VAR}`` with VAR unset is a ConfigError: a required variable is missing.
    """
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        current = env.get(name)
        if default is not None:
            return current if current else default
        if current is None:
            raise ConfigError(
                f"environment variable {name} is required but not set", key=key, value=value
            )
        return current

    if "${" not in value:
        return value
    return _VAR.sub(substitute, value)


# -- casters: each takes the expanded string, raises ValueError with a readable reason -----

def as_str(value: str) -> str:
    return value.strip()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def as_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected a boolean (true/false, yes/no, on/off, 1/0)")


def as_optional_str(value: str) -> str | None:
    """Empty means "not set": ``None``."""
    return value.strip() or None


def as_list(value: str) -> list[str]:
    """Comma- or newline-separated items, blanks dropped."""
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def as_optional_list(value: str) -> list[str] | None:
    """:func:`as_list`, where empty means "not set": ``None``."""
    return as_list(value) or None


def _as_int(value: str) -> int:
    try:
        return int(value.strip().replace("_", ""))
    except ValueError:
        raise ValueError("expected a whole number") from None


def as_positive_int(value: str) -> int:
    number = _as_int(value)
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def as_non_negative_int(value: str) -> int:
    number = _as_int(value)
    if number < 0:
        raise ValueError("expected a whole number of at least 0")
    return number


def _as_float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    return number


def as_positive_float(value: str) -> float:
    """A number above 0 (seconds, most often)."""
    number = _as_float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError("expected a positive number")
    return number


def as_non_negative_float(value: str) -> float:
    """A number of at least 0 (seconds where 0 means "none" or "at once")."""
    number = _as_float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError("expected a number of at least 0")
    return number


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def as_size(value: str) -> int:
    """A byte count: ``1048576``, ``512k``, ``10MB``, ``1GiB`` (binary multiples)."""
    match = _SIZE.match(value)
    if not match:
        raise ValueError("expected a size in bytes, e.g. 10485760, 512k, 10M or 1G")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def parse_listen(value: str) -> list[tuple[str, int]]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6), several separated by spaces; port 1-65535.

    Raises ``ValueError`` with a one-line reason (waitress itself would take port 99999 as
    "any free port" or print a traceback).
    """
    out = []
    for item in value.split():
        if item.startswith("["):
            host, sep, port = item[1:].partition("]:")
        else:
            host, sep, port = item.rpartition(":")
        if not sep or not host or ":" in host and not item.startswith("["):
            raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {item!r}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be a number from 1 to 65535, got {port!r}")
        out.append((host, int(port)))
    if not out:
        raise ValueError("expected HOST:PORT")
    return out


def as_cpu_affinity(value: str) -> str | frozenset[int]:
    """``auto``, ``off`` (also ``none``/``false``/``no``) or a CPU list such as ``0,2-3``
    (``[server:main] cpu_affinity``: :mod:`meetinity_gateway.serving.affinity`)."""
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    if text in ("off", "none", "false", "no"):
        return "off"
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or len(part) > 16:
            raise ValueError("expected auto, off or CPU numbers such as 0 or 0,2-3")
        first, last = int(low), int(high) if dash else int(low)
        if last < first or last - first > 4096:
            raise ValueError(f"{part}: a range goes from the lower CPU to the higher one")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def as_listen(value: str) -> str:
    """One or more ``HOST:PORT`` (see :func:`parse_listen`), spaces normalised."""
    parse_listen(value)
    return " ".join(value.split())


# -- tables -----------------------------------------------------------------------------

def prepare(
    local_conf: t.Mapping[str, str], global_conf: t.Mapping[str, str] | None = None
) -> dict[str, str]:
    """Load ``.env`` and expand every value of ``local_conf`` (the strings a factory gets)."""
    load_env(global_conf)
    file = (global_conf or {}).get("__file__")
    expanded = {}
    for key, value in local_conf.items():
        try:
            expanded[key] = expand(value, key=key)
        except ConfigError as exc:
            raise exc.locate(file=file) from None
    return expanded


def cast_settings(
    local_conf: t.Mapping[str, str],
    table: t.Mapping[str, Caster],
    global_conf: t.Mapping[str, str] | None = None,
    section: str | None = None,
) -> dict[str, t.Any]:
    """Expand and cast ``local_conf`` through ``table``; unknown keys are a ConfigError.

    Returns keyword arguments named as the ini keys; keys left out keep the class defaults.
    """
    file = (global_conf or {}).get("__file__")
    values = prepare(local_conf, global_conf)
    kwargs: dict[str, t.Any] = {}
    for key, value in values.items():
        caster = table.get(key)
        if caster is None:
            known = ", ".join(sorted(table))
            raise ConfigError(
                f"unknown key (known keys: {known})",
                file=file, section=section, key=key, value=value,
            )
        try:
            kwargs[key] = caster(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                str(exc) or "bad value", file=file, section=section, key=key, value=value
            ) from None
    return kwargs


def split_named(
    values: t.Mapping[str, str], *kinds: str
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Keys named ``KIND.NAME`` (``route.api``, ``rule.admin``) apart from the settings.

    Returns ``({kind: {NAME: value}}, rest)`` for each of ``kinds``, in the file's order;
    ``rest`` keeps every other key (``rule.`` without a name too) for the settings table,
    where a stray one is an unknown key.
    """
    named: dict[str, dict[str, str]] = {kind: {} for kind in kinds}
    rest: dict[str, str] = {}
    for key, value in values.items():
        kind, _, name = key.partition(".")
        if name and kind in named:
            named[kind][name] = value
        else:
            rest[key] = value
    return named, rest
