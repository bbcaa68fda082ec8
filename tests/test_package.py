"""The package as a user installs it: a wheel from the standard build front end, installed
(not editable) into a fresh virtualenv, away from the source tree, serving the gateway.ini
that the installed package itself writes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from meetinity_gateway import __version__
from meetinity_gateway.shipped import SHIPPED_FILES, shipped_file
from tests.servers import ROOT, TEST_JWT_SECRET, free_port, session, wait_for_port

# Bounded: a build and an install from pip's cache take well under a minute on a quiet machine.
BUILD_TIMEOUT = 600


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env() -> dict[str, str]:
    """The caller's environment (pip's settings and cache included) without anything that
    would let the fresh virtualenv see the source tree or this virtualenv."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_version_is_in_one_place_and_the_changelog_names_it():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert headings and headings[0] == __version__
    assert "version = attr: meetinity_gateway.__version__" in (ROOT / "setup.cfg").read_text()
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License")
    assert re.search(r"^license = MIT$", (ROOT / "setup.cfg").read_text(), flags=re.MULTILINE)


def test_every_shipped_file_is_found_from_the_source_tree():
    for name in SHIPPED_FILES:
        assert shipped_file(name).read_bytes() == (ROOT / name).read_bytes()


def test_a_wheel_installed_as_a_user_would_serves_the_shipped_ini(tmp_path, upstream):
    env = _clean_env()
    dist = tmp_path / "dist"
    # `python -m build` makes the sdist, then the wheel from the unpacked sdist: a file that
    # MANIFEST.in forgets is missing from the wheel too.
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], tmp_path, env)
    [wheel] = dist.glob("meetinity_gateway-*.whl")
    assert wheel.name.startswith(f"meetinity_gateway-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "meetinity_gateway/proxy/__init__.py" in names
    assert {f"meetinity_gateway/shipped/{name}" for name in SHIPPED_FILES} <= names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env)

    site = tmp_path / "site"  # a user's folder: no gateway.ini, no source tree
    site.mkdir()
    env.pop("JWT_SECRET", None)
    where = _run([str(python), "-c", "import meetinity_gateway.proxy.app as m; print(m.__file__)"],
                 site, env)
    assert Path(where.strip()).is_relative_to(venv)
    gateway = str(bindir / "meetinity-gateway")
    assert _run([gateway, "--version"], site, env).strip() == __version__
    out = _run([gateway, "init"], site, env)
    assert "gateway.ini" in out and "JWT_SECRET" in out
    assert (site / "gateway.ini").read_bytes() == (ROOT / "gateway.ini").read_bytes()
    assert (site / ".env.example").read_bytes() == (ROOT / ".env.example").read_bytes()
    assert "configuration OK" in _run([gateway, "check"], site, env)

    port = free_port()
    serve_env = dict(env, USER_SERVICE_URL=upstream.url, JWT_SECRET=TEST_JWT_SECRET)
    process = subprocess.Popen([gateway, "serve", "--listen", f"127.0.0.1:{port}"],
                               cwd=str(site), env=serve_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, process=process)
        client = session()
        live = client.get(f"http://127.0.0.1:{port}/health/live", timeout=10)
        assert live.status_code == 200
        proxied = client.get(f"http://127.0.0.1:{port}/api/auth/echo", timeout=10)
        assert proxied.status_code == 200 and proxied.json()["path"] == "/auth/echo"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert f"meetinity-gateway {__version__}" in err.decode(errors="replace")
