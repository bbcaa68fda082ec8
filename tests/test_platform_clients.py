"""The clients' calls and the cross-user attempts, replayed through the shipped gateway.

The shipped gateway.ini runs under a real waitress; behind it, each Meetinity service is a
recording stand-in built from its route table (:mod:`tests.standins` says why the real
services cannot run here), itself served by a real waitress. Every call of the mobile app and
of the admin portal (their ``src/services``) is replayed: it reaches a service path that
exists, or is refused on purpose as the README's route table says. Every cross-user attempt
the gateway can see (path, claims, JSON body, response fields) is refused before any service
sees it, or answered without the other user's private fields.
"""
from __future__ import annotations

import json

import pytest

from tests.servers import WaitressServer, make_token, session, shipped_gateway
from tests.standins import PRIVATE_USER_FIELDS, standins

ADA = make_token(sub=42, email="ada@example.com", lifetime=3600)
BOB = make_token(sub=7, email="bob@example.com", lifetime=3600)
ADMIN = make_token(sub=1, email="staff@example.com", role="admin", lifetime=3600)
NO_SUB = make_token(sub=None, lifetime=3600)


@pytest.fixture(scope="module")
def platform():
    monkeypatch = pytest.MonkeyPatch()
    services = standins()
    servers = {name: WaitressServer(app) for name, app in services.items()}
    env = {f"{name.upper()}_SERVICE_URL": server.url for name, server in servers.items()}
    env.update(JWT_SECRET="test-only-secret-0123456789abcdef0123456789abcdef",
               RATE_LIMIT_AUTH="100000/minute", RATE_LIMIT_USERS="100000/minute",
               RATE_LIMIT_EVENTS="100000/minute", RATE_LIMIT_MESSAGING="100000/minute",
               RATE_LIMIT_MATCHING="100000/minute")
    gateway = shipped_gateway(monkeypatch, env)
    try:
        yield gateway, services
    finally:
        gateway.stop()
        for server in servers.values():
            server.stop()
        monkeypatch.undo()


def call(platform, method, path, token=None, body=None, raw=None, content_type=None):
    gateway, services = platform
    before = {name: len(app.requests) for name, app in services.items()}
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    with session() as http:
        response = http.request(method, gateway.url + path, headers=headers, data=data,
                                timeout=15)
    reached = [(name, app.requests[-1]) for name, app in services.items()
               if len(app.requests) > before[name]]
    assert len(reached) <= 1
    return response, (reached[0] if reached else (None, None))


# -- every client call: (method, path, token, body) -> service and its route, or a refusal ----

ROUTED = [
    # The mobile app (src/services: AuthService, eventsService, messagingService).
    ("POST", "/api/auth/google", None, None, "user", "/auth/<provider>"),
    ("GET", "/api/auth/google/callback?code=x", None, None, "user", "/auth/<provider>/callback"),
    ("GET", "/api/auth/profile", ADA, None, "user", "/auth/profile"),
    ("GET", "/events?type=meetup", ADA, None, "event", "/events"),
    ("GET", "/events/5", ADA, None, "event", "/events/<int:event_id>"),
    ("POST", "/events/5/join", ADA, {"email": "ada@example.com"}, "event",
     "/events/<int:event_id>/join"),
    ("GET", "/conversations", ADA, None, "messaging", "/conversations"),
    ("GET", "/conversations/9/messages", ADA, None, "messaging",
     "/conversations/<int:conversation_id>/messages"),
    ("POST", "/conversations/9/messages", ADA, {"text": "hi"}, "messaging",
     "/conversations/<int:conversation_id>/messages"),
    ("POST", "/conversations/9/read", ADA, None, "messaging",
     "/conversations/<int:conversation_id>/read"),
    # The admin portal (src/services: eventService, userService).
    ("GET", "/api/events", ADMIN, None, "event", "/events"),
    ("GET", "/api/events/5", ADMIN, None, "event", "/events/<int:event_id>"),
    ("POST", "/api/events", ADMIN, {"title": "x"}, "event", "/events"),
    ("POST", "/api/events/5/approve", ADMIN, {"notes": "ok"}, "event",
     "/events/<int:event_id>/approve"),
    ("POST", "/api/events/5/reject", ADMIN, {"reason": "no"}, "event",
     "/events/<int:event_id>/reject"),
    ("GET", "/api/events/tags", ADMIN, None, "event", "/event-tags"),
    ("GET", "/api/events/categories", ADMIN, None, "event", "/event-categories"),
    ("POST", "/api/events/categories", ADMIN, {"name": "x"}, "event", "/event-categories"),
    ("PUT", "/api/events/categories/3", ADMIN, {"name": "y"}, "event",
     "/event-categories/<int:item_id>"),
    ("DELETE", "/api/events/categories/3", ADMIN, None, "event",
     "/event-categories/<int:item_id>"),
    ("GET", "/api/users?page=2", ADMIN, None, "user", "/users"),
    # The event service's own paths that had no route.
    ("GET", "/api/event-tags", ADA, None, "event", "/event-tags"),
    ("GET", "/api/event-series/2", ADA, None, "event", "/event-series/<int:item_id>"),
    ("GET", "/api/event-templates", ADA, None, "event", "/event-templates"),
    ("POST", "/api/event-templates", ADMIN, {"name": "t"}, "event", "/event-templates"),
    ("GET", "/api/search/events?q=ai", ADA, None, "event", "/search/events"),
    ("POST", "/api/check-in/tok-123", ADMIN, {"method": "qr"}, "event", "/check-in/<token>"),
    ("GET", "/api/events/calendar", ADA, None, "event", "/events/calendar"),
    # Staff work, by staff.
    ("POST", "/api/events/5/attendance", ADMIN, None, "event",
     "/events/<int:event_id>/attendance"),
    ("POST", "/api/events/5/waitlist/promote", ADMIN, None, "event",
     "/events/<int:event_id>/waitlist/promote"),
    ("PATCH", "/api/events/5/feedback/3", ADMIN, {"status": "hidden"}, "event",
     "/events/<int:event_id>/feedback/<int:feedback_id>"),
    ("GET", "/api/events/5/registrations", ADMIN, None, "event",
     "/events/<int:event_id>/registrations"),
    # A user's own actions, bound to the token.
    ("POST", "/api/matching/swipe", ADA, {"user_id": 42, "target_id": 7, "action": "like"},
     "matching", "/swipe"),
    ("POST", "/api/events/5/bookmark", ADA, {"user_id": "42"}, "event",
     "/events/<int:event_id>/bookmark"),
    ("POST", "/api/events/5/join", ADA, {"email": "ada@example.com", "name": "Ada"}, "event",
     "/events/<int:event_id>/join"),
    ("POST", "/api/auth/verification/request", ADA, {"user_id": 42, "method": "email"}, "user",
     "/auth/verification/request"),
    ("GET", "/api/matching/matches/42", ADA, None, "matching", "/matches/<int:user_id>"),
]


@pytest.mark.parametrize("method, path, token, body, service, route", ROUTED)
def test_a_client_call_reaches_a_service_path_that_exists(platform, method, path, token, body,
                                                          service, route):
    response, (reached, request) = call(platform, method, path, token, body)
    assert reached == service, (response.status_code, response.text)
    assert request["route"] == route
    assert response.status_code in (200, 201), response.text


# Calls the clients make that no service serves: the gateway refuses them (no route) or the
# service answers its own 404/405 (README "Routes": what the clients call and nobody serves).
NOT_SERVED = [
    # mobile app: no service has these paths
    ("POST", "/auth/refresh", ADA, None, 404, None),
    ("POST", "/events/5/leave", ADA, None, 404, None),
    ("GET", "/matches", ADA, None, 404, None),
    ("GET", "/matches/feed", ADA, None, 404, None),
    ("GET", "/matches/status", ADA, None, 404, None),
    ("POST", "/matches/3/accept", ADA, None, 404, None),
    ("POST", "/matches/3/decline", ADA, None, 404, None),
    ("POST", "/matches/likes/sync", ADA, {"likes": []}, 404, None),
    ("GET", "/profile", ADA, None, 404, None),
    ("POST", "/profile", ADA, {"name": "Ada"}, 404, None),
    ("PUT", "/profile", ADA, {"name": "Ada"}, 404, None),
    ("GET", "/profile/preferences", ADA, None, 404, None),
    ("POST", "/profile/avatar", ADA, {"url": "x"}, 404, None),
    ("GET", "/api/profile", ADA, None, 404, None),
    ("GET", "/api/registrations/3", ADA, None, 404, None),
    # mobile app: the user service answers verify with POST only
    ("GET", "/api/auth/verify?token=x", ADA, None, 405, "user"),
    # admin portal: no service has these (the gateway routes the prefix, the service says no)
    ("PUT", "/api/events/5", ADMIN, {"title": "x"}, 405, "event"),
    ("DELETE", "/api/events/5", ADMIN, None, 405, "event"),
    ("POST", "/api/events/5/archive", ADMIN, None, 404, "event"),
    ("POST", "/api/events/bulk", ADMIN, {"ids": [1]}, 404, "event"),
    ("GET", "/api/events/analytics", ADMIN, None, 404, "event"),
    ("GET", "/api/users/stats", ADMIN, None, 404, "user"),
    ("GET", "/api/admin/me", ADMIN, None, 404, None),
    ("GET", "/api/moderation/reports", ADMIN, None, 404, None),
]


@pytest.mark.parametrize("method, path, token, body, status, service", NOT_SERVED)
def test_a_client_call_nobody_serves_is_refused_as_documented(platform, method, path, token,
                                                              body, status, service):
    response, (reached, _) = call(platform, method, path, token, body)
    assert response.status_code == status, response.text
    assert reached == service
    if service is None:
        assert response.json()["error"]["code"] == status


# -- cross-user attempts: refused before any service, whatever the spelling -----------------

REFUSED = [
    # acting as another user through the body
    ("POST", "/api/matching/swipe", ADA, {"user_id": 7, "target_id": 42, "action": "like"},
     403),
    ("POST", "/api/matching/swipe", ADA, {"user_id": 42.0, "target_id": 7, "action": "like"},
     403),
    ("POST", "/api/events/5/bookmark", ADA, {"user_id": "7"}, 403),
    ("DELETE", "/api/events/5/bookmark", ADA, {"user_id": "7"}, 403),
    ("POST", "/api/events/5/join", ADA, {"email": "bob@example.com"}, 403),
    ("POST", "/events/5/join", ADA, {"email": "bob@example.com"}, 403),
    ("POST", "/api/events/5/feedback", ADA, {"email": "bob@example.com", "rating": 1}, 403),
    ("POST", "/api/events/5/networking/profiles", ADA, {"email": "bob@example.com"}, 403),
    ("POST", "/api/auth/verification/request", ADA, {"user_id": 7, "code": "0000"}, 403),
    ("POST", "/api/auth/verification/request", None, {"user_id": 7, "code": "0000"}, 401),
    ("POST", "/api/auth/verification/confirm", None, {"verification_id": 1, "code": "0"}, 401),
    # staff work
    ("POST", "/api/events/5/attendance", ADA, None, 403),
    ("POST", "/api/events/5/waitlist/promote", ADA, None, 403),
    ("PATCH", "/api/events/5/feedback/3", ADA, {"status": "hidden"}, 403),
    ("PATCH", "/api/events/5", ADA, {"title": "mine now"}, 403),
    ("POST", "/api/events/5/submit", ADA, None, 403),
    ("POST", "/api/events", ADA, {"title": "x"}, 403),
    ("GET", "/api/events/5/registrations", ADA, None, 403),
    ("GET", "/api/events/5/attendance", ADA, None, 403),
    ("GET", "/api/events/5/waitlist", ADA, None, 403),
    ("GET", "/api/events/5/feedback", ADA, None, 403),
    ("GET", "/api/events/5/bookmark", ADA, None, 403),
    ("POST", "/api/events/categories", ADA, {"name": "x"}, 403),
    ("DELETE", "/api/events/tags/3", ADA, None, 403),
    ("POST", "/api/event-templates", ADA, {"name": "x"}, 403),
    ("POST", "/api/check-in/tok-123", ADA, None, 403),
    # another user's private sub-resources and matches
    ("GET", "/api/users/7/sessions", ADA, None, 403),
    ("GET", "/api/matching/matches/7", ADA, None, 403),
    ("GET", "/api/matching/algorithm/suggest/7", ADA, None, 403),
]


@pytest.mark.parametrize("method, path, token, body, status", REFUSED)
def test_a_cross_user_attempt_is_refused_before_any_service(platform, method, path, token, body,
                                                            status):
    response, (reached, _) = call(platform, method, path, token, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == status
    assert reached is None


@pytest.mark.parametrize("raw, content_type, status", [
    (b'{"user_id": 42, "user_id": 7, "target_id": 7, "action": "like"}', "application/json",
     400),
    (b'\xef\xbb\xbf{"user_id": 42, "target_id": 7, "action": "like"}', "application/json", 400),
    (b'user_id=42', "application/x-www-form-urlencoded", 415),
    (b'{"user_id": 42, "pad": "' + b"x" * 70000 + b'"}', "application/json", 413),
])
def test_an_unreadable_body_on_an_owned_route_never_reaches_the_service(platform, raw,
                                                                        content_type, status):
    response, (reached, _) = call(platform, "POST", "/api/matching/swipe", ADA, raw=raw,
                                  content_type=content_type)
    assert response.status_code == status and reached is None
    assert response.json()["error"]["code"] == status


def test_the_body_reaches_the_service_byte_for_byte(platform):
    raw = b'{"action":"like","target_id":7,"user_id":42, "note":"caf\xc3\xa9 \\u00e9"}'
    response, (reached, request) = call(platform, "POST", "/api/matching/swipe", ADA, raw=raw,
                                        content_type="application/json")
    assert response.status_code == 200 and reached == "matching"
    assert request["body"] == raw


# -- private fields of other users ------------------------------------------------------------

def test_another_users_record_shows_only_the_public_profile(platform):
    response, (reached, _) = call(platform, "GET", "/api/users/7", ADA)
    assert response.status_code == 200 and reached == "user"
    user = response.json()["user"]
    assert user["id"] == 7 and user["name"] == "User 7"
    assert not set(PRIVATE_USER_FIELDS) & set(user)
    assert "user7@example.com" not in response.text and "203.0.113.9" not in response.text


def test_search_results_show_only_public_profiles(platform):
    response, _ = call(platform, "GET", "/api/users/search?q=user", ADA)
    assert response.status_code == 200
    items = response.json()["items"]
    assert [item["id"] for item in items] == [7, 42]
    assert all(not set(PRIVATE_USER_FIELDS) & set(item) for item in items)
    assert "@example.com" not in response.text and response.json()["total"] == 2


def test_the_owner_and_staff_see_the_whole_record(platform):
    for token, user_id in ((BOB, 7), (ADMIN, 7), (ADA, 42)):
        response, _ = call(platform, "GET", f"/api/users/{user_id}", token)
        assert response.json()["user"]["email"] == f"user{user_id}@example.com"
    response, _ = call(platform, "GET", "/api/users/search?q=user", ADMIN)
    assert response.json()["items"][0]["sessions"]


# -- identity in the shape each service reads ----------------------------------------------

@pytest.mark.parametrize("path", ["/api/conversations", "/conversations"])
def test_messaging_knows_the_gateway_authenticated_caller(platform, path):
    response, (reached, request) = call(platform, "GET", path, ADA)
    assert response.status_code == 200 and reached == "messaging"
    assert response.json()["caller"] == 42
    assert request["headers"]["authorization"] == "Bearer user:42"
    assert request["headers"]["x-user-id"] == "42"


def test_a_token_without_sub_never_reaches_messaging(platform):
    response, (reached, _) = call(platform, "GET", "/api/conversations", NO_SUB)
    assert response.status_code in (401, 403) and reached is None
