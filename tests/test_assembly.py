"""Loading gateway.ini: our loader, PasteDeploy, and the errors a bad file gets."""
from __future__ import annotations

from pathlib import Path

import pytest
from paste.deploy import loadapp

from meetinity_gateway import make_app
from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.proxy.app import ProxyApp
from meetinity_gateway.routing import Router
from tests.servers import SHIPPED_INI, TEST_JWT_SECRET, WaitressServer, session


@pytest.fixture
def shipped_env(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    monkeypatch.setenv("USER_SERVICE_URL", "http://127.0.0.1:5999")


def layers(app):
    """The chain of WSGI objects from outermost to the router."""
    chain = []
    while app is not None:
        chain.append(app)
        app = getattr(app, "app", None) if not isinstance(app, Router) else None
    return chain


def describe(app):
    chain = layers(app)
    router = chain[-1]
    return ([type(layer).__name__ for layer in chain], router.describe(),
            sorted((name, vars(e).get("base_url"), getattr(e, "timeout", None))
                   for name, e in router.endpoints.items()))


def test_shipped_ini_builds_the_same_pipeline_with_our_loader_and_pastedeploy(shipped_env):
    ours = load_pipeline(SHIPPED_INI)
    theirs = loadapp(f"config:{SHIPPED_INI}")
    assert describe(ours.app) == describe(theirs)
    assert ours.names[-1] == "gateway"
    assert [type(layer).__name__ for layer in layers(ours.app)][0] == "ObserveMiddleware"
    router = layers(ours.app)[-1]
    assert isinstance(router.endpoints["user_service"], ProxyApp)
    assert router.endpoints["user_service"].base_url == "http://127.0.0.1:5999"


def test_pipeline_order_is_outermost_first(shipped_env):
    pipeline = load_pipeline(SHIPPED_INI)
    classes = [type(layer).__name__ for layer in layers(pipeline.app)]
    expected = {"observe": "ObserveMiddleware",
                "errors": "ErrorMiddleware", "cors": "CorsMiddleware",
                "ratelimit": "RateLimitMiddleware", "auth": "AuthMiddleware",
                "authorize": "AuthorizeMiddleware", "userlimit": "RateLimitMiddleware",
                "gateway": "Router"}
    assert len(classes) == len(pipeline.names)
    for name, cls in zip(pipeline.names, classes):
        assert expected[name] == cls


def test_make_app_serves(shipped_env):
    with WaitressServer(make_app(SHIPPED_INI)) as server:
        response = session().get(server.url + "/health/live")
    assert response.json() == {"status": "ok", "service": "api-gateway"}


def write(tmp_path: Path, app_section: str, extra: str = "") -> Path:
    path = tmp_path / "gw.ini"
    path.write_text(
        "[pipeline:main]\npipeline = errors gateway\n\n"
        "[filter:errors]\nuse = egg:meetinity_gateway#errors\n\n"
        "[app:gateway]\nuse = egg:meetinity_gateway#main\n" + app_section + "\n" + extra
    )
    return path


GOOD = "upstream.svc = http://127.0.0.1:5001\nroute.svc = /api/svc/* -> svc /svc\n"


def test_a_minimal_file_loads(tmp_path):
    pipeline = load_pipeline(write(tmp_path, GOOD))
    assert pipeline.names == ["errors", "gateway"]
    assert pipeline.router.describe() == ["svc: * /api/svc/* -> svc /svc"]


@pytest.mark.parametrize("app_section, where", [
    (GOOD + "read_timeout = soon\n", "[app:gateway] read_timeout = 'soon': expected a number"),
    (GOOD + "colour = blue\n", "[app:gateway] colour = 'blue': unknown key"),
    (GOOD + "trusted_proxies = -1\n", "trusted_proxies = '-1'"),
    ("upstream.svc = ftp://h\nroute.svc = /x/* -> svc\n", "upstream.svc = 'ftp://h'"),
    ("upstream.svc = http://h\nroute.svc = /x/* -> nowhere\n", "unknown target 'nowhere'"),
    ("upstream.svc = http://h\nroute.svc = x -> svc\n", "route.svc = 'x -> svc'"),
    ("upstream.svc = http://h\n", "no routes"),
    ("upstream.svc = ${GW_TEST_UNSET_VAR}\nroute.svc = /x/* -> svc\n",
     "GW_TEST_UNSET_VAR is required but not set"),
])
def test_bad_app_sections_fail_at_start_naming_file_section_key(tmp_path, app_section, where):
    path = write(tmp_path, app_section)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert str(path) in message
    assert where in message


APP = "[app:gateway]\nuse = egg:meetinity_gateway#main\nroute.x = /x -> @live\n"


@pytest.mark.parametrize("text, where", [
    ("[pipeline:main]\npipeline = errors gateway\n[app:gateway]\n"
     "use = egg:meetinity_gateway#main\nroute.x = /x -> @live\n", "no section [filter:errors]"),
    ("[pipeline:main]\npipeline =\n", "empty pipeline"),
    ("[other]\nx = 1\n", "no [pipeline:main] or [app:main]"),
    ("[pipeline:main]\npipeline = x gateway\n[filter:x]\nuse = egg:no_such_dist#x\n"
     + APP, "'no_such_dist' is not installed"),
    ("[pipeline:main]\npipeline = x gateway\n[filter:x]\nuse = egg:meetinity_gateway#nope\n"
     + APP, "no paste.filter_factory entry point"),
    ("[pipeline:main]\npipeline = x gateway\n[filter:x]\nuse = somewhere\n"
     + APP, "expected egg:DIST#NAME"),
    ("[pipeline:main]\npipeline = x gateway\n[filter:x]\nuse = call:no.such:thing\n"
     + APP, "cannot import call:no.such:thing"),
    ("[pipeline:main]\npipeline = gateway\n[app:gateway]\nroute.x = /x -> @live\n",
     "missing 'use"),
    ("not an ini file", "not a valid ini file"),
])
def test_bad_files_fail_at_start(tmp_path, text, where):
    path = tmp_path / "gw.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert where in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_pipeline(tmp_path / "absent.ini")


def test_filter_errors_name_their_section(tmp_path):
    path = write(tmp_path, GOOD)
    errors = "use = egg:meetinity_gateway#errors"
    path.write_text(path.read_text().replace(errors, errors + "\ncheck_paths = maybe"))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert "[filter:errors] check_paths = 'maybe'" in str(info.value)


def test_default_section_does_not_leak_into_factories(tmp_path):
    path = write(tmp_path, GOOD)
    path.write_text("[DEFAULT]\nlog_colour = blue\n\n" + path.read_text())
    assert load_pipeline(path).names == ["errors", "gateway"]


def test_call_factories_and_here(tmp_path):
    path = tmp_path / "gw.ini"
    path.write_text("[app:main]\nuse = call:meetinity_gateway.assembly:app_factory\n"
                    "route.live = GET /live -> @live\n")
    pipeline = load_pipeline(path)
    assert pipeline.names == ["main"]
    assert pipeline.router.describe() == ["live: GET /live -> @live"]


def test_env_file_beside_the_ini(tmp_path, monkeypatch):
    monkeypatch.delenv("GW_TEST_DOTENV_URL", raising=False)
    (tmp_path / ".env").write_text("GW_TEST_DOTENV_URL=http://127.0.0.1:5123\n")
    path = write(tmp_path, "upstream.svc = ${GW_TEST_DOTENV_URL}\nroute.svc = /s/* -> svc\n")
    pipeline = load_pipeline(path)
    assert pipeline.router.endpoints["svc"].base_url == "http://127.0.0.1:5123"
    monkeypatch.delenv("GW_TEST_DOTENV_URL", raising=False)


# -- per-route upstream policy (issue 12, point 4) ---------------------------------------------

POLICY = GOOD + (
    "route.slow = /api/slow/* -> svc /slow\n"
    "route.idle = /api/idle/* -> svc /idle\n"
    "read_timeout = 30\nretries = 2\n"
    "policy.slow = read_timeout=120, connect_timeout=1.5, max_body_size=50M, retries=0\n"
    "policy.idle = idle_timeout=1\n"
)


def test_route_policies_get_their_own_proxy_app_sharing_the_pool(tmp_path):
    pipeline = load_pipeline(write(tmp_path, POLICY))
    router = pipeline.router
    shared = router.endpoints["svc"]
    slow = router.route_apps["slow"]
    assert isinstance(slow, ProxyApp) and slow.pool is shared.pool
    assert (slow.timeout, slow.max_body_size, slow.retries) == ((1.5, 120.0), 50 * 2 ** 20, 0)
    # An idle timeout of its own needs a connection pool of its own.
    idle = router.route_apps["idle"]
    assert idle.pool is not shared.pool
    assert idle.pool.targets[0].pool.idle_timeout == 1.0
    assert set(router.route_apps) == {"slow", "idle"}  # the others use the upstream's app
    assert router.notes == {
        "svc": "connect 3s, read 30s, body 10M, retries 2, idle 4s",
        "slow": "connect 1.5s, read 120s, body 50M, retries 0, idle 4s",
        "idle": "connect 3s, read 30s, body 10M, retries 2, idle 1s",
    }
    # waitress' own body cap follows the largest route limit.
    assert pipeline.max_body_size == 50 * 2 ** 20


@pytest.mark.parametrize("line, message", [
    ("policy.svc = read_timeout=soon", "read_timeout: expected a number"),
    ("policy.svc = colour=blue", "expected KEY=VALUE with KEY one of"),
    ("policy.svc = read_timeout", "expected KEY=VALUE"),
    ("policy.svc = ", "expected KEY=VALUE pairs"),
    ("policy.nope = retries=0", "no route named 'nope'"),
    ("route.live = GET /live -> @live\npolicy.live = retries=0", "goes to @live"),
])
def test_bad_route_policies_name_the_key(tmp_path, line, message):
    path = write(tmp_path, GOOD + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    key = line.splitlines()[-1].split(" =")[0]
    assert (info.value.file, info.value.section, info.value.key) == (
        str(path), "app:gateway", key)
    assert message in info.value.message


def test_an_empty_upstream_url_unmounts_its_routes(tmp_path):
    path = write(tmp_path, GOOD + "upstream.other = \nroute.other = /api/other/* -> other\n"
                 "policy.other = retries=0\n")
    router = load_pipeline(path).router
    assert router.upstreams == {"svc": "http://127.0.0.1:5001"}
    assert router.unmounted_upstreams == ["other"]
    assert "other" not in router.endpoints
    assert router.describe()[-1] == "other: * /api/other/* -> other [not mounted: other has no URL]"
    # Header rules may name an unmounted route; a typo is still caught.
    transform = "transform.t = other response set X-A b\n"
    assert load_pipeline(write(tmp_path, GOOD + "upstream.other = \n"
                               "route.other = /api/other/* -> other\n" + transform)).router
    with pytest.raises(ConfigError, match="unknown route 'othr'"):
        load_pipeline(write(tmp_path, GOOD + "upstream.other = \n"
                            "route.other = /api/other/* -> other\n" + transform.replace(
                                "= other", "= othr")))
    # Ties with unmounted routes are found now, not on the day their URL is set.
    path = write(tmp_path, GOOD + "upstream.other = \nroute.other = /api/svc/* -> other\n")
    with pytest.raises(ConfigError, match="already routed by svc"):
        load_pipeline(path)


def test_the_start_up_line_says_which_services_are_mounted(tmp_path):
    from meetinity_gateway.assembly import mounted_summary

    pipeline = load_pipeline(
        write(tmp_path, GOOD + "upstream.other = \nroute.other = /o/* -> other\n"))
    assert mounted_summary(pipeline.router) == (
        "upstreams mounted: svc=http://127.0.0.1:5001; not mounted (empty URL): other")
