""".ci/run: it runs the README's test command, and any failed step fails it.

The script is run for real, in a copy of its folder layout, with ``python3`` replaced on
``PATH`` by a stub whose ``-m venv`` makes a stub interpreter: each step (pip, pytest,
flake8) then exits with the status the test chooses, and every call is recorded. So the test
proves the script's control flow without installing anything.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

CI_SCRIPT = ROOT / ".ci" / "run"
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason=".ci/run is a bash script")


def ci_test_command() -> str:
    match = re.search(r"^TEST_COMMAND='([^']+)'$", CI_SCRIPT.read_text(), re.MULTILINE)
    assert match, "TEST_COMMAND not found in .ci/run"
    return match.group(1)


def readme_commands() -> list[str]:
    """The one-line commands of the README's Quick start."""
    text = README.read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start"))]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_test_command_is_the_one_ci_runs():
    commands = readme_commands()
    assert len(commands) == 2, commands
    run, tests = commands
    assert tests == ci_test_command()
    # Both newcomer commands build the same virtualenv the same way, never a bare `python`
    # nor the system pip (absent, or refused by PEP 668, on stock Debian 12).
    for command in (run, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/python -m pip install ")
        assert not re.search(r"(^|&& )(python|pip|pip3) ", command)
    assert run.endswith(".venv/bin/meetinity-gateway init && .venv/bin/meetinity-gateway serve")


STUB_PYTHON3 = """#!/bin/sh
# python3 for the test: "-m venv DIR" makes DIR/bin/python (the stub interpreter below).
echo "python3 $*" >> "$FAKE_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python" && chmod +x "$3/bin/python"
fi
exit 0
"""

STUB_VENV_PYTHON = """#!/bin/sh
echo "venv-python $*" >> "$FAKE_LOG"
case "$2" in
  pip) exit "${FAKE_PIP:-0}" ;;
  pytest) exit "${FAKE_PYTEST:-0}" ;;
  flake8) exit "${FAKE_FLAKE8:-0}" ;;
esac
exit 0
"""


STUB_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$FAKE_LOG"
exit 0
"""


def run_ci(tmp_path: Path, test_text: str = "def test_x():\n    pass\n",
           search_path: str | None = None,
           **statuses: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """.ci/run in a copy of the repository with stubs first on PATH (then ``search_path``,
    default this process' PATH)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run .ci/run")
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "tests").mkdir()
    shutil.copy(CI_SCRIPT, repo / ".ci" / "run")
    (repo / "tests" / "test_nothing.py").write_text(test_text)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("python3", STUB_PYTHON3), ("venv-python", STUB_VENV_PYTHON),
                       ("apt-get", STUB_APT_GET), ("sudo", '#!/bin/sh\nexec "$@"\n')):
        path = stubs / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    if search_path is None:
        search_path = os.environ.get("PATH", "")
    env = {
        "PATH": f"{stubs}{os.pathsep}{search_path}",
        "FAKE_LOG": str(log),
        "FAKE_VENV_PYTHON": str(stubs / "venv-python"),
        **{f"FAKE_{key.upper()}": str(value) for key, value in statuses.items()},
    }
    result = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_ci_runs_install_then_tests_then_flake8(tmp_path):
    result, calls = run_ci(tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [call for call in calls if call.startswith(("python3 -m venv", "venv-python"))]
    assert steps == [
        "python3 -m venv .venv",
        "venv-python -m pip install -r requirements-dev.txt",
        "venv-python -m pytest",
        "venv-python -m flake8",
    ]


@pytest.mark.parametrize("step, status", [("pip", 1), ("pytest", 1), ("pytest", 5),
                                          ("flake8", 1)])
def test_ci_fails_when_any_step_fails(tmp_path, step, status):
    result, calls = run_ci(tmp_path, **{step: status})
    assert result.returncode != 0
    assert "tests and flake8 passed" not in result.stdout
    if step == "pip":
        # The failed install stops everything: pytest and flake8 never run.
        assert not any("pytest" in call or "flake8" in call for call in calls)
    if step == "pytest":
        assert result.returncode == status
        assert not any("flake8" in call for call in calls)
        if status == 5:
            assert "collected no test" in result.stderr


def test_ci_installs_the_debian_package_of_every_tool_a_test_requires(tmp_path):
    # Spelt in pieces: .ci/run scans this very file for require_tool("…") calls too.
    fake = "no-such-tool-" + "4711"
    test_text = ('from tests.conftest import require_tool\n'
                 'def test_x():\n    require_tool("' + fake + '", "why")\n'
                 'def test_y():\n    require_tool("bash", "present already")\n')
    result, calls = run_ci(tmp_path, test_text=test_text)
    assert result.returncode == 0, result.stderr
    installs = [call for call in calls if call.startswith("apt-get install")]
    assert len(installs) == 1 and installs[0].endswith(" " + fake), calls
    assert calls.index(installs[0]) < calls.index("python3 -m venv .venv")


def test_ci_installs_the_package_named_for_a_tool_of_another_name(tmp_path):
    # dockerd comes with Debian's docker.io. PATH without the sbin folders: "not installed".
    test_text = ('from tests.conftest import require_tool\n'
                 'def test_x():\n    require_tool("' + 'dockerd' + '", "why")\n')
    result, calls = run_ci(tmp_path, test_text=test_text, search_path="/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    installs = [call for call in calls if call.startswith("apt-get install")]
    assert len(installs) == 1 and installs[0].endswith(" docker.io"), calls
