"""Serving mistakes are one-line configuration errors with exit status 2 (the real CLI in a
child process), and the settings table behind them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from meetinity_gateway.config import ConfigError, parse_listen
from meetinity_gateway.settings import read_settings
from tests.servers import ROOT, SHIPPED_INI, TEST_JWT_SECRET, free_port


def serve(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    child_env.update({"JWT_SECRET": TEST_JWT_SECRET}, **env)
    return subprocess.run(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(SHIPPED_INI),
         *args],
        env=child_env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("configuration error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0",
                                    "127.0.0.1:-1", "127.0.0.1:http", ":8080", "::1:8080",
                                    "[::1]8080"])
def test_bad_listen_option_is_one_line(listen):
    one_line_error(serve("--listen", listen), "--listen", repr(listen))


def test_bad_listen_variable_names_the_ini_key():
    line = one_line_error(serve(GATEWAY_LISTEN="127.0.0.1:99999"),
                          "[server:main] listen", "99999")
    assert str(SHIPPED_INI) in line


@pytest.mark.parametrize("env,needle", [
    ({"GATEWAY_THREADS": "zero"}, "[server:main] threads = 'zero'"),
    ({"GATEWAY_THREADS": "0"}, "threads = '0'"),
    ({"GATEWAY_CONNECTION_LIMIT": "lots"}, "connection_limit"),
    ({"GATEWAY_DRAIN_SECONDS": "-1"}, "drain_seconds"),
    ({"GATEWAY_SERVER": "apache"}, "server = 'apache'"),
])
def test_bad_server_variables_are_one_line(env, needle):
    one_line_error(serve(**env), needle)


@pytest.mark.parametrize("threads", ["0", "zero", "-3"])
def test_bad_threads_option_is_one_line(threads):
    one_line_error(serve("--threads", threads, "--listen", f"127.0.0.1:{free_port()}"),
                   "--threads")


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = one_line_error(serve("--listen", f"127.0.0.1:{port}"), "listen", str(port))
    assert "in use" in line


def test_unknown_host_is_one_line():
    one_line_error(serve("--listen", "no-such-host.invalid:8080"), "no-such-host.invalid")


def test_unknown_server_key_is_one_line(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text(SHIPPED_INI.read_text(encoding="utf-8").replace(
        "[server:main]\n", "[server:main]\nthreadz = 4\n"), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(ini)],
        env=dict(os.environ, JWT_SECRET=TEST_JWT_SECRET), cwd=str(tmp_path),
        capture_output=True, text=True, timeout=30)
    one_line_error(result, "threadz", "unknown key")


# -- the table itself ---------------------------------------------------------------------------

def test_parse_listen_accepts_ipv4_ipv6_names_and_several():
    assert parse_listen("127.0.0.1:8080 [::1]:8081 localhost:1") == [
        ("127.0.0.1", 8080), ("::1", 8081), ("localhost", 1)]


def test_shipped_settings_and_overrides(monkeypatch):
    monkeypatch.setenv("GATEWAY_DRAIN_SECONDS", "0")
    settings = read_settings(SHIPPED_INI, threads="3", listen="127.0.0.1:9000")
    assert settings["threads"] == 3 and settings["listen"] == "127.0.0.1:9000"
    assert settings["drain_seconds"] == 0 and settings["server"] == "waitress"
    assert settings["connection_limit"] == 2000 and settings["header_timeout"] == 10
    with pytest.raises(ConfigError, match="--threads = 'x'"):
        read_settings(SHIPPED_INI, threads="x")
