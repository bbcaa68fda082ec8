"""``GET /status``: a live, server-rendered status page for operators.

One HTML page, no script, no external asset, readable on a phone (tables scroll sideways),
refreshing itself every ``refresh`` seconds (``<meta http-equiv="refresh">``), with

* first, the overall state: ``ok``, ``degraded`` (a target ejected, an upstream in panic
  routing, a fail-open rate limiter without its storage) or ``failing`` (an upstream with
  every target ejected, a fail-closed rate limiter without its storage), and why;
* per route, the traffic since start: requests, server errors (5xx), mean duration and the
  95th percentile (the bucket of the observe layer's duration histogram it falls in);
* the configuration's fingerprint and file, the version, when the page was made;
* the pipeline, outermost layer first;
* the route table: methods, path, target, rewrite, whether a token is required, the rate-limit
  rule that applies, and for upstream routes the policy (timeouts, body limit, retries);
  the routes of an unmounted service (empty URL) are listed as such;
* every upstream target: weight, state (``healthy``, or ``ejected`` with the seconds left),
  consecutive failures, requests in flight, and the error rate of its last
  ``window`` seconds (failed / all attempts and health probes);
* each rate-limit layer's storage (password hidden), its state and its rules.

It is a built-in endpoint (``route.status = GET /status -> @status``, like ``@health``), so it
is logged and counted like any request; :func:`meetinity_gateway.assembly.load_pipeline`
hands it the loaded pipeline (:meth:`StatusApp.attach_pipeline`) so it can show the layers.
Under another loader (``gunicorn --paste``, ``pserve``) the pipeline comes from
:func:`meetinity_gateway.assembly.adopt`: the page is the same.

Only clients in ``detail_allow`` (the same allow-list as ``/metrics``, checked on the trusted
client address) see it; anyone else gets the JSON 404 of an unknown path. Every value is
HTML-escaped, and the answer carries a strict Content-Security-Policy
(``default-src 'none'``, the page's one style block allowed by its SHA-256 hash), so even a
value that slipped through could neither run script nor load anything.
"""
from __future__ import annotations

import base64
import hashlib
import html
import time
import typing as t

from meetinity_gateway import __version__
from meetinity_gateway.logs import iso_time, redact_uri
from meetinity_gateway.net import DEFAULT_ALLOW, client_allowed, parse_networks
from meetinity_gateway.pipeline import described
from meetinity_gateway.problems import error_response
from meetinity_gateway.routeview import route_policies

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from meetinity_gateway.pipeline import Layer, Pipeline
    from meetinity_gateway.routing import Router

__all__ = ["CONTENT_SECURITY_POLICY", "StatusApp"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#1d232a;background:#fafbfc}
table{display:block;max-width:100%;overflow-x:auto}
.state{font-size:1.2em;padding:.4em .7em;border-radius:4px;display:inline-block}
.state.ok{background:#e3f4e8;color:#11702f}.state.degraded{background:#fff4d6;color:#7a5300}
.state.failing{background:#fde7e5;color:#b3261e}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.3em 0 1em;background:#fff}
th,td{border:1px solid #d5dbe1;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4}code{font:13px ui-monospace,monospace}
.meta{color:#56606b}.healthy{color:#11702f;font-weight:600}
.ejected,.failing,.panic{color:#b3261e;font-weight:600}
ol{margin:.3em 0 1em}
""".strip()
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: No script, no frame, no request of any kind; only the page's own style block.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_STARTED = time.time()


def _e(value: t.Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: t.Sequence[str], rows: t.Iterable[t.Sequence[str]]) -> str:
    """A table; cells are HTML already (escape values before)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class StatusApp:
    """The status page (see the module docstring).

    :param endpoints: the router's endpoints by target name (upstreams are the ones with a
        ``pool``).
    :param detail_allow: networks whose clients may see the page (default loopback and
        private ranges).
    :param trusted_proxies: proxy hops trusted in ``X-Forwarded-For`` to find the client.
    :param fingerprint: the configuration's fingerprint.
    :param refresh: seconds between two reloads of the page by the browser.
    :param window: seconds of history in the error rates.
    """

    def __init__(
        self,
        endpoints: t.Mapping[str, t.Any],
        *,
        detail_allow: t.Iterable[str] = DEFAULT_ALLOW,
        trusted_proxies: int = 0,
        fingerprint: str | None = None,
        file: str | None = None,
        refresh: int = 5,
        window: float = 60.0,
    ) -> None:
        self.endpoints = endpoints
        self.detail_allow = parse_networks(detail_allow)
        self.trusted_proxies = trusted_proxies
        self.fingerprint = fingerprint
        self.file = file
        self.refresh = refresh
        self.window = window
        self.router: Router | None = None
        self.pipeline: Pipeline | None = None

    def attach_pipeline(self, pipeline: Pipeline) -> None:
        """Called by the loader once the whole pipeline is built."""
        self.pipeline = pipeline
        self.router = pipeline.router
        self.fingerprint = pipeline.fingerprint or self.fingerprint
        self.file = pipeline.file

    # -- what the layers say ---------------------------------------------------------------

    def _layers(self) -> list[Layer]:
        """The layers, outermost first, each with its kind (meetinity_gateway.pipeline)."""
        return described(self.pipeline) if self.pipeline is not None else []

    def _ratelimiters(self) -> list[t.Any]:
        return [layer.app for layer in self._layers() if layer.kind == "ratelimit"]

    def _observers(self) -> list[t.Any]:
        return [layer.app for layer in self._layers()
                if layer.kind == "observe" and layer.app.registry is not None]

    # -- sections --------------------------------------------------------------------------

    def overall(self) -> tuple[str, list[str]]:
        """``("ok" | "degraded" | "failing", reasons)``: what an operator needs first."""
        failing, degraded = [], []
        for name, endpoint in sorted(self.endpoints.items()):
            pool = getattr(endpoint, "pool", None)
            if pool is None:
                continue
            rows = pool.snapshot()
            ejected = [row["target"] for row in rows if row["state"] == "ejected"]
            if rows and len(ejected) == len(rows):
                failing.append(f"upstream {name}: every target ejected (panic routing)")
            elif ejected:
                degraded.append(f"upstream {name}: {len(ejected)} of {len(rows)} target(s) "
                                "ejected")
        for limiter in self._ratelimiters():
            if limiter.storage_failing:
                uri = limiter.storage_uri
                where = redact_uri(uri) if uri else "its storage"
                text = f"rate limiting: {where} is failing, on_error={limiter.on_error}"
                (failing if limiter.on_error == "closed" else degraded).append(text)
        if failing:
            return "failing", failing + degraded
        return ("degraded" if degraded else "ok"), degraded

    def _overall(self) -> str:
        state, reasons = self.overall()
        items = "".join(f"<li>{_e(reason)}</li>" for reason in reasons)
        return (f'<p><span class="state {_e(state)}">{_e(state)}</span></p>'
                + (f"<ul>{items}</ul>" if items else ""))

    def _traffic(self) -> str:
        """Requests, 5xx, mean and p95 duration per route, from the observe layer's
        metrics (since the process started)."""
        observers = self._observers()
        if not observers:
            return "<p class=meta>no metrics layer</p>"
        routes: dict[str, dict[str, t.Any]] = {}
        for family in observers[0].registry.collect():
            for sample in family.samples:
                route = sample.labels.get("route")
                if route is None or "method" not in sample.labels:
                    continue
                row = routes.setdefault(route, {"count": 0.0, "errors": 0.0, "sum": 0.0,
                                                "buckets": {}})
                if sample.name.endswith("_requests_total"):
                    row["count"] += sample.value
                    if sample.labels.get("status") == "5xx":
                        row["errors"] += sample.value
                elif sample.name.endswith("_request_duration_seconds_sum"):
                    row["sum"] += sample.value
                elif sample.name.endswith("_request_duration_seconds_bucket"):
                    bound = float(sample.labels["le"])
                    row["buckets"][bound] = row["buckets"].get(bound, 0.0) + sample.value
        rows = []
        for route, row in sorted(routes.items(), key=lambda item: -item[1]["count"]):
            count = row["count"]
            if not count:
                continue
            p95 = next((bound for bound, seen in sorted(row["buckets"].items())
                        if seen >= 0.95 * count), None)
            p95_text = "—" if p95 is None else (
                "&gt; last bucket" if p95 == float("inf") else f"≤ {p95 * 1000:g} ms")
            rows.append((
                f"<code>{_e(route)}</code>", _e(f"{count:.0f}"),
                _e(f"{row['errors']:.0f} ({100.0 * row['errors'] / count:.1f} %)"),
                _e(f"{1000.0 * row['sum'] / count:.1f} ms"), p95_text,
            ))
        if not rows:
            return "<p class=meta>no request yet</p>"
        return _table(("route", "requests", "5xx", "mean", "p95"), rows)

    def _summary(self) -> str:
        now = time.time()
        rows = [
            ("configuration fingerprint", f"<code>{_e(self.fingerprint or 'unknown')}</code>"),
            ("configuration file", f"<code>{_e(self.file or 'unknown')}</code>"),
            ("version", _e(__version__)),
            ("page made", _e(iso_time(now))),
            ("process up since", _e(iso_time(_STARTED))),
        ]
        return "<table><tbody>" + "".join(
            f"<tr><th>{_e(name)}</th><td>{value}</td></tr>" for name, value in rows
        ) + "</tbody></table>"

    def _pipeline(self) -> str:
        if self.pipeline is None:
            return "<p class=meta>unknown: not loaded by meetinity_gateway's loader</p>"
        items = "".join(f"<li><code>{_e(name)}</code></li>" for name in self.pipeline.names)
        rows = [(f"<code>{_e(layer.name)}</code>", _e(layer.kind),
                 "<br>".join(f"<code>{_e(line)}</code>" for line in layer.describe()) or "—")
                for layer in self._layers()]
        return f"<ol>{items}</ol>" + (_table(("layer", "kind", "settings"), rows) if rows else "")

    def _routes(self) -> str:
        if self.router is None:
            return "<p class=meta>no router</p>"
        by_name = {route.name: route for route in self.router.routes}
        rows = []
        layers = [(layer.name, layer.app) for layer in self._layers()]
        for view in route_policies(self.router, layers):
            route = by_name[view.route]
            rows.append((
                f"<code>{_e(view.route)}</code>", _e(view.methods),
                f"<code>{_e(view.path)}</code>", f"<code>{_e(view.sample)}</code>",
                f"<code>{_e(route.target)}</code>", f"<code>{_e(route.rewrite or '')}</code>",
                "<br>".join(f"{_e(name)}: <code>{_e(text)}</code>"
                            for name, text in view.layers) or "—",
                _e(view.upstream),
            ))
        for route in self.router.unmounted:  # listed, never matched: their paths get a 404
            path = route.path + ("/*" if route.prefix and route.path != "/" else "")
            methods = sorted(route.methods) if route.methods else ["*"]
            rows.append((
                f"<code>{_e(route.name)}</code>", _e(", ".join(methods)),
                f"<code>{_e(path)}</code>", "—", f"<code>{_e(route.target)}</code>",
                f"<code>{_e(route.rewrite or '')}</code>", "—",
                f'<span class="failing">not mounted: {_e(route.target)} has no URL</span>',
            ))
        return _table(("route", "methods", "path", "asked for", "target", "rewrite",
                       "policy (each layer's decision)", "upstream policy"), rows)

    def _error_rate(self, target, now: float) -> str:
        recent = [ok for at, ok in list(getattr(target, "recent", ())) if now - at <= self.window]
        if not recent:
            return "—"
        failed = recent.count(False)
        return f"{failed}/{len(recent)} ({100.0 * failed / len(recent):.0f} %)"

    def _upstreams(self) -> str:
        parts = []
        now = time.monotonic()
        in_flight = 0
        for name, endpoint in sorted(self.endpoints.items()):
            pool = getattr(endpoint, "pool", None)
            if pool is None:
                continue
            by_label = {target.label: target for target in pool.targets}
            rows = []
            for row in pool.snapshot():
                target = by_label.get(row["target"])
                state = row["state"]
                shown = state
                if "ejected_for" in row:
                    shown = f"ejected ({row['ejected_for']:.0f} s left)"
                in_flight += row["outstanding"]
                rows.append((
                    f"<code>{_e(row['target'])}</code>", _e(row["weight"]),
                    f'<span class="{_e(state)}">{_e(shown)}</span>', _e(row["failures"]),
                    _e(row["outstanding"]),
                    _e(self._error_rate(target, now) if target is not None else "—"),
                ))
            parts.append(
                f"<h3><code>{_e(name)}</code> <span class=meta>{_e(pool.balance)}, ejected "
                f"after {_e(pool.max_fails)} failure(s) for {_e(f'{pool.eject_time:g}')} s"
                f"</span></h3>"
                + _table(("target", "weight", "state", "failures", "in flight",
                          f"errors, last {self.window:g} s"), rows))
        if not parts:
            return "<p class=meta>no upstream</p>"
        return f"<p>requests in flight upstream: <strong>{in_flight}</strong></p>" + "".join(parts)

    def _ratelimit(self) -> str:
        limiters = self._ratelimiters()
        if not limiters:
            return "<p class=meta>no rate-limit layer</p>"
        rows = []
        for limiter in limiters:
            storage = limiter.limiter.storage
            uri = limiter.storage_uri
            try:
                reachable = bool(storage.check())
            except Exception:  # a storage down is what this page is for
                reachable = False
            state = ("ok" if reachable else "unreachable")
            klass = "healthy" if reachable else "failing"
            counters = getattr(storage, "storage", None)
            if isinstance(counters, t.Mapping):
                state += f", {len(counters)} counters in memory"
            rows.append((
                f"<code>{_e(redact_uri(uri) if uri else type(storage).__name__)}</code>",
                _e(type(limiter.limiter).__name__),
                f'<span class="{klass}">{_e(state)}</span>',
                "<br>".join(f"<code>{_e(line)}</code>" for line in limiter.describe()) or "—",
            ))
        return _table(("storage", "strategy", "state", "rules"), rows)

    def render(self) -> str:
        """The page's HTML."""
        return (
            "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="refresh" content="{int(self.refresh)}">'
            '<meta name="referrer" content="no-referrer">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>meetinity gateway status</title><style>{_STYLE}</style></head><body>"
            "<h1>Meetinity gateway status</h1>"
            + self._overall()
            + f"<p class=meta>refreshes every {int(self.refresh)} s</p>"
            + "<h2>Traffic per route (since start)</h2>" + self._traffic()
            + self._summary()
            + "<h2>Pipeline (outermost first)</h2>" + self._pipeline()
            + "<h2>Routes</h2>" + self._routes()
            + "<h2>Upstreams</h2>" + self._upstreams()
            + "<h2>Rate limiting</h2>" + self._ratelimit()
            + "</body></html>\n"
        )

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        if not client_allowed(environ, self.detail_allow, self.trusted_proxies):
            # The same answer as for a path without a route: nothing to see here.
            return error_response(environ, start_response, 404,
                                  f"no route for {environ.get('PATH_INFO', '')}")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return error_response(environ, start_response, 405, "method not allowed",
                                  [("Allow", "GET, HEAD")])
        body = self.render().encode("utf-8")
        start_response("200 OK", [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
        ])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]
