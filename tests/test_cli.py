"""The command line: check, routes, serve (a real child process), and the wsgi module."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from meetinity_gateway.cli import main
from tests.servers import (
    ROOT,
    SHIPPED_INI,
    TEST_JWT_SECRET,
    GatewayProcess,
    WaitressServer,
    auth_headers,
    free_port,
    session,
    wait_for_port,
)


#: main() reads .env files straight into os.environ: put the process back as it was.
pytestmark = pytest.mark.usefixtures("restore_environ")


def test_check_prints_pipeline_and_routes(monkeypatch, capsys):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    assert main(["check", "--config", str(SHIPPED_INI)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("pipeline (outermost first):")
    pipeline = [line.split(". ", 1)[1] for line in lines[start + 1:lines.index("routes:")]]
    assert pipeline[0] == "observe" and pipeline[-1] == "gateway"
    order = ["observe", "errors", "cors", "ratelimit", "auth", "authorize", "userlimit",
             "gateway"]
    assert pipeline == [name for name in order if name in pipeline]
    assert "  users: * /api/users/* -> user_service /users" in lines
    assert "  health: GET /health -> @health" in lines
    assert "configuration OK" in out


def test_check_reports_config_errors_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.ini"
    bad.write_text("[app:main]\nuse = egg:meetinity_gateway#main\nroute.x = /x -> nowhere\n")
    assert main(["check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: ")
    assert "unknown target 'nowhere'" in err and str(bad) in err


def test_routes_command(monkeypatch, capsys):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    assert main(["routes", "--config", str(SHIPPED_INI)]) == 0
    assert "auth: * /api/auth/* -> user_service /auth" in capsys.readouterr().out.splitlines()


def test_serve_runs_waitress_in_a_real_process(upstream):
    env = {"USER_SERVICE_URL": upstream.url, "JWT_SECRET": TEST_JWT_SECRET}
    with GatewayProcess(env=env) as gateway:
        client = session()
        live = client.get(gateway.url + "/health/live")
        assert live.status_code == 200
        assert live.headers["Server"] == "meetinity-gateway"
        echo = client.get(gateway.url + "/api/users/42/echo", headers=auth_headers())
        assert echo.status_code == 200
        assert echo.json()["path"] == "/users/42/echo"


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "meetinity_gateway", "--help"],
                            capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert result.returncode == 0
    assert "serve" in result.stdout and "check" in result.stdout


def test_wsgi_module_reads_gateway_config(monkeypatch, upstream):
    monkeypatch.setenv("GATEWAY_CONFIG", str(SHIPPED_INI))
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    monkeypatch.delitem(sys.modules, "meetinity_gateway.wsgi", raising=False)
    from meetinity_gateway.wsgi import application

    with WaitressServer(application) as server:
        response = session().get(server.url + "/api/auth/echo")
    assert response.json()["path"] == "/auth/echo"


def test_init_writes_a_random_secret_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JWT_SECRET")
    config = tmp_path / "gateway.ini"
    config.write_text(SHIPPED_INI.read_text())
    (tmp_path / ".env").write_text("USER_SERVICE_URL=http://127.0.0.1:5009")
    assert main(["init", "--config", str(config)]) == 0
    text = (tmp_path / ".env").read_text()
    assert text.startswith("USER_SERVICE_URL=http://127.0.0.1:5009\n")
    secret = [line for line in text.splitlines() if line.startswith("JWT_SECRET=")]
    assert len(secret) == 1 and len(secret[0]) > len("JWT_SECRET=") + 40
    assert main(["init", "--config", str(config)]) == 0  # idempotent
    assert (tmp_path / ".env").read_text() == text
    assert "nothing to do" in capsys.readouterr().out
    assert main(["check", "--config", str(config)]) == 0


def test_without_a_secret_the_shipped_ini_refuses_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JWT_SECRET")
    config = tmp_path / "gateway.ini"
    config.write_text(SHIPPED_INI.read_text())
    assert main(["check", "--config", str(config)]) == 2
    assert "secret is empty" in capsys.readouterr().err


# -- .env feeds everything, logging included (CLI and wsgi module) ---------------------------

def _config_dir(tmp_path, env_text: str, name: str = "gateway.ini"):
    folder = tmp_path / "conf"
    folder.mkdir(exist_ok=True)
    config = folder / name
    config.write_text(SHIPPED_INI.read_text())
    (folder / ".env").write_text(env_text)
    return config


def _child_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LOG_", "GATEWAY_", "JWT_", "USER_SERVICE_URL"))}
    env.update(extra)
    return env


def test_env_file_sets_log_format_and_level_of_serve(tmp_path, upstream):
    config = _config_dir(tmp_path, f"LOG_FORMAT=text\nLOG_LEVEL=INFO\n"
                                   f"USER_SERVICE_URL={upstream.url}\n"
                                   f"JWT_SECRET={TEST_JWT_SECRET}\n")
    child_env = _child_env()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--threads", "2"],
        env=child_env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=15, process=process)
        response = session().get(f"http://127.0.0.1:{port}/api/auth/echo", timeout=10)
        assert response.status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    access = [line for line in lines if " meetinity_gateway.access: " in line]
    assert access, lines
    assert not any(line.startswith("{") for line in lines), lines  # text, not JSON
    assert "path=/api/auth/echo" in access[0] and "status=200" in access[0]


def test_env_file_log_level_warning_silences_the_access_log(tmp_path, upstream):
    config = _config_dir(tmp_path, f"LOG_LEVEL=WARNING\nUSER_SERVICE_URL={upstream.url}\n"
                                   f"JWT_SECRET={TEST_JWT_SECRET}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--threads", "2"],
        env=_child_env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=15, process=process)
        assert session().get(f"http://127.0.0.1:{port}/api/auth/echo",
                             timeout=10).status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert "meetinity_gateway.access" not in err.decode()
    assert "/api/auth/echo" not in err.decode()


WSGI_PROBE = """
import logging
from meetinity_gateway import wsgi
root = logging.getLogger()
print(logging.getLevelName(root.level), type(root.handlers[0].formatter).__name__, wsgi.CONFIG)
"""


def test_env_file_sets_logging_of_the_wsgi_module(tmp_path):
    config = _config_dir(tmp_path, f"LOG_FORMAT=text\nLOG_LEVEL=WARNING\n"
                                   f"JWT_SECRET={TEST_JWT_SECRET}\n", name="other.ini")
    result = subprocess.run([sys.executable, "-c", WSGI_PROBE], capture_output=True, text=True,
                            timeout=60, cwd=str(tmp_path),
                            env=_child_env(GATEWAY_CONFIG=str(config)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["WARNING", "Formatter", str(config)]


def test_gateway_config_may_come_from_the_local_env_file(tmp_path):
    config = _config_dir(tmp_path, f"JWT_SECRET={TEST_JWT_SECRET}\nLOG_FORMAT=text\n",
                         name="edge.ini")
    (tmp_path / ".env").write_text("GATEWAY_CONFIG=conf/edge.ini\n")
    command = [sys.executable, "-m", "meetinity_gateway", "check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path), env=_child_env())
    assert result.returncode == 0, result.stderr
    assert f"config: {config.resolve()}" in result.stdout
    # The .env beside conf/edge.ini is read before logging: a bad LOG_FORMAT there stops it.
    (config.parent / ".env").write_text(f"JWT_SECRET={TEST_JWT_SECRET}\nLOG_FORMAT=xml\n")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path), env=_child_env())
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "LOG_FORMAT" in result.stderr
    assert result.stderr.startswith("configuration error: ")
    assert "Traceback" not in result.stderr


def test_real_environment_wins_over_env_file(tmp_path):
    config = _config_dir(tmp_path, f"JWT_SECRET={TEST_JWT_SECRET}\nLOG_FORMAT=xml\n")
    result = subprocess.run([sys.executable, "-m", "meetinity_gateway", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path), env=_child_env(LOG_FORMAT="text"))
    assert result.returncode == 0, result.stderr


# -- init --------------------------------------------------------------------------------------

def test_init_writes_the_shipped_ini_when_there_is_none(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JWT_SECRET")
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    out = capsys.readouterr().out
    assert "gateway.ini" in out and ".env.example" in out and "JWT_SECRET" in out
    assert (tmp_path / "gateway.ini").read_bytes() == SHIPPED_INI.read_bytes()
    assert (tmp_path / ".env.example").read_bytes() == (ROOT / ".env.example").read_bytes()
    assert main(["check"]) == 0  # the secret from the new .env: it starts as it is
    # An existing ini file (even an edited one) and .env.example are never overwritten.
    (tmp_path / "gateway.ini").write_text(SHIPPED_INI.read_text() + "\n# mine\n")
    (tmp_path / ".env.example").write_text("# mine\n")
    assert main(["init"]) == 0
    assert (tmp_path / "gateway.ini").read_text().endswith("# mine\n")
    assert (tmp_path / ".env.example").read_text() == "# mine\n"


def test_init_refuses_a_missing_folder_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JWT_SECRET")
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--config", str(tmp_path / "elsewhere" / "gw.ini")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: ") and err.count("\n") == 1
    assert "gw.ini" in err and "does not exist" in err
    assert not (tmp_path / ".env").exists()
    assert not (tmp_path / "elsewhere").exists()


def test_init_writes_beside_the_given_config_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("JWT_SECRET")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = tmp_path / "etc" / "gateway.ini"
    config.parent.mkdir()
    config.write_text(SHIPPED_INI.read_text())
    assert main(["init", "--config", str(config)]) == 0
    assert (config.parent / ".env").is_file()
    assert not (work / ".env").exists()


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_init_env_file_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv("JWT_SECRET")
    old_umask = os.umask(0)  # the mode must not depend on a careful umask
    try:
        config = tmp_path / "gateway.ini"
        config.write_text(SHIPPED_INI.read_text())
        assert main(["init", "--config", str(config)]) == 0
        assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
        # An existing .env readable by others is narrowed when the secret is added to it...
        os.environ.pop("JWT_SECRET")
        other = tmp_path / "other"
        other.mkdir()
        (other / "gateway.ini").write_text(SHIPPED_INI.read_text())
        (other / ".env").write_text("LOG_LEVEL=INFO\n")
        (other / ".env").chmod(0o644)
        assert main(["init", "--config", str(other / "gateway.ini")]) == 0
        assert stat.S_IMODE((other / ".env").stat().st_mode) == 0o600
        assert (other / ".env").read_text().startswith("LOG_LEVEL=INFO\n")
        # ...and when it already holds one.
        (other / ".env").chmod(0o644)
        assert main(["init", "--config", str(other / "gateway.ini")]) == 0
        assert stat.S_IMODE((other / ".env").stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


# -- help --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["serve"], ["check"], ["init"], ["routes"]])
def test_help_has_no_raw_markup(command):
    result = subprocess.run([sys.executable, "-m", "meetinity_gateway", *command, "--help"],
                            capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert result.returncode == 0
    assert "usage: meetinity-gateway" in result.stdout
    assert "`" not in result.stdout and "``" not in result.stdout
    assert ":class:" not in result.stdout and ":func:" not in result.stdout


def test_init_over_a_copied_env_example_fills_its_empty_secret(tmp_path, monkeypatch):
    """`cp .env.example .env; meetinity-gateway init` added a second JWT_SECRET line."""
    monkeypatch.delenv("JWT_SECRET")
    config = tmp_path / "gateway.ini"
    config.write_text(SHIPPED_INI.read_text())
    example = (ROOT / ".env.example").read_text()
    (tmp_path / ".env").write_text(example)
    assert main(["init", "--config", str(config)]) == 0
    text = (tmp_path / ".env").read_text()
    secrets = [line for line in text.splitlines() if line.startswith("JWT_SECRET=")]
    assert len(secrets) == 1 and len(secrets[0]) > len("JWT_SECRET=") + 40
    # Everything else of the example stays, in place.
    assert [line for line in text.splitlines() if not line.startswith("JWT_SECRET=")] == [
        line for line in example.splitlines() if not line.startswith("JWT_SECRET=")]
    assert main(["check", "--config", str(config)]) == 0


def test_check_piped_into_head_ends_quietly():
    """`meetinity-gateway check | head` printed a BrokenPipeError traceback."""
    env = dict(os.environ, JWT_SECRET=TEST_JWT_SECRET)
    result = subprocess.run(
        f"'{sys.executable}' -m meetinity_gateway check --config '{SHIPPED_INI}' | head -n 1",
        shell=True, env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert result.stdout.startswith("config: ")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_several_workers_under_waitress_are_refused_with_the_reason(capsys):
    assert main(["serve", "--config", str(SHIPPED_INI), "--workers", "2",
                 "--listen", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "[server:main] workers = '2': waitress serves from one process" in err
    assert "--server gunicorn or granian" in err


def test_the_fingerprint_follows_the_environment_the_ini_reads(monkeypatch, capsys):
    """An RS256 + JWKS process and a default HS256 one reported the same fingerprint: only
    the ini file and .env were hashed."""
    def fingerprint() -> str:
        assert main(["check", "--config", str(SHIPPED_INI)]) == 0
        [line] = [x for x in capsys.readouterr().out.splitlines()
                  if x.startswith("fingerprint: ")]
        return line

    plain = fingerprint()
    assert fingerprint() == plain  # stable
    monkeypatch.setenv("JWT_ALGORITHMS", "HS256, RS256")
    monkeypatch.setenv("JWT_JWKS_URL", "https://id.example.com/jwks.json")
    other = fingerprint()
    assert other != plain
    # A secret changes it too, without being readable from it.
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET + "x")
    assert fingerprint() not in (plain, other)
    # A variable the ini does not read changes nothing.
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    monkeypatch.delenv("JWT_ALGORITHMS")
    monkeypatch.delenv("JWT_JWKS_URL")
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    assert fingerprint() == plain
