"""Recording stand-ins for the four Meetinity services, built from their route tables.

The real services cannot run in this suite: their code is not this project's to vendor and CI
has no network to fetch it; the matching service needs PostgreSQL (JSONB columns), the event
service a search backend and a database, the user service a database and, for its cache, Redis;
all of them Flask, SQLAlchemy and their own dependency sets. So each stand-in is a small WSGI
app that knows exactly the paths and methods its service serves (read from the services'
Flask blueprints: ``meetinity-user-service`` ``src/routes``, and the ``meetinity`` monorepo's
``services/{event,matching,messaging}-service``), answers 404/405 for anything else as Flask
does, reads the caller the way the service does (the messaging service only from
``Authorization: Bearer <id>|user:<id>``; the others from nothing at all), answers with the
service's response shapes (a user record with its private parts; ``{"items": [...]}`` for a
search), and records every request it got.

Served by a real waitress on loopback (:class:`tests.servers.WaitressServer`).
"""
from __future__ import annotations

import json
import re
import typing as t

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

# (methods, Flask path) per service, as their blueprints declare them.
USER_ROUTES = [
    ("GET", "/health"), ("GET", "/metrics"),
    ("POST", "/auth/<provider>"), ("GET", "/auth/<provider>/callback"),
    ("POST", "/auth/verify"), ("POST", "/auth/verification/request"),
    ("POST", "/auth/verification/confirm"), ("GET", "/auth/profile"),
    ("GET", "/users"), ("GET", "/users/<int:user_id>"), ("PUT", "/users/<int:user_id>"),
    ("DELETE", "/users/<int:user_id>"), ("PUT", "/users/<int:user_id>/preferences"),
    ("PUT", "/users/<int:user_id>/privacy"), ("POST", "/users/<int:user_id>/photo"),
    ("POST", "/users/<int:user_id>/activities"), ("GET", "/users/<int:user_id>/activities"),
    ("GET", "/users/search"), ("POST", "/users/<int:user_id>/sessions"),
    ("GET", "/users/<int:user_id>/sessions"),
    ("DELETE", "/users/<int:user_id>/sessions/<int:session_id>"),
    ("GET", "/users/<int:user_id>/export"), ("POST", "/users/<int:user_id>/erase"),
    ("POST", "/users/<int:user_id>/connections"), ("GET", "/users/<int:user_id>/connections"),
    ("PATCH", "/users/<int:user_id>/connections/<int:connection_id>"),
    ("DELETE", "/users/<int:user_id>/connections/<int:connection_id>"),
]
_CATALOG = [("GET", "/{0}"), ("POST", "/{0}"), ("GET", "/{0}/<int:item_id>"),
            ("PUT", "/{0}/<int:item_id>"), ("PATCH", "/{0}/<int:item_id>"),
            ("DELETE", "/{0}/<int:item_id>")]
EVENT_ROUTES = [
    ("GET", "/health"), ("GET", "/events"), ("GET", "/events/calendar"), ("GET", "/events/map"),
    ("POST", "/events"), ("GET", "/events/<int:event_id>"), ("PATCH", "/events/<int:event_id>"),
    ("POST", "/events/<int:event_id>/bookmark"), ("DELETE", "/events/<int:event_id>/bookmark"),
    ("GET", "/events/<int:event_id>/bookmark"), ("POST", "/events/from-template"),
    ("POST", "/events/<int:event_id>/translations"),
    ("PUT", "/events/<int:event_id>/translations/<locale>"),
    ("DELETE", "/events/<int:event_id>/translations/<locale>"),
    ("POST", "/events/<int:event_id>/submit"), ("POST", "/events/<int:event_id>/approve"),
    ("POST", "/events/<int:event_id>/reject"),
    ("POST", "/events/<int:event_id>/networking/profiles"),
    ("GET", "/events/<int:event_id>/networking/profiles"),
    ("POST", "/events/<int:event_id>/networking/suggestions"),
    ("GET", "/events/<int:event_id>/networking/suggestions"),
    ("POST", "/events/<int:event_id>/feedback"), ("GET", "/events/<int:event_id>/feedback"),
    ("PATCH", "/events/<int:event_id>/feedback/<int:feedback_id>"),
    ("GET", "/events/<int:event_id>/speakers"), ("POST", "/events/<int:event_id>/speakers"),
    ("PATCH", "/events/<int:event_id>/speakers/<int:speaker_id>"),
    ("DELETE", "/events/<int:event_id>/speakers/<int:speaker_id>"),
    ("GET", "/events/<int:event_id>/sponsors"), ("POST", "/events/<int:event_id>/sponsors"),
    ("PATCH", "/events/<int:event_id>/sponsors/<int:sponsor_id>"),
    ("DELETE", "/events/<int:event_id>/sponsors/<int:sponsor_id>"),
    ("GET", "/search/events"), ("GET", "/users/<user_id>/recommendations"),
    *[(m, p.format(name)) for name in ("event-categories", "event-tags", "event-series",
                                       "event-templates") for m, p in _CATALOG],
    ("POST", "/event-templates/<int:item_id>/translations"),
    ("PUT", "/event-templates/<int:item_id>/translations/<locale>"),
    ("DELETE", "/event-templates/<int:item_id>/translations/<locale>"),
    ("POST", "/events/<int:event_id>/join"), ("DELETE", "/events/<int:event_id>/join"),
    ("GET", "/events/<int:event_id>/registrations"), ("GET", "/events/<int:event_id>/waitlist"),
    ("POST", "/events/<int:event_id>/waitlist/promote"),
    ("GET", "/events/<int:event_id>/attendance"), ("POST", "/events/<int:event_id>/attendance"),
    ("POST", "/check-in/<token>"),
]
MATCHING_ROUTES = [
    ("GET", "/health"), ("POST", "/internal/users"), ("GET", "/matches/<int:user_id>"),
    ("POST", "/swipe"), ("GET", "/algorithm/suggest/<int:user_id>"),
]
MESSAGING_ROUTES = [
    ("GET", "/health"), ("GET", "/conversations"), ("POST", "/conversations"),
    ("GET", "/conversations/<int:conversation_id>/messages"),
    ("POST", "/conversations/<int:conversation_id>/messages"),
    ("POST", "/conversations/<int:conversation_id>/attachments"),
    ("GET", "/conversations/<int:conversation_id>/attachments/<int:message_id>"),
    ("POST", "/conversations/<int:conversation_id>/read"),
]


def user_record(user_id: int) -> dict[str, t.Any]:
    """A user as the user service's schema dumps it: public profile and private parts."""
    return {
        "id": user_id, "email": f"user{user_id}@example.com", "name": f"User {user_id}",
        "photo_url": None, "title": "Engineer", "company": "Acme", "location": "Lyon",
        "industry": "tech", "linkedin_url": None, "experience_years": 5, "bio": "hello",
        "skills": ["python"], "interests": ["ai"], "provider": "google",
        "provider_user_id": f"g-{user_id}", "timezone": "Europe/Paris",
        "privacy_settings": {"show_email": False}, "active_tokens": ["tok-abc"],
        "preferences": {"language": "fr"}, "activities": [{"id": 1, "activity_type": "login"}],
        "connections": [{"id": 3, "target_user_id": 9}],
        "verifications": [{"id": 4, "method": "email", "status": "pending"}],
        "sessions": [{"id": 5, "session_token": "abcd…", "ip_address": "203.0.113.9",
                      "user_agent": "Mobile"}],
    }


PRIVATE_USER_FIELDS = ("email", "privacy_settings", "active_tokens", "preferences",
                       "activities", "connections", "verifications", "sessions",
                       "provider_user_id")


def _messaging_caller(environ) -> int | None:
    """The caller as the messaging service reads it (``Bearer 42`` or ``Bearer user:42``)."""
    value = environ.get("HTTP_AUTHORIZATION", "").strip()
    if not value.lower().startswith("bearer "):
        return None
    token = value.split(" ", 1)[1].strip()
    match = re.fullmatch(r"(?:(?:user|uid)[:-])?(\d+)", token, re.IGNORECASE)
    return int(match.group(1)) if match else None


class StandIn:
    """A recording WSGI stand-in for one service (see the module docstring)."""

    def __init__(self, name: str, routes: list[tuple[str, str]]) -> None:
        self.name = name
        self.requests: list[dict[str, t.Any]] = []
        self.map = Map([Rule(path, methods=[method], endpoint=(method, path))
                        for method, path in routes], strict_slashes=False)

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        adapter = self.map.bind_to_environ(environ)
        try:
            (_, template), values = adapter.match()
        except HTTPException as exc:
            self.requests.append({"method": method, "path": path, "route": None,
                                  "headers": _headers(environ), "body": body})
            return self._json(start_response, exc.code, {"error": exc.name})
        self.requests.append({"method": method, "path": path, "route": template,
                              "headers": _headers(environ), "body": body})
        status, payload = self.answer(method, template, values, environ, body)
        return self._json(start_response, status, payload)

    def answer(self, method, template, values, environ, body):
        if self.name == "user" and template == "/users/<int:user_id>" and method == "GET":
            return 200, {"user": user_record(values["user_id"])}
        if self.name == "user" and template == "/users/search":
            return 200, {"items": [user_record(7), user_record(42)], "page": 1, "per_page": 20,
                         "total": 2, "query": environ.get("QUERY_STRING", "")}
        if self.name == "user" and template == "/auth/verification/request":
            payload = _json_or_none(body)
            if not isinstance(payload, dict) or not isinstance(payload.get("user_id"), int):
                return 422, {"error": "user_id must be an integer"}
            return 201, {"verification": {"id": 1, "user_id": payload["user_id"]}}
        if self.name == "matching" and template == "/swipe":
            payload = _json_or_none(body)
            if not isinstance(payload, dict) or not all(
                    isinstance(payload.get(k), int) and not isinstance(payload.get(k), bool)
                    for k in ("user_id", "target_id")):
                return 400, {"error": "Invalid request"}
            return 200, {"swipe": payload}
        if self.name == "messaging":
            caller = _messaging_caller(environ)
            if caller is None:
                return 401, {"error": "Jeton d'authentification manquant ou invalide."}
            return 200, {"caller": caller, "route": template}
        return 200, {"service": self.name, "route": template, "method": method}

    @staticmethod
    def _json(start_response, status, payload):
        data = json.dumps(payload).encode()
        reason = {200: "OK", 201: "CREATED", 400: "BAD REQUEST", 401: "UNAUTHORIZED",
                  404: "NOT FOUND", 405: "METHOD NOT ALLOWED", 422: "UNPROCESSABLE ENTITY"}
        start_response(f"{status} {reason.get(status, 'STATUS')}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data)))])
        return [data]


def _json_or_none(body: bytes) -> t.Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _headers(environ) -> dict[str, str]:
    return {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
            if key.startswith("HTTP_")}


def standins() -> dict[str, StandIn]:
    return {"user": StandIn("user", USER_ROUTES), "event": StandIn("event", EVENT_ROUTES),
            "matching": StandIn("matching", MATCHING_ROUTES),
            "messaging": StandIn("messaging", MESSAGING_ROUTES)}
