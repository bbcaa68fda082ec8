"""The pipeline model (pipeline.py): every layer says what it is and what it is set to; check,
/status and /health read that, and a filter that is not the gateway's is shown, not guessed."""
from __future__ import annotations

from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.cli import main as cli_main
from meetinity_gateway.pipeline import FOREIGN, startup_line
from meetinity_gateway.routeview import route_policies
from tests.servers import SHIPPED_INI, TEST_JWT_SECRET, write_ini

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def test_every_shipped_layer_says_what_it_is_and_how_it_is_set():
    pipeline = load_pipeline(SHIPPED_INI)
    layers = pipeline.described()
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("observe", "observe"), ("errors", "errors"), ("cors", "cors"),
        ("ratelimit", "ratelimit"), ("auth", "auth"), ("authorize", "authorize"),
        ("userlimit", "ratelimit")]
    for layer in layers:
        lines = layer.describe()
        assert lines and all(isinstance(line, str) and line for line in lines), layer.name
        assert TEST_JWT_SECRET not in "\n".join(lines)
    assert [layer.name for layer in pipeline.of_kind("ratelimit")] == ["ratelimit", "userlimit"]
    # Layers with no say per path answer None; those with one answer text.
    by_kind = {layer.kind: layer for layer in layers}
    for kind in ("observe", "errors", "cors"):
        assert by_kind[kind].policy_for("/api/users/7", "GET") is None
    assert by_kind["auth"].policy_for("/api/users/7", "GET") == "token"
    assert by_kind["auth"].policy_for("/health", "GET") == "public (/health)"
    line = startup_line(pipeline)
    assert " -> ".join(pipeline.names) in line and f"(config {pipeline.fingerprint})" in line


def foreign_filter(global_conf, **local_conf):
    """A filter factory of an operator's own: no kind, no describe, no policy_for."""
    class Foreign:
        def __init__(self, app):
            self.app = app

        def __call__(self, environ, start_response):
            environ["HTTP_X_FOREIGN"] = "seen"
            return self.app(environ, start_response)

    return Foreign


FOREIGN_INI = """\
[pipeline:main]
pipeline = mine errors gateway

[filter:mine]
use = call:tests.test_pipeline:foreign_filter

[filter:errors]
use = egg:meetinity_gateway#errors

[app:gateway]
use = egg:meetinity_gateway#main
route.live = GET /live -> @live
route.status = GET /status -> @status
"""


def test_a_filter_of_your_own_is_shown_as_foreign(tmp_path, capsys):
    config = write_ini(tmp_path / "gateway.ini", FOREIGN_INI)
    pipeline = load_pipeline(config)
    mine, errors = pipeline.described()
    assert (mine.name, mine.kind, mine.describe()) == ("mine", FOREIGN, [])
    assert mine.policy_for("/live", "GET") is None and errors.kind == "errors"
    views = route_policies(pipeline.router, pipeline.layers.items())
    assert views and all(dict(view.layers) == {} for view in views)
    assert cli_main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "layer mine (foreign): —" in out and "layer errors (errors):" in out
    assert "  request id header: X-Request-ID" in out
    app = TestApp(LintMiddleware(pipeline.app), extra_environ=LOOPBACK)
    page = app.get("/status").text
    assert "<code>mine</code></td><td>foreign</td><td>—</td>" in page
    assert "request id header: X-Request-ID" in page
    assert app.get("/live").status_code == 200
