"""The docs stay true: every variable of ``.env.example``, every key of ``gateway.ini`` and every
key the code's settings tables accept has its line in ``docs/configuration.md`` (with the
shipped default), every relative link of the README and ``docs/`` leads to a file and heading
that exist, and the documented commands run.

The settings tables are asked, not imported: each factory (found through the package's entry
points, as PasteDeploy finds it) is given an unknown key and names the keys it knows in its
ConfigError, so the check follows the code wherever a table lives."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from meetinity_gateway.config import ConfigError
from tests.servers import ROOT, SHIPPED_INI

CONFIGURATION = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
CLI = str(Path(sys.executable).parent / "meetinity-gateway")
UNKNOWN = "no_such_key_for_the_docs_test"

#: Keys whose name part is the operator's (``rule.auth``): documented as ``rule.NAME`` etc.
NAMED = re.compile(r"^(rule|route|upstream|policy|transform|fields)\.")
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-(.*?))?\}")


def reference() -> str:
    return CONFIGURATION.read_text(encoding="utf-8")


def section_text(section: str) -> str:
    """The part of the reference under the ``## …[section]…`` heading."""
    text = reference()
    match = re.search(rf"^## [^\n]*\[{re.escape(section)}\][^\n]*$", text, re.M)
    assert match, f"docs/configuration.md has no heading for [{section}]"
    end = text.find("\n## ", match.end())
    return text[match.start():end if end != -1 else len(text)]


def row(block: str, key: str) -> str | None:
    match = re.search(rf"^\| `{re.escape(key)}` \|.*$", block, re.M)
    return match.group(0) if match else None


def documented_key(key: str) -> str:
    named = NAMED.match(key)
    if not named:
        return key
    return named.group(1) + (".ROUTE" if named.group(1) == "policy" else ".NAME")


def shipped_ini() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(SHIPPED_INI, encoding="utf-8")
    return parser


def test_every_env_example_variable_is_in_the_reference():
    names = re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M)
    assert len(names) > 50, names  # the parse found the file's variables
    text = reference()
    missing = [name for name in dict.fromkeys(names) if f"`{name}`" not in text]
    assert missing == [], f"variables of .env.example missing from docs/configuration.md: {missing}"


def test_every_ini_key_is_in_its_section_with_its_variable_and_default():
    parser = shipped_ini()
    checked = 0
    for section in parser.sections():
        block = section_text(section)
        for key, value in parser[section].items():
            line = row(block, documented_key(key))
            assert line, f"[{section}] {key}: no row `{documented_key(key)}` in its section"
            variables = VARIABLE.findall(value)
            for name, default in variables:
                # The variable and its shipped default on one row of the section.
                rows = [text for text in block.splitlines()
                        if text.startswith("|") and f"`{name}`" in text]
                assert rows, f"[{section}] {key}: ${{{name}}} not in its section's tables"
                expected = default.strip() or "empty"
                assert any(expected in text for text in rows), \
                    f"[{section}] {key}: ${{{name}}}'s default {expected!r} not on its row"
            if not variables and not NAMED.match(key):
                assert f"`{' '.join(value.split())}`" in line, \
                    f"[{section}] {key}: the shipped value {value!r} not on its row"
            checked += 1
    assert checked > 100, checked


def known_keys(error: ConfigError | str) -> list[str]:
    match = re.search(r"known keys: ([^)]*)\)", str(error))
    assert match, str(error)
    return [key.strip() for key in match.group(1).split(",")]


def factory_tables() -> dict[str, list[str]]:
    """Section → the keys its factory accepts, asked of the factory itself."""
    sections = {}
    everything = entry_points()
    groups = {"paste.filter_factory": "filter:{}", "paste.app_factory": "app:gateway"}
    for group, section in groups.items():
        for point in everything.select(group=group):
            if not point.value.startswith("meetinity_gateway."):
                continue
            with pytest.raises(ConfigError) as info:
                point.load()({"__file__": str(SHIPPED_INI)}, **{UNKNOWN: "1"})
            sections[section.format(point.name)] = known_keys(info.value)
    return sections


def test_every_key_of_the_settings_tables_is_in_its_section():
    tables = factory_tables()
    assert {"filter:auth", "filter:ratelimit", "filter:userlimit", "app:gateway"} <= set(tables)
    missing = []
    for section, keys in tables.items():
        block = section_text(section)
        missing += [f"[{section}] {key}" for key in keys if not row(block, key)]
    assert missing == [], f"keys the code accepts, missing from docs/configuration.md: {missing}"


def test_every_server_setting_is_in_the_server_section():
    """The ``[server:main]`` runner (``pserve``'s) asked the same way, in a child process: it
    sets up logging as a server does. The unknown key stops it before anything listens."""
    probe = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "from meetinity_gateway.config import ConfigError\n"
        "[runner] = [p for p in entry_points().select(group='paste.server_runner')\n"
        "            if p.value.startswith('meetinity_gateway.')]\n"
        "try:\n"
        f"    runner.load()(lambda e, s: [], {{'__file__': sys.argv[1]}}, {UNKNOWN}='1',\n"
        "                  listen='127.0.0.1:0')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(SHIPPED_INI)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert UNKNOWN in result.stdout, result.stdout + result.stderr
    block = section_text("server:main")
    keys = known_keys(result.stdout)
    assert "listen" in keys and "drain_seconds" in keys, keys
    assert [key for key in keys if not row(block, key)] == []


# -- links ------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[|\]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.is_file(), doc
    broken = []
    for link in links(doc):
        if re.match(r"^[a-z]+:", link):
            continue  # https://…: not checked offline
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{link}: no heading #{anchor} in {path.name}")
    assert broken == [], broken


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]:
        assert str(page.relative_to(ROOT)) in links(ROOT / "README.md"), page


# -- commands ---------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """Only what a shell gives a newcomer: no gateway variable, no test secret."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT", "TMP", "TEMP")
    return {name: os.environ[name] for name in keep if name in os.environ}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=clean_env())


def documented_commands() -> dict[str, set[str]]:
    """Subcommand → the options the docs use with it (``meetinity-gateway serve --reload``)."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for match in re.finditer(r"meetinity-gateway ([a-z][a-z-]*)([^`\n|]*)",
                                 doc.read_text(encoding="utf-8")):
            found.setdefault(match.group(1), set()).update(
                re.findall(r"(--[a-z][a-z-]+)", match.group(2)))
    return found


def test_every_documented_command_and_option_exists():
    commands = documented_commands()
    assert {"serve", "check", "routes", "init"} <= set(commands), commands
    for command, options in commands.items():
        result = run(command, "--help", cwd=ROOT)
        assert result.returncode == 0, f"meetinity-gateway {command}: {result.stderr}"
        for option in options:
            assert option in result.stdout, f"meetinity-gateway {command} has no {option}"


def test_the_documented_commands_run(tmp_path):
    """``init`` in an empty folder, then ``check`` and ``routes`` there, as the README says.
    Nothing listens and nothing connects: the shipped upstream is on loopback."""
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "init" in result.stdout, result.stderr
    result = run("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {".env", ".env.example", "gateway.ini"} <= {p.name for p in tmp_path.iterdir()}
    assert re.search(r"^JWT_SECRET=\S{32,}$", (tmp_path / ".env").read_text(), re.M)
    result = run("init", cwd=tmp_path)
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stdout
    check = run("check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "observe" in check.stdout and "userlimit" in check.stdout, check.stdout
    routes = run("routes", cwd=tmp_path)
    assert routes.returncode == 0, routes.stderr
    for name in shipped_ini()["app:gateway"]:
        if name.startswith("route."):
            assert re.search(rf"^\s*{name[6:]}: ", routes.stdout, re.M), (name, routes.stdout)


# -- the middlewares' snippets ----------------------------------------------------------------

def snippets() -> list[str]:
    text = (ROOT / "docs" / "middlewares.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_there_is_a_snippet_per_layer():
    text = "\n".join(snippets())
    for name in ("ErrorMiddleware", "ObserveMiddleware", "CorsMiddleware",
                 "RateLimitMiddleware", "AuthMiddleware", "AuthorizeMiddleware", "ProxyApp"):
        assert f"import {name}" in text, name


@pytest.mark.parametrize("code", snippets(), ids=lambda code: code.split("import ")[1].split()[0])
def test_every_middleware_snippet_runs_and_answers_as_written(code, monkeypatch):
    from werkzeug.middleware.lint import LintMiddleware
    from werkzeug.test import Client

    monkeypatch.chdir(ROOT)  # the pipeline's snippet reads gateway.ini from here
    scope: dict = {"hello": hello}
    exec(compile(code, "docs/middlewares.md", "exec"), scope)  # noqa: S102 - our own docs
    app = scope["app"]
    assert callable(app)
    for method, path, headers, status in re.findall(
            r"^# ([A-Z]+) (/\S*)((?: [\w-]+=\S+)*) -> (\d{3})$", code, re.M):
        fields = dict(item.split("=", 1) for item in headers.split())
        # From loopback, as a local client would call (werkzeug sets no REMOTE_ADDR).
        response = Client(LintMiddleware(app)).open(
            path, method=method, headers=fields, environ_base={"REMOTE_ADDR": "127.0.0.1"})
        body = response.get_data(as_text=True)
        response.close()
        assert response.status_code == int(status), (path, body)


def test_the_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = ROOT / "meetinity_gateway"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if path.name == "__init__.py" and not path.read_text(encoding="utf-8").strip():
            continue  # an empty package marker
        if f"`{relative}`" not in text and f"`{path.name}`" not in text:
            missing.append(relative)
    assert missing == [], f"modules missing from docs/architecture.md: {missing}"


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package → the package modules it imports, at load time, under
    ``TYPE_CHECKING`` or inside a function alike (the package's version is a leaf)."""
    import ast

    package = ROOT / "meetinity_gateway"
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name == "meetinity_gateway":
            continue  # the version, and make_app's lazy import of the loader
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            found.update(m for m in modules
                         if m.startswith("meetinity_gateway.") and m != name)
    return graph


def test_no_module_imports_one_that_imports_it_back():
    """The modules form layers (docs/architecture.md, 'Who imports whom'): following imports
    from any module, lazy and type-only ones included, never leads back to it."""
    graph = _package_imports()
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for child in sorted(graph.get(name, ())):
            if child == trail[0]:
                cycles.append(" → ".join([*trail, child]))
            elif child not in trail and len(trail) < len(graph):
                visit(child, [*trail, child])

    for module in graph:
        visit(module, [module])
    assert cycles == [], cycles
