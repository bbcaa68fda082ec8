"""JWT authentication middleware: tokens, keys, claims, identity headers, end to end."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import webtest
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.middleware.auth import (
    CLAIMS_KEY, AuthMiddleware, KeysUnavailable, filter_factory,
)
from tests.keyserver import KeyServer, SigningKey
from tests.servers import SHIPPED_INI, TEST_JWT_SECRET, auth_headers, make_token, session

SECRET = TEST_JWT_SECRET


def echo_app(environ, start_response):
    """Answers what it was given: the identity headers, the claims, the Authorization."""
    body = json.dumps({
        "user_id": environ.get("HTTP_X_USER_ID"),
        "email": environ.get("HTTP_X_USER_EMAIL"),
        "authorization": environ.get("HTTP_AUTHORIZATION"),
        "claims": environ.get(CLAIMS_KEY),
        "path": environ.get("PATH_INFO"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def client(**kwargs) -> webtest.TestApp:
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("prefixes", ["/api/users", "/api/profile"])
    return webtest.TestApp(LintMiddleware(AuthMiddleware(echo_app, **kwargs)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(header: dict, payload: dict, key: bytes) -> str:
    """Sign as an attacker would, without PyJWT's key checks."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def claims_now(**extra) -> dict:
    now = int(time.time())
    return {"sub": 42, "iat": now, "exp": now + 300, **extra}


def assert_401(response, message: str, token_given: bool = True) -> None:
    assert response.status_int == 401
    assert response.content_type == "application/json"
    assert response.json["error"]["code"] == 401
    assert response.json["error"]["message"] == message
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="meetinity"')
    assert ('error="invalid_token"' in challenge) is token_given


# -- valid tokens ---------------------------------------------------------------------------

def test_valid_hs256_token_with_integer_sub_passes_identity_upstream():
    token = make_token()
    response = client().get("/api/users/7", headers=bearer(token))
    assert response.status_int == 200
    assert response.json["user_id"] == "42"
    assert response.json["email"] == "ada@example.com"
    assert response.json["claims"]["sub"] == 42
    assert response.json["claims"]["provider"] == "google"
    # Forwarded by default: the user service's /auth/profile reads it.
    assert response.json["authorization"] == "Bearer " + token


def test_string_sub_is_accepted():
    response = client().get("/api/profile", headers=bearer(make_token(sub="user-7")))
    assert response.json["user_id"] == "user-7"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_scheme_is_case_insensitive(scheme):
    response = client().get("/api/users", headers={"Authorization": f"{scheme} {make_token()}"})
    assert response.status_int == 200


def test_extra_whitespace_around_the_token_is_tolerated():
    response = client().get("/api/users",
                            headers={"Authorization": f"  Bearer   {make_token()}  "})
    assert response.status_int == 200


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_when_configured(alg):
    secret = (TEST_JWT_SECRET * 2)[:64]  # as long as the SHA-512 output (RFC 7518 §3.2)
    token = jwt.encode(claims_now(), secret, algorithm=alg)
    app = client(secret=secret, algorithms=[alg])
    assert app.get("/api/users", headers=bearer(token)).status_int == 200
    # ...and not when they are not.
    assert_401(client(secret=secret).get("/api/users", headers=bearer(token), status=401),
               "algorithm not allowed")


# -- rejected tokens ------------------------------------------------------------------------

def test_missing_token():
    response = client().get("/api/users/1", status=401)
    assert_401(response, "missing bearer token", token_given=False)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="meetinity"'
    assert response.json["error"].keys() == {"code", "message", "request_id"}


def test_expired_token():
    token = make_token(exp=int(time.time()) - 120)
    response = client().get("/api/users/1", headers=bearer(token), status=401)
    assert_401(response, "token expired")
    assert 'error_description="token expired"' in response.headers["WWW-Authenticate"]
    assert token not in response.text


def test_expired_within_leeway_is_accepted():
    token = make_token(exp=int(time.time()) - 10)
    assert client().get("/api/users/1", headers=bearer(token)).status_int == 200
    assert_401(client(leeway=0).get("/api/users/1", headers=bearer(token), status=401),
               "token expired")


def test_nbf_in_the_future_beyond_and_within_leeway():
    now = int(time.time())
    far = make_token(nbf=now + 120)
    assert_401(client().get("/api/users", headers=bearer(far), status=401),
               "token not yet valid")
    near = make_token(nbf=now + 10)
    assert client().get("/api/users", headers=bearer(near)).status_int == 200


def test_iat_in_the_future_beyond_leeway():
    token = make_token(iat=int(time.time()) + 600, lifetime=900)
    assert_401(client().get("/api/users", headers=bearer(token), status=401),
               "token not yet valid")


@pytest.mark.parametrize("claim, message", [
    ("exp", "bad exp claim"), ("nbf", "bad nbf claim"), ("iat", "bad iat claim"),
])
def test_non_numeric_time_claims(claim, message):
    token = jwt.encode({**claims_now(), claim: "tomorrow"}, SECRET, algorithm="HS256")
    assert_401(client().get("/api/users", headers=bearer(token), status=401), message)


def test_bad_signature():
    header, payload, signature = make_token().split(".")
    tampered_payload = b64(json.dumps(claims_now(sub=1)).encode())
    forged = ".".join([header, tampered_payload, signature])
    assert_401(client().get("/api/users", headers=bearer(forged), status=401), "bad signature")


def test_wrong_key():
    token = make_token(secret="another-secret-of-32-bytes-or-more-xxxx")
    assert_401(client().get("/api/users", headers=bearer(token), status=401), "bad signature")


def test_alg_none_is_rejected():
    token = jwt.encode(claims_now(), None, algorithm="none")
    assert_401(client().get("/api/users", headers=bearer(token), status=401),
               "algorithm not allowed")
    # Spelled differently, still no.
    for alg in ("None", "NONE"):
        forged = b64(json.dumps({"alg": alg}).encode()) + "." + b64(
            json.dumps(claims_now()).encode()) + "."
        assert_401(client().get("/api/users", headers=bearer(forged), status=401),
                   "algorithm not allowed")


def test_rsa_public_key_as_hmac_secret_is_rejected():
    """Algorithm confusion: HS256 'signed' with the RSA public key the gateway trusts."""
    rsa_key = SigningKey("rsa-1")
    with KeyServer(rsa_key) as keys:
        forged = hs256_by_hand({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims_now(),
                               rsa_key.public_pem())
        # HS256 and RS256 both allowed: HS256 is checked with the secret, never the RSA key.
        mixed = client(algorithms=["HS256", "RS256"], jwks_url=keys.url)
        assert_401(mixed.get("/api/users", headers=bearer(forged), status=401), "bad signature")
        # RS256 only: HS256 is not even considered.
        rs_only = client(secret=None, algorithms=["RS256"], jwks_url=keys.url)
        assert_401(rs_only.get("/api/users", headers=bearer(forged), status=401),
                   "algorithm not allowed")
        # The genuine RS256 token passes both.
        good = rsa_key.sign()
        assert mixed.get("/api/users", headers=bearer(good)).status_int == 200
        assert rs_only.get("/api/users", headers=bearer(good)).status_int == 200


def test_public_key_as_secret_is_a_config_error():
    pem = SigningKey("k").public_pem().decode()
    with pytest.raises(ConfigError) as info:
        AuthMiddleware(echo_app, secret=pem)
    assert info.value.key == "secret"
    assert "public/private key" in str(info.value)
    assert "BEGIN" not in str(info.value)


def test_issuer_checked_when_configured():
    app = client(issuer="https://users.meetinity")
    good = make_token(iss="https://users.meetinity")
    assert app.get("/api/users", headers=bearer(good)).status_int == 200
    assert_401(app.get("/api/users", headers=bearer(make_token(iss="https://evil")),
                       status=401), "wrong issuer")
    assert_401(app.get("/api/users", headers=bearer(make_token()), status=401),
               "token has no iss claim")
    # Not configured: any iss is fine.
    assert client().get("/api/users", headers=bearer(good)).status_int == 200


def test_audience_checked_when_configured():
    app = client(audience=["meetinity-gateway", "meetinity"])
    assert app.get("/api/users", headers=bearer(make_token(aud="meetinity"))).status_int == 200
    listed = make_token(aud=["other", "meetinity-gateway"])
    assert app.get("/api/users", headers=bearer(listed)).status_int == 200
    assert_401(app.get("/api/users", headers=bearer(make_token(aud="billing")), status=401),
               "wrong audience")
    assert_401(app.get("/api/users", headers=bearer(make_token()), status=401),
               "token has no aud claim")


def test_audience_in_token_but_not_configured_is_rejected():
    """A token minted for another audience must not open this one (PyJWT agrees)."""
    token = make_token(aud="billing-service")
    assert_401(client().get("/api/users", headers=bearer(token), status=401),
               "token audience not accepted")


def test_missing_required_claims():
    no_exp = jwt.encode({"sub": 42}, SECRET, algorithm="HS256")
    assert_401(client().get("/api/users", headers=bearer(no_exp), status=401),
               "token has no exp claim")
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert_401(client().get("/api/users", headers=bearer(no_sub), status=401),
               "token has no sub claim")
    # exp can be made optional.
    lenient = client(required_claims=["sub"])
    assert lenient.get("/api/users", headers=bearer(no_exp)).status_int == 200


@pytest.mark.parametrize("sub", [4.2, True, [42], {"id": 42}, "", "42\r\nX-Admin: 1"])
def test_unusable_subjects_are_rejected(sub):
    token = jwt.encode(claims_now(sub=sub), SECRET, algorithm="HS256")
    response = client().get("/api/users", headers=bearer(token), status=401)
    assert response.json["error"]["message"] in (
        "subject must be a string or an integer", "malformed subject")


LONG = "A" * (64 * 1024)


@pytest.mark.parametrize("value, message, token_given", [
    ("Basic YWRhOnNlY3JldA==", "authorization scheme must be Bearer", False),
    ("Bearer", "missing bearer token", False),
    ("   ", "missing bearer token", False),
    ("Token abc", "authorization scheme must be Bearer", False),
    ("Bearer abc def", "expected exactly one bearer token", True),
    ("Bearer abc, Bearer def", "expected exactly one bearer token", True),
    ("Bearer !!!not-base64!!!", "malformed token", True),
    ("Bearer abc", "malformed token", True),
    ("Bearer a.b.c", "malformed token", True),
    ("Bearer ....", "malformed token", True),
    ("Bearer " + b64(b"[1,2]") + "." + b64(b"{}") + ".", "malformed token", True),
    ("Bearer " + b64(b'{"alg":"HS256"}') + "." + b64(b"[42]") + ".x", "malformed token",
     True),
    ("Bearer " + b64(b'{"alg":123}') + "." + b64(b"{}") + ".", "algorithm not allowed", True),
    ("Bearer " + b64(b"[" * 11000) + "." + b64(b"{}") + ".", "malformed token", True),
    ("Bearer " + hs256_by_hand({"alg": "HS256"}, {"sub": 1, "exp": 1e400}, SECRET.encode()),
     "bad exp claim", True),
    ("Bearer " + LONG, "authorization header too long", True),
    ("Bearer " + LONG[:16000], "malformed token", True),
    ("\u00e9\u00e8 Bearer", "authorization scheme must be Bearer", False),
])
def test_garbage_authorization_headers(value, message, token_given):
    response = client().get("/api/users", headers={"Authorization": value}, status=401)
    assert_401(response, message, token_given)
    if len(value) > 20:
        assert value.split()[-1] not in response.text


def test_huge_integer_sub_is_a_clean_401():
    signing_input = b64(b'{"alg":"HS256"}') + "." + b64(b'{"sub":' + b"9" * 5000 + b"}")
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + b64(signature)
    assert_401(client().get("/api/users", headers=bearer(token), status=401), "malformed token")


def test_header_length_limit_is_checked_before_decoding():
    # A 64 KiB header that *looks* like a JWT is refused on its length alone.
    token = make_token(padding="x" * (64 * 1024))
    assert_401(client().get("/api/users", headers=bearer(token), status=401),
               "authorization header too long")


@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
def test_head_refusal_has_no_body():
    response = client().head("/api/users", status=401)
    assert response.body == b""
    assert "WWW-Authenticate" in response.headers


# -- scope ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/usersX", "/api/auth/login", "/health", "/"])
def test_unprotected_paths_pass_without_token(path):
    assert client().get(path).status_int == 200


def test_default_protects_everything():
    app = webtest.TestApp(LintMiddleware(AuthMiddleware(echo_app, secret=SECRET)))
    assert_401(app.get("/anything", status=401), "missing bearer token", token_given=False)


PREFLIGHT = {"Origin": "https://app.meetinity.com", "Access-Control-Request-Method": "DELETE"}


def test_preflights_need_a_token_unless_asked():
    # The default (and the shipped gateway.ini): no method is exempt, OPTIONS included.
    assert_401(client().options("/api/users/1", headers=PREFLIGHT, status=401),
               "missing bearer token", False)


def test_real_cors_preflight_passes_without_token_when_asked():
    app = client(allow_preflights=True)
    response = app.options("/api/users/1", headers=PREFLIGHT)
    assert response.status_int == 200
    assert response.json["claims"] is None
    # A plain OPTIONS is a real request: it needs a token.
    assert_401(app.options("/api/users/1", status=401), "missing bearer token", False)


@pytest.mark.parametrize("headers, body", [
    ({"Access-Control-Request-Method": "DELETE"}, b""),  # no Origin
    ({**PREFLIGHT, "Origin": ""}, b""),
    ({**PREFLIGHT, "Access-Control-Request-Method": ""}, b""),
    ({**PREFLIGHT, "Access-Control-Request-Method": "DEL ETE"}, b""),
    ({**PREFLIGHT, "X-HTTP-Method-Override": "DELETE"}, b""),
    ({**PREFLIGHT, "X-HTTP-Method": "DELETE"}, b""),
    ({**PREFLIGHT, "X-Method-Override": "PUT"}, b""),
    (PREFLIGHT, b'{"role": "admin"}'),  # a body
])
def test_preflight_lookalikes_need_a_token_even_when_preflights_are_allowed(headers, body):
    app = client(allow_preflights=True)
    response = app.request("/api/users/1", method="OPTIONS", headers=headers, body=body,
                           status=401)
    assert_401(response, "missing bearer token", False)


# werkzeug's lint does not know that a HEAD answer keeps the GET's Content-Length.
@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
def test_preflight_shapes_in_other_methods_need_a_token():
    app = client(allow_preflights=True)
    for method in ("get", "post", "put", "delete", "patch", "head"):
        response = getattr(app, method)("/api/users/1", headers=PREFLIGHT, status=401)
        assert response.status_int == 401


def test_allow_preflights_from_the_ini(tmp_path):
    from meetinity_gateway.middleware.auth import filter_factory

    make = filter_factory({"__file__": str(tmp_path / "gw.ini"), "here": str(tmp_path)},
                          secret=SECRET, prefixes="/api", allow_preflights="yes")
    assert make(echo_app).allow_preflights is True
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gw.ini"}, secret=SECRET, allow_preflights="maybe")
    assert info.value.key == "allow_preflights" and info.value.value == "maybe"


# -- identity headers -----------------------------------------------------------------------

FORGED = {"X-User-ID": "1", "X-User-Email": "root@example.com"}


def test_forged_identity_headers_are_replaced_on_protected_paths():
    response = client().get("/api/users/me", headers={**FORGED, **bearer(make_token())})
    assert response.json["user_id"] == "42"
    assert response.json["email"] == "ada@example.com"


def test_forged_identity_headers_are_removed_on_public_paths_and_preflights():
    app = client()
    assert app.get("/api/auth/login", headers=FORGED).json["user_id"] is None
    preflight = client(allow_preflights=True).options("/api/users", headers={
        **FORGED, "Access-Control-Request-Method": "GET", "Origin": "https://x.example"})
    assert preflight.json["user_id"] is None and preflight.json["email"] is None


def test_forged_identity_is_removed_when_the_token_lacks_the_claim():
    token = make_token(email=None)
    response = client().get("/api/users", headers={**FORGED, **bearer(token)})
    assert response.json["user_id"] == "42"
    assert response.json["email"] is None


def test_custom_identity_headers_and_unfit_claim_values():
    app = webtest.TestApp(LintMiddleware(AuthMiddleware(
        echo_app, secret=SECRET,
        identity_headers={"sub": "X-User-ID", "email": "X-User-Email",
                          "provider": "X-User-Provider", "roles": "X-User-Roles"},
    )))

    token = make_token(email="ad\u00e9@example.com", roles=["admin"],
                       provider="google\r\nX-Admin: yes")
    response = app.get("/x", headers={**bearer(token), "X-User-Roles": "admin",
                                      "X-User-Provider": "forged"})
    assert response.json["user_id"] == "42"
    # Non-latin-1 text travels as UTF-8 bytes (PEP 3333: latin-1 decoded str).
    assert response.json["email"].encode("latin-1").decode("utf-8") == "ad\u00e9@example.com"
    claims = response.json["claims"]
    assert claims["roles"] == ["admin"]


def test_unfit_claims_never_become_headers():
    seen = {}

    def capture(environ, start_response):
        seen.update({k: v for k, v in environ.items() if k.startswith("HTTP_X_USER")})
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    app = webtest.TestApp(LintMiddleware(AuthMiddleware(
        capture, secret=SECRET,
        identity_headers={"sub": "X-User-ID", "provider": "X-User-Provider",
                          "roles": "X-User-Roles"},
    )))
    token = make_token(roles=["admin"], provider="google\r\nX-Admin: yes")
    app.get("/x", headers={**bearer(token), "X-User-Roles": "admin",
                           "X-User-Provider": "forged"})
    assert seen == {"HTTP_X_USER_ID": "42"}


def test_authorization_can_be_withheld_from_upstream():
    app = client(forward_authorization=False)
    assert app.get("/api/users", headers=bearer(make_token())).json["authorization"] is None
    assert app.get("/api/auth/x", headers=bearer(make_token())).json["authorization"] is None


def test_client_cannot_inject_claims_through_environ():
    def outer(environ, start_response):
        environ[CLAIMS_KEY] = {"sub": "admin"}
        return inner(environ, start_response)

    inner = AuthMiddleware(echo_app, secret=SECRET, prefixes=["/api/users"])
    response = webtest.TestApp(LintMiddleware(outer)).get("/public")
    assert response.json["claims"] is None


# -- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, key, fragment", [
    ({"secret": ""}, "secret", "secret is empty"),
    ({"secret": None}, "secret", "secret is empty"),
    ({"secret": SECRET, "algorithms": ["none"]}, "algorithms", "never be allowed"),
    ({"secret": SECRET, "algorithms": ["HS256", "XS999"]}, "algorithms", "unknown algorithm"),
    ({"secret": SECRET, "algorithms": []}, "algorithms", "no algorithm"),
    ({"algorithms": ["RS256"]}, "jwks_url", "set jwks_url"),
    ({"secret": SECRET, "jwks_url": "http://127.0.0.1:1/jwks.json"}, "jwks_url",
     "only HMAC"),
    ({"algorithms": ["RS256"], "jwks_url": "file:///etc/passwd"}, "jwks_url", "http(s)"),
    # A key set over plain http to another host could be swapped on the way.
    ({"algorithms": ["RS256"], "jwks_url": "http://id.example.com/jwks.json"}, "jwks_url",
     "use https, or set jwks_allow_http"),
    ({"algorithms": ["RS256"], "jwks_url": "http://10.0.0.7/jwks.json",
      "jwks_allow_http": False}, "jwks_url", "plain http"),
    ({"algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:1/j", "jwks_ttl": 0},
     "jwks_ttl", "positive"),
    ({"secret": SECRET, "leeway": -1}, "leeway", "at least 0"),
    ({"secret": SECRET, "prefixes": ["api"]}, "prefixes", "not a path prefix"),
    ({"secret": SECRET, "identity_headers": {"sub": "X User"}}, "identity_headers",
     "claim=Header"),
    ({"secret": SECRET, "realm": 'a"b'}, "realm", "quotes"),
])
def test_bad_arguments_are_config_errors(kwargs, key, fragment):
    with pytest.raises(ConfigError) as info:
        AuthMiddleware(echo_app, **kwargs)
    assert info.value.key == key
    assert fragment in str(info.value)


@pytest.mark.parametrize("url, allow", [
    ("https://id.example.com/jwks.json", False),
    ("http://id.example.com/jwks.json", True),  # explicitly allowed
    ("http://127.0.0.1:9/jwks.json", False),  # loopback: never leaves the host
    ("http://[::1]:9/jwks.json", False),
    ("http://localhost:9/jwks.json", False),
])
def test_plain_http_key_sets_only_on_loopback_or_when_allowed(url, allow):
    middleware = AuthMiddleware(echo_app, algorithms=["RS256"], jwks_url=url,
                                jwks_allow_http=allow)
    assert middleware.jwks is not None


def test_jwks_only_needs_no_secret():
    with KeyServer() as keys:
        AuthMiddleware(echo_app, algorithms=["RS256", "ES256"], jwks_url=keys.url)
        assert keys.fetches == 0  # nothing fetched before the first token


@pytest.mark.parametrize("secret, algorithms, reason", [
    ("short-secret", ["HS256"], "12 bytes long; HS256 needs at least 32"),
    ("x9" * 15 + "q", ["HS256"], "31 bytes long"),
    (TEST_JWT_SECRET[:40], ["HS384"], "40 bytes long; HS384 needs at least 48"),
    (TEST_JWT_SECRET, ["HS256", "HS512"], "needs at least 64"),
    ("secret", ["HS256"], "6 bytes"),
    ("changeme" * 4, ["HS256"], "well-known placeholder"),
    ("Change-Me-" * 4, ["HS256"], "well-known placeholder"),
    ("your-256-bit-secret" * 2, ["HS256"], "well-known placeholder"),
    ("a" * 64, ["HS512"], "fewer than 8 different characters"),
    ("0123" * 16, ["HS256"], "fewer than 8 different characters"),
])
def test_weak_secret_refuses_to_start_and_is_never_printed(secret, algorithms, reason):
    with pytest.raises(ConfigError) as info:
        AuthMiddleware(echo_app, secret=secret, algorithms=algorithms)
    message = str(info.value)
    assert reason in message and "JWT_ALLOW_WEAK_SECRET=true" in message
    assert info.value.value is None  # the value is never shown
    if secret != "secret":  # (that one is a word of the message)
        assert secret not in message


@pytest.mark.filterwarnings("ignore:The HMAC key is 8 bytes long")  # PyJWT agrees: weak
def test_weak_secret_allowed_when_the_operator_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="meetinity_gateway.auth"):
        app = webtest.TestApp(LintMiddleware(AuthMiddleware(
            echo_app, secret="changeme", allow_weak_secret=True)))
    assert "weak JWT secret allowed" in caplog.text and "8 bytes" in caplog.text
    assert "changeme" not in caplog.text.replace("weak JWT secret allowed", "")
    token = make_token(secret="changeme")
    assert app.get("/api/users/1", headers=bearer(token)).status_int == 200


def test_strong_secrets_start(caplog):
    import secrets as random_secrets

    with caplog.at_level(logging.WARNING, logger="meetinity_gateway.auth"):
        AuthMiddleware(echo_app, secret=random_secrets.token_urlsafe(32))  # 43 bytes
        AuthMiddleware(echo_app, secret=random_secrets.token_bytes(64), algorithms=["HS512"])
    assert "weak" not in caplog.text


def test_shipped_ini_refuses_a_weak_secret_unless_allowed(monkeypatch, capsys):
    from meetinity_gateway.cli import main

    monkeypatch.setenv("JWT_SECRET", "changeme")
    assert main(["check", "--config", str(SHIPPED_INI)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: ") and err.count("\n") == 1
    assert "[filter:auth] secret = '${JWT_SECRET:-}'" in err and "changeme" not in err
    monkeypatch.setenv("JWT_ALLOW_WEAK_SECRET", "true")
    assert main(["check", "--config", str(SHIPPED_INI)]) == 0


def test_filter_factory_casts_and_builds():
    make = filter_factory({"__file__": "gateway.ini"}, prefixes="/api/users, /api/profile",
                          secret=SECRET, algorithms="HS256", jwks_url="", issuer="",
                          audience="a, b", leeway="5", required_claims="exp, sub",
                          identity_headers="sub=X-User-ID, email=X-User-Email",
                          forward_authorization="no", realm="meetinity")
    middleware = make(echo_app)
    assert middleware.audience == ["a", "b"]
    assert middleware.issuer is None and middleware.jwks is None
    assert middleware.leeway == 5.0 and middleware.forward_authorization is False
    token = make_token(aud="b")
    app = webtest.TestApp(LintMiddleware(middleware))
    assert app.get("/api/users", headers=bearer(token)).json["user_id"] == "42"


@pytest.mark.parametrize("conf, key", [
    ({"secrets": "x"}, "secrets"),
    ({"leeway": "soon"}, "leeway"),
    ({"jwks_ttl": "0"}, "jwks_ttl"),
    ({"identity_headers": "sub"}, "identity_headers"),
    ({"forward_authorization": "maybe"}, "forward_authorization"),
])
def test_filter_factory_rejects_bad_keys_and_values(conf, key):
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, secret=SECRET, **conf)
    assert info.value.key == key
    assert "gateway.ini" in str(info.value)


def test_filter_factory_secret_error_shows_the_ini_text_not_the_secret(monkeypatch):
    monkeypatch.setenv("MY_PEM", SigningKey("k").public_pem().decode())
    make = filter_factory({}, secret="${MY_PEM}")
    with pytest.raises(ConfigError) as info:
        make(echo_app)
    assert "${MY_PEM}" in str(info.value)
    assert "BEGIN" not in str(info.value)


def test_shipped_ini_without_jwt_secret_refuses_to_start(monkeypatch):
    monkeypatch.delenv("JWT_SECRET", raising=False)
    with pytest.raises(ConfigError) as info:
        load_pipeline(SHIPPED_INI)
    message = str(info.value)
    assert "[filter:auth]" in message and "${JWT_SECRET:-}" in message
    assert "secret is empty" in message


# -- JWKS -----------------------------------------------------------------------------------

class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwks_middleware(url, **kwargs):
    kwargs.setdefault("algorithms", ["RS256", "PS256", "ES256", "EdDSA"])
    middleware = AuthMiddleware(echo_app, jwks_url=url, **kwargs)
    middleware.jwks.clock = FakeClock()
    return middleware, webtest.TestApp(LintMiddleware(middleware))


@pytest.mark.parametrize("kind", ["RSA", "EC", "OKP"])
def test_jwks_key_types(kind):
    key = SigningKey(f"{kind}-1", kind)
    with KeyServer(key) as keys:
        _, app = jwks_middleware(keys.url)
        for _ in range(3):
            response = app.get("/x", headers=bearer(key.sign()))
            assert response.json["user_id"] == "42"
        assert keys.fetches == 1  # cached after the first


def test_jwks_key_rotation_new_kid_after_one_refetch():
    old, new = SigningKey("2024-01"), SigningKey("2024-07", "EC")
    with KeyServer(old) as keys:
        middleware, app = jwks_middleware(keys.url, jwks_cooldown=30)
        assert app.get("/x", headers=bearer(old.sign())).status_int == 200
        assert keys.fetches == 1
        keys.keys.append(new)
        # Within the cooldown the new kid is not looked up (no fetch)...
        assert_401(app.get("/x", headers=bearer(new.sign()), status=401), "unknown signing key")
        assert keys.fetches == 1
        # ...after it, exactly one refetch finds it, and it stays cached.
        middleware.jwks.clock.now += 30
        assert app.get("/x", headers=bearer(new.sign())).status_int == 200
        assert app.get("/x", headers=bearer(new.sign())).status_int == 200
        assert app.get("/x", headers=bearer(old.sign())).status_int == 200
        assert keys.fetches == 2
        # A key removed from the set stops working at the next refresh (TTL).
        keys.keys.remove(old)
        middleware.jwks.clock.now += 300
        assert_401(app.get("/x", headers=bearer(old.sign()), status=401), "unknown signing key")
        assert keys.fetches == 3


def test_jwks_random_kid_flood_is_bounded():
    good = SigningKey("good")
    with KeyServer(good) as keys:
        middleware, app = jwks_middleware(keys.url, jwks_cooldown=30)
        for _ in range(100):
            token = jwt.encode(claims_now(), good.private, algorithm="RS256",
                               headers={"kid": uuid.uuid4().hex})
            assert_401(app.get("/x", headers=bearer(token), status=401), "unknown signing key")
        assert keys.fetches == 1
        middleware.jwks.clock.now += 31
        for _ in range(50):
            token = jwt.encode(claims_now(), good.private, algorithm="RS256",
                               headers={"kid": uuid.uuid4().hex})
            app.get("/x", headers=bearer(token), status=401)
        assert keys.fetches == 2
        # The legitimate key was never disturbed.
        assert app.get("/x", headers=bearer(good.sign())).status_int == 200
        assert keys.fetches == 2


def test_jwks_concurrent_refetches_collapse_into_one():
    key = SigningKey("k1")
    with KeyServer(key) as keys:
        keys.delay = 0.3  # every request arrives while the first fetch is in flight
        middleware, _ = jwks_middleware(keys.url)
        tokens = [key.sign(sub=n) for n in range(16)]
        barrier = threading.Barrier(len(tokens))

        def verify(token):
            barrier.wait(5)
            return middleware.verify(token)["sub"]

        with ThreadPoolExecutor(len(tokens)) as pool:
            subs = list(pool.map(verify, tokens))
        assert subs == list(range(16))
        assert keys.fetches == 1


def test_jwks_server_down_503_for_unknown_kid_cached_keys_keep_working():
    cached, rotated = SigningKey("cached"), SigningKey("rotated")
    with KeyServer(cached) as keys:
        middleware, app = jwks_middleware(keys.url, jwks_cooldown=30, jwks_ttl=300)
        assert app.get("/x", headers=bearer(cached.sign())).status_int == 200
        keys.stop()
        clock = middleware.jwks.clock

        # Cached key: fine, no fetch attempted.
        assert app.get("/x", headers=bearer(cached.sign())).status_int == 200
        assert middleware.jwks.fetches == 1

        # Unknown kid once the cooldown allows a fetch: the fetch fails → 503, not 401.
        clock.now += 30
        response = app.get("/x", headers=bearer(rotated.sign()), status=503)
        assert response.json["error"]["code"] == 503
        assert response.json["error"]["message"] == KeysUnavailable.message
        assert int(response.headers["Retry-After"]) == 30
        assert "WWW-Authenticate" not in response.headers
        assert middleware.jwks.fetches == 2

        # Within the cooldown: 503 again, without hammering the dead server.
        clock.now += 10
        response = app.get("/x", headers=bearer(rotated.sign()), status=503)
        assert int(response.headers["Retry-After"]) == 20
        assert middleware.jwks.fetches == 2

        # Past the TTL with the server still down: the cached key keeps working.
        clock.now += 400
        assert app.get("/x", headers=bearer(cached.sign())).status_int == 200
        assert middleware.jwks.fetches == 3


@pytest.mark.parametrize("status, raw", [
    (500, b'{"error": "boom"}'),
    (200, b"<html>not json</html>"),
    (200, b'["not", "a", "set"]'),
    (200, b'{"keys": "nope"}'),
])
def test_jwks_bad_key_server_answers_are_503(status, raw):
    key = SigningKey("k")
    with KeyServer(key) as keys:
        keys.status, keys.raw = status, raw
        _, app = jwks_middleware(keys.url)
        response = app.get("/x", headers=bearer(key.sign()), status=503)
        assert "Retry-After" in response.headers


def test_jwks_unusable_entries_are_skipped():
    key = SigningKey("good")
    with KeyServer(key) as keys:
        keys.raw = json.dumps({"keys": [
            {"kty": "oct", "kid": "sym", "k": b64(b"secret-from-a-url")},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", **{
                k: v for k, v in key.jwk.items() if k in ("n", "e")}},
            "garbage",
            key.jwk,
        ]}).encode()
        _, app = jwks_middleware(keys.url)
        assert app.get("/x", headers=bearer(key.sign())).status_int == 200
        for kid in ("sym", "broken", "enc"):
            token = jwt.encode(claims_now(), key.private, algorithm="RS256",
                               headers={"kid": kid})
            assert_401(app.get("/x", headers=bearer(token), status=401), "unknown signing key")


def test_jwks_key_must_match_the_token_algorithm():
    rsa_key, ec_key = SigningKey("rsa", "RSA"), SigningKey("ec", "EC")
    undeclared = SigningKey("rsa-any", "RSA", declare_alg=False)
    with KeyServer(rsa_key, ec_key, undeclared) as keys:
        _, app = jwks_middleware(keys.url)
        # EC-signed token claiming the RSA key's kid.
        token = jwt.encode(claims_now(), ec_key.private, algorithm="ES256",
                           headers={"kid": "rsa"})
        assert_401(app.get("/x", headers=bearer(token), status=401),
                   "signing key does not match the algorithm")
        # The RSA key declares RS256: a PS256 token with it is refused...
        token = jwt.encode(claims_now(), rsa_key.private, algorithm="PS256",
                           headers={"kid": "rsa"})
        assert_401(app.get("/x", headers=bearer(token), status=401),
                   "signing key does not match the algorithm")
        # ...while a key declaring no alg serves any allowed RSA algorithm.
        token = jwt.encode(claims_now(), undeclared.private, algorithm="PS256",
                           headers={"kid": "rsa-any"})
        assert app.get("/x", headers=bearer(token)).status_int == 200


def test_jwks_token_without_kid():
    key = SigningKey("k")
    with KeyServer(key) as keys:
        _, app = jwks_middleware(keys.url)
        token = jwt.encode(claims_now(), key.private, algorithm="RS256")
        assert_401(app.get("/x", headers=bearer(token), status=401),
                   "token has no key id (kid)")
        assert keys.fetches == 0


# -- end to end through waitress ------------------------------------------------------------

def echoed_headers(response) -> dict[str, str]:
    return {name.lower(): value for name, value in response.json()["headers"]}


def test_e2e_protected_route_without_token_never_reaches_upstream(gateway_factory, upstream):
    gateway = gateway_factory()
    with session() as http:
        response = http.get(gateway.url + "/api/users/7", headers=FORGED)
        assert response.status_code == 401
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="meetinity"'
        assert response.json()["error"]["message"] == "missing bearer token"
        assert response.json()["error"]["request_id"] == response.headers["X-Request-ID"]

        expired = http.get(gateway.url + "/api/users/42/profile",
                           headers=bearer(make_token(exp=int(time.time()) - 600)))
        assert expired.status_code == 401
        assert expired.json()["error"]["message"] == "token expired"
    assert upstream.requests == []


def test_e2e_valid_token_upstream_sees_identity_not_forgery(gateway_factory, upstream):
    gateway = gateway_factory()
    with session() as http:
        response = http.get(gateway.url + "/api/users/42",
                            headers={**FORGED, **auth_headers()})
        assert response.status_code == 200
        headers = echoed_headers(response)
        assert headers["x-user-id"] == "42"
        assert headers["x-user-email"] == "ada@example.com"
        assert headers["authorization"].startswith("Bearer ")
        assert response.json()["path"] == "/users/42"

        public = http.post(gateway.url + "/api/auth/login", headers=FORGED, json={})
        assert public.status_code == 200
        assert "x-user-id" not in echoed_headers(public)
        assert "x-user-email" not in echoed_headers(public)

    sent = [dict((k.lower(), v) for k, v in headers) for _, _, headers in upstream.requests]
    assert [h.get("x-user-id") for h in sent] == ["42", None]


def test_e2e_jwks_only_gateway(gateway_factory, upstream):
    key = SigningKey("idp-1", "EC")
    with KeyServer(key) as keys:
        gateway = gateway_factory(JWT_SECRET="", JWT_ALGORITHMS="ES256", JWT_JWKS_URL=keys.url,
                                  JWT_ISSUER="https://id.example", JWT_AUDIENCE="meetinity")
        with session() as http:
            good = key.sign(iss="https://id.example", aud="meetinity", sub="u-1")
            response = http.get(gateway.url + "/api/users/u-1/profile", headers=bearer(good))
            assert response.status_code == 200
            assert echoed_headers(response)["x-user-id"] == "u-1"
            # The HS256 token of the user service is not accepted by this configuration.
            refused = http.get(gateway.url + "/api/users/u-1/profile", headers=auth_headers())
            assert refused.status_code == 401
            assert refused.json()["error"]["message"] == "algorithm not allowed"
        assert keys.fetches == 1
    assert len(upstream.requests) == 1


def test_e2e_garbage_header_is_a_clean_401(gateway_factory, upstream):
    gateway = gateway_factory()
    with session() as http:
        # Over the token limit, under the server's 64 KiB header limit (that one is a 431).
        response = http.get(gateway.url + "/api/users",
                            headers={"Authorization": "Bearer " + "A" * (48 * 1024)})
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "authorization header too long"
        # The server is still fine afterwards.
        assert http.get(gateway.url + "/api/users/42", headers=auth_headers()).status_code == 200
    assert len(upstream.requests) == 1


def test_shipped_ini_variables_reach_the_middleware(monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("JWT_LEEWAY", "0")
    monkeypatch.setenv("JWT_REQUIRED_CLAIMS", "sub")
    monkeypatch.setenv("JWT_FORWARD_AUTHORIZATION", "false")
    app = webtest.TestApp(load_pipeline(SHIPPED_INI).app)
    just_expired = make_token(exp=int(time.time()) - 5)
    response = app.get("/api/users/1", headers=bearer(just_expired), status=401)
    assert response.json["error"]["message"] == "token expired"
    no_exp = jwt.encode({"sub": 42}, SECRET, algorithm="HS256")
    response = app.get("/api/users/42", headers=bearer(no_exp))
    headers = {name.lower(): value for name, value in response.json["headers"]}
    assert headers["x-user-id"] == "42"
    assert "authorization" not in headers


def test_shipped_ini_loads_with_pastedeploy(monkeypatch):
    """``gunicorn --paste gateway.ini`` reads the same file (no PasteDeploy-reserved keys)."""
    from paste.deploy import loadapp

    monkeypatch.setenv("JWT_SECRET", SECRET)
    app = webtest.TestApp(loadapp(f"config:{SHIPPED_INI}"))
    response = app.get("/api/events", status=401)
    assert response.json["error"]["message"] == "missing bearer token"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="meetinity"'


# -- the cache of verified tokens -------------------------------------------------------------

def test_a_cached_token_still_expires():
    app = client(leeway=0)
    token = jwt.encode({"sub": 42, "exp": int(time.time()) + 1}, SECRET, algorithm="HS256")
    assert app.get("/api/users/1", headers=bearer(token)).status_int == 200
    assert app.get("/api/users/1", headers=bearer(token)).status_int == 200  # from the cache
    deadline = time.time() + 5
    while time.time() < deadline:
        response = app.get("/api/users/1", headers=bearer(token), expect_errors=True)
        if response.status_int == 401:
            break
        time.sleep(0.1)
    assert_401(response, "token expired")


def test_cached_claims_are_not_shared_between_requests():
    middleware = AuthMiddleware(echo_app, secret=SECRET)
    token = make_token()
    first = middleware.verify(token)
    first["sub"] = "tampered"
    assert middleware.verify(token)["sub"] == 42


def test_a_cached_token_dies_with_its_key():
    middleware = AuthMiddleware(echo_app, secret=SECRET)
    token = make_token(secret=SECRET)
    assert middleware.verify(token)["sub"] == 42
    middleware._secret = b"another-secret-of-at-least-32-bytes-long!!"
    with pytest.raises(Exception) as info:
        middleware.verify(token)
    assert getattr(info.value, "message", "") == "bad signature"


# -- deny by default: public paths -----------------------------------------------------------

@pytest.mark.parametrize("path, public", [
    ("/api/auth", True), ("/api/auth/login", True), ("/api/auth/a/b", True),
    ("/health", True), ("/health/live", True), ("/api/shop/7/open", True),
    ("/api/authx", False), ("/health/x", False), ("/healthz", False), ("/", False),
    ("/api/shop/x/open", False), ("/api/shop/7/open/x", False), ("/api/orders/1", False),
    ("/anything/new", False),
])
def test_everything_needs_a_token_but_the_public_paths(path, public):
    layer = AuthMiddleware(echo_app, secret=SECRET, public=[
        "/api/auth/*", "/health", "/health/live", "/api/shop/<int:id>/open"])
    app = webtest.TestApp(LintMiddleware(layer))
    for method in ("GET", "POST", "DELETE", "OPTIONS"):
        response = app.request(path, method=method, expect_errors=True)
        assert (response.status_int == 200) == public, (method, path, response.status)
        if not public:
            assert response.status_int == 401
    assert layer.protects(path) is not public
    assert layer.policy_for(path).startswith("public") is public


@pytest.mark.parametrize("public", [["api/auth"], ["/a/<nope:x>"], ["/a/../b"], ["/a b"]])
def test_bad_public_paths_are_config_errors(public):
    with pytest.raises(ConfigError) as caught:
        AuthMiddleware(echo_app, secret=SECRET, public=public)
    assert caught.value.key == "public"
