"""The command line: check, routes, serve (a real child process), and the wsgi module."""
from __future__ import annotations

import subprocess
import sys

from meetinity_gateway.cli import main
from tests.servers import (
    ROOT,
    SHIPPED_INI,
    TEST_JWT_SECRET,
    GatewayProcess,
    WaitressServer,
    auth_headers,
    session,
)


def test_check_prints_pipeline_and_routes(monkeypatch, capsys):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    assert main(["check", "--config", str(SHIPPED_INI)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("pipeline (outermost first):")
    pipeline = [line.split(". ", 1)[1] for line in lines[start + 1:lines.index("routes:")]]
    assert pipeline[0] == "observe" and pipeline[-1] == "gateway"
    order = ["observe", "errors", "cors", "ratelimit", "auth", "authorize", "userlimit", "gateway"]
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
        echo = client.get(gateway.url + "/api/users/echo", headers=auth_headers())
        assert echo.status_code == 200
        assert echo.json()["path"] == "/users/echo"


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
