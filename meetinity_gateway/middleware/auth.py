"""JWT authentication: who is calling, proven by a signed token, told to the services.

On the protected path prefixes, every request must carry ``Authorization: Bearer <JWT>``
(scheme case-insensitive, exactly one token). The token is verified with PyJWT:

* **algorithms** come from the configuration, never from the token: ``alg: none`` and any
  algorithm not listed are refused before a key is even looked up;
* **HMAC** (``HS256``/``HS384``/``HS512``) tokens are checked with the shared ``secret`` (the
  Meetinity user service signs HS256); **RS*/PS*/ES*/EdDSA** tokens with the key named by
  their ``kid`` in the key set at ``jwks_url``. The two never mix: the secret is never used
  for an asymmetric algorithm, a JWKS key never as an HMAC secret (so an HS256 token "signed"
  with the RSA public key is rejected), and a PEM/SSH key as ``secret`` is a ConfigError;
* **claims**: the ``required_claims`` (``exp`` and ``sub`` by default) must be present;
  ``exp``, ``nbf`` and ``iat`` are checked with ``leeway`` seconds of clock skew; ``iss`` and
  ``aud`` exactly when ``issuer`` / ``audience`` are set. A token carrying an ``aud`` while no
  audience is configured is refused: it was minted for some other service. ``sub`` may be a
  string or an integer (the user service issues ``"sub": 42``).

A failure answers 401 in the standard JSON shape with ``WWW-Authenticate: Bearer
realm="meetinity"`` — plus ``error="invalid_token"`` and a short ``error_description`` when a
bearer token was given (RFC 6750 §3). The message says what is wrong (``token expired``,
``bad signature``, ``missing bearer token``) and never echoes the token. When the key set
cannot be fetched and the token's key is not cached, the answer is 503 with ``Retry-After``:
the caller is not at fault.

On success the verified claims are put in ``environ["meetinity_gateway.claims"]`` and the
``identity_headers`` claims become request headers for the upstream (``sub`` → ``X-User-ID``,
``email`` → ``X-User-Email`` by default; an integer becomes its decimal text, a value that is
neither a string nor an integer, or holds control characters, is left out — and such a
``sub`` is refused). Client-sent copies of those headers are deleted from **every** request,
protected or not, before anything else: a client can never forge an identity.

Requests outside the prefixes, or named ``public``, pass untouched (minus forged identity
headers). Every method
needs a token on a protected prefix, ``OPTIONS`` included: in the gateway the ``cors`` layer
answers real CORS preflights before they get here. Used alone in front of an app that
answers preflights itself, ``allow_preflights=True`` lets *real* preflights through without
a token (browsers send them without credentials) — exactly the requests
:func:`meetinity_gateway.preflight.is_preflight` accepts: ``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``, no body, no method override. An ``OPTIONS`` lacking
``Origin``, carrying a body or ``X-HTTP-Method-Override`` still needs a token.

JWKS keys are cached (:class:`meetinity_gateway.jwks.JwksKeys`): the set is refetched after
``jwks_ttl`` seconds; an unknown ``kid`` triggers at most one refetch per ``jwks_cooldown``
seconds, whoever asks (a flood of random ``kid``\\ s costs one fetch per window, not one per
request); concurrent refetches are collapsed into one behind a lock; while the key server is
unreachable, cached keys keep working, even past their TTL.

Use alone around any WSGI app::

    from meetinity_gateway.middleware.auth import AuthMiddleware
    app = AuthMiddleware(app, prefixes=["/api"], secret=os.environ["JWT_SECRET"])
    # or asymmetric keys from an identity provider:
    app = AuthMiddleware(app, prefixes=["/api"], algorithms=["RS256"],
                         jwks_url="https://id.example.com/.well-known/jwks.json",
                         issuer="https://id.example.com/", audience=["meetinity"])

:param app: the WSGI application to wrap.
:param prefixes: path prefixes that require a token, on segment boundaries (``/api/users``
    covers ``/api/users/7``, not ``/api/usersX``). Default ``["/"]``: everything — deny by
    default, the form the shipped gateway.ini uses; list prefixes only to protect some.
:param public: path templates (:mod:`meetinity_gateway.pathrules`: ``/health`` exact,
    ``/api/auth/*`` a prefix, ``<id>`` parameters) that need no token although a prefix
    covers them. A path no template names needs a token.
:param secret: the HMAC secret; required (non-empty) when an ``HS*`` algorithm is allowed.
    It must be at least as long as the hash output of every allowed ``HS*`` algorithm
    (RFC 7518 §3.2: 32 bytes for HS256, 48 for HS384, 64 for HS512), not a well-known
    placeholder (``secret``, ``changeme``…) and not one character repeated; else a
    ConfigError, unless ``allow_weak_secret``.
:param allow_weak_secret: start with a weak secret anyway (a warning is logged), for a test
    setup that must match a service's weak secret (default ``False``).
:param algorithms: the accepted ``alg`` values (default ``["HS256"]``).
:param jwks_url: the ``https`` URL of the JSON Web Key Set; required when an asymmetric
    algorithm is allowed. Plain ``http`` only to a loopback host, or with
    ``jwks_allow_http`` (anyone on the path could hand the gateway their own keys).
:param jwks_allow_http: accept a plain ``http://`` key set URL to another host (default
    ``False``).
:param jwks_ttl: seconds a fetched key set is trusted before it is refetched (default 300).
:param jwks_cooldown: minimum seconds between two fetches caused by unknown ``kid``\\ s or by
    a failed fetch (default 30).
:param jwks_timeout: seconds allowed to one key set fetch (default 5).
:param issuer: the exact ``iss`` required, or ``None`` not to check it.
:param audience: the accepted ``aud`` values (a string or a list; the token must name one),
    or ``None``: then a token carrying ``aud`` is refused.
:param leeway: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (default 30).
:param required_claims: claims that must be present (default ``["exp", "sub"]``).
:param identity_headers: claim → request header for the upstream (default ``{"sub":
    "X-User-ID", "email": "X-User-Email"}``).
:param forward_authorization: keep the ``Authorization`` header for the upstream (default
    ``True``: the user service's ``/auth/profile`` reads it). ``False`` removes it from every
    request after verification.
:param realm: the ``realm`` of ``WWW-Authenticate`` (default ``meetinity``).
:param allow_preflights: let real CORS preflights through without a token (default
    ``False``; off in the shipped gateway.ini, where ``cors`` answers them first).

In gateway.ini (``identity_headers`` as ``claim=Header`` pairs, lists comma-separated)::

    [filter:auth]
    use = egg:meetinity_gateway#auth
    public = /api/auth/*, /health, /health/live
    secret = ${JWT_SECRET:-}
    algorithms = ${JWT_ALGORITHMS:-HS256}
    jwks_url = ${JWT_JWKS_URL:-}
    identity_headers = sub=X-User-ID, email=X-User-Email

Security notes: the identity headers are only trustworthy if the upstreams can be reached
through the gateway alone. Keep ``secret`` out of the ini file (use ``${JWT_SECRET}``); a
short or guessable one stops the gateway at start (see ``allow_weak_secret``). Fetch keys over
https.
"""
from __future__ import annotations

import logging
import math
import re
import time
import typing as t
from urllib.parse import urlsplit

import jwt
from jwt.algorithms import HMACAlgorithm, get_default_algorithms, has_crypto

from meetinity_gateway.config import (
    ConfigError,
    as_bool,
    as_list,
    as_non_negative_float,
    as_optional_list,
    as_optional_str,
    as_positive_float,
    as_str,
    cast_settings,
)
from meetinity_gateway.http11 import is_token
from meetinity_gateway.jwks import JwksKeys, KeyRefused, KeysUnavailable
from meetinity_gateway.keys import ADDED_HEADERS_KEY, AUTH_ERROR_KEY, CLAIMS_KEY
from meetinity_gateway.logs import redact_uri
from meetinity_gateway.pathrules import PathTable, parse_path
from meetinity_gateway.paths import PrefixMatcher
from meetinity_gateway.preflight import is_preflight
from meetinity_gateway.problems import GatewayError

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["AuthMiddleware", "CLAIMS_KEY", "JwksKeys", "KeysUnavailable", "filter_factory"]

log = logging.getLogger("meetinity_gateway.auth")


HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# Longer than any sane JWT; refusing early keeps a 64 KiB header from being base64-decoded.
MAX_TOKEN_LENGTH = 16 * 1024
# RFC 6750 b64token.
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: Secrets of tutorials, templates and default configurations, lower case, letters and
#: digits only: refused whatever their length (also repeated to pad the length).
_PLACEHOLDER_SECRETS = frozenset({
    "secret", "secrets", "changeme", "changethis", "changeit", "password", "passw0rd",
    "jwtsecret", "jwtsecretkey", "secretkey", "mysecret", "mysecretkey", "supersecret",
    "supersecretkey", "yoursecret", "yoursecretkey", "yoursecretkeyhere", "your256bitsecret",
    "changemeinproduction", "pleasechangeme", "replaceme", "default", "test", "testsecret",
    "example", "token", "key", "admin", "letmein", "qwerty", "xxx", "todo", "dev", "devsecret",
})
_MIN_DISTINCT_BYTES = 8


def weak_secret_reason(secret: bytes, algorithms: t.Iterable[str]) -> str | None:
    """Why ``secret`` is too weak for the HMAC ``algorithms``, or ``None``.

    Never includes the secret itself.
    """
    needed = max((_MIN_SECRET_BYTES.get(alg, 32) for alg in algorithms), default=32)
    if len(secret) < needed:
        return (f"the secret is {len(secret)} bytes long; {', '.join(sorted(algorithms))} "
                f"needs at least {needed} random bytes (RFC 7518 §3.2)")
    normalized = re.sub(rb"[^a-z0-9]", b"", secret.lower()).decode("ascii", "replace")
    for word in _PLACEHOLDER_SECRETS:
        if normalized and normalized == word * (len(normalized) // len(word)):
            return "the secret is a well-known placeholder"
    if len(set(secret)) < _MIN_DISTINCT_BYTES:
        return f"the secret has fewer than {_MIN_DISTINCT_BYTES} different characters"
    return None


class Unauthorized(GatewayError):
    """401 with the RFC 6750 challenge; ``token_given`` adds ``error="invalid_token"``."""

    code = 401
    message = "invalid token"

    def __init__(self, message: str, *, token_given: bool = True, realm: str = "meetinity"):
        challenge = f'Bearer realm="{realm}"'
        if token_given:
            # Messages are fixed strings of ours (no quotes), never token content.
            challenge += f', error="invalid_token", error_description="{message}"'
        super().__init__(message, headers=[("WWW-Authenticate", challenge)])


def _claim_header_value(value: t.Any) -> str | None:
    """A claim as header text (WSGI: UTF-8 bytes as latin-1), or ``None`` when unfit."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    if not text or _CONTROL.search(text) or text != text.strip():
        return None
    return text.encode("utf-8").decode("latin-1")


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class _VerifiedTokens:
    """Tokens verified recently, by their exact bytes: a hit skips parsing and signatures.

    Only tokens that passed every check are stored, so an attacker cannot fill it with junk;
    it is bounded all the same (oldest entries go first). A hit is honoured only while the
    token is unexpired (``exp`` + leeway; tokens without ``exp`` for ``ttl`` seconds) and
    while the key that verified it is still the key for its algorithm and ``kid`` (a rotated
    or revoked JWKS key, or a changed secret, stops its tokens at once). ``nbf`` and ``iat``
    passed at verification and time only moves forward.
    """

    def __init__(self, leeway: float, size: int = 4096, ttl: float = 60.0) -> None:
        self._leeway = leeway
        self._size = size
        self._ttl = ttl
        self._entries: dict[str, tuple[dict[str, t.Any], float, str, t.Any, t.Any]] = {}

    def get(self, token: str, key_for: t.Callable[..., t.Any]) -> dict[str, t.Any] | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        claims, until, alg, kid, key = entry
        if time.time() >= until:
            self._entries.pop(token, None)
            return None
        try:
            current = key_for(alg, kid)
        except GatewayError:
            current = None
        if current is not key:
            self._entries.pop(token, None)
            return None
        return dict(claims)  # layers below may change theirs; the cached copy stays

    def put(self, token: str, claims: dict[str, t.Any], alg: str, kid: t.Any, key: t.Any):
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            until = exp + self._leeway
        else:
            until = time.time() + self._ttl
        while len(self._entries) >= self._size:
            try:
                self._entries.pop(next(iter(self._entries)))
            except (StopIteration, KeyError, RuntimeError):
                break  # another thread emptied or changed it meanwhile
        self._entries[token] = (dict(claims), until, alg, kid, key)


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (traffic that never leaves the host)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthMiddleware:
    """Bearer JWT verification on protected prefixes (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "auth"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        prefixes: t.Iterable[str] = ("/",),
        public: t.Iterable[str] = (),
        secret: str | bytes | None = None,
        algorithms: t.Iterable[str] = ("HS256",),
        jwks_url: str | None = None,
        jwks_ttl: float = 300.0,
        jwks_cooldown: float = 30.0,
        jwks_timeout: float = 5.0,
        issuer: str | None = None,
        audience: str | t.Iterable[str] | None = None,
        leeway: float = 30.0,
        required_claims: t.Iterable[str] = ("exp", "sub"),
        identity_headers: t.Mapping[str, str] | None = None,
        forward_authorization: bool = True,
        realm: str = "meetinity",
        allow_preflights: bool = False,
        allow_weak_secret: bool = False,
        jwks_allow_http: bool = False,
    ) -> None:
        self.app = app
        try:
            self._matcher = PrefixMatcher(prefixes)
        except ValueError as exc:
            raise ConfigError(str(exc), key="prefixes") from None
        self.public_text = [item.strip() for item in public if item.strip()]
        try:
            templates = [parse_path(item) for item in self.public_text]
        except ValueError as exc:
            raise ConfigError(str(exc), key="public") from None
        # Two public templates for the same paths lead to the same answer: no tie to refuse.
        self._public = PathTable(templates, refuse_ties=False)

        self.algorithms = self._check_algorithms(list(algorithms))
        hmac_allowed = sorted(self.algorithms & HMAC_ALGORITHMS)
        asymmetric_allowed = sorted(self.algorithms - HMAC_ALGORITHMS)

        # The secret's value never goes into an error message or a log line.
        self._secret: bytes | None = None
        if hmac_allowed:
            secret_bytes = secret.encode("utf-8") if isinstance(secret, str) else secret
            if not secret_bytes:
                raise ConfigError(
                    f"{', '.join(hmac_allowed)} is allowed but the secret is empty: set the "
                    "shared HMAC secret, or allow only asymmetric algorithms with a jwks_url",
                    key="secret",
                )
            try:
                HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret_bytes)
            except jwt.InvalidKeyError:
                raise ConfigError(
                    "the secret looks like a public/private key, not an HMAC secret",
                    key="secret",
                ) from None
            weakness = weak_secret_reason(secret_bytes, hmac_allowed)
            if weakness and not allow_weak_secret:
                raise ConfigError(
                    f"{weakness}: generate one (meetinity-gateway init, or python -c \"import "
                    "secrets; print(secrets.token_urlsafe(48))\"), or set allow_weak_secret "
                    "(JWT_ALLOW_WEAK_SECRET=true) if you mean it", key="secret")
            if weakness:
                log.warning("weak JWT secret allowed by allow_weak_secret: %s", weakness)
            self._secret = secret_bytes

        self.jwks: JwksKeys | None = None
        if jwks_url:
            parts = urlsplit(jwks_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("expected an http(s) URL", key="jwks_url", value=jwks_url)
            if (parts.scheme == "http" and not jwks_allow_http
                    and not _is_loopback(parts.hostname)):
                raise ConfigError(
                    "a key set over plain http can be swapped by anyone on the path: use "
                    "https, or set jwks_allow_http (JWT_JWKS_ALLOW_HTTP=true) if you mean it",
                    key="jwks_url", value=jwks_url)
            if not asymmetric_allowed:
                raise ConfigError(
                    "a jwks_url is set but only HMAC algorithms are allowed: add RS256, "
                    "ES256 or EdDSA to algorithms", key="jwks_url", value=jwks_url,
                )
            for name, value in (("jwks_ttl", jwks_ttl), ("jwks_timeout", jwks_timeout)):
                if not value > 0:
                    raise ConfigError("expected a positive number", key=name, value=str(value))
            if not jwks_cooldown >= 0:
                raise ConfigError("expected a number of at least 0", key="jwks_cooldown",
                                  value=str(jwks_cooldown))
            self.jwks = JwksKeys(jwks_url, ttl=jwks_ttl, cooldown=jwks_cooldown,
                                 timeout=jwks_timeout)
        elif asymmetric_allowed:
            raise ConfigError(
                f"{', '.join(asymmetric_allowed)} needs the signing keys: set jwks_url",
                key="jwks_url",
            )

        if not (leeway >= 0 and math.isfinite(leeway)):
            raise ConfigError("expected a number of seconds of at least 0", key="leeway",
                              value=str(leeway))
        self.leeway = leeway
        self.issuer = issuer or None
        if isinstance(audience, str):
            audience = [audience]
        self.audience = [a for a in (audience or ()) if a] or None
        self.required_claims = [claim for claim in required_claims if claim]
        self._options = {
            "require": self.required_claims,
            "verify_iss": self.issuer is not None,
            "verify_aud": True,  # with no audience configured, a token with aud is refused
            # We check sub ourselves: an integer sub is fine here (PyJWT ≥ 2.10 says no).
            "verify_sub": False,
        }

        if identity_headers is None:
            identity_headers = {"sub": "X-User-ID", "email": "X-User-Email"}
        for claim, header in identity_headers.items():
            if not claim or not is_token(header or ""):
                raise ConfigError(f"{claim}={header} is not claim=Header-Name",
                                  key="identity_headers")
        self.identity_headers = dict(identity_headers)
        self._identity_keys = [(claim, _environ_key(header))
                               for claim, header in self.identity_headers.items()]
        self._identity_names = frozenset(h.lower() for h in self.identity_headers.values())
        self.forward_authorization = forward_authorization
        self._verified = _VerifiedTokens(self.leeway)

        if not realm or '"' in realm or "\\" in realm or _CONTROL.search(realm):
            raise ConfigError("expected a realm without quotes, backslashes or control "
                              "characters", key="realm", value=realm)
        self.realm = realm
        self.allow_preflights = bool(allow_preflights)

    @staticmethod
    def _check_algorithms(names: list[str]) -> frozenset[str]:
        known = set(get_default_algorithms()) - {"none"}
        if not names:
            raise ConfigError("no algorithm allowed", key="algorithms")
        for name in names:
            if name.lower() == "none":
                raise ConfigError("unsigned tokens (none) can never be allowed",
                                  key="algorithms", value=name)
            if name not in known:
                hint = "" if has_crypto else " (install cryptography for RSA/EC/EdDSA)"
                raise ConfigError(f"unknown algorithm (known: {', '.join(sorted(known))}){hint}",
                                  key="algorithms", value=name)
        return frozenset(names)

    # -- the request ------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """Its settings, one line each (``check``, ``/status``); never the secret."""
        keys = []
        if self._secret is not None:
            keys.append("a shared HMAC secret")
        if self.jwks is not None:
            keys.append(f"the key set at {redact_uri(self.jwks.url)}")
        identity = ", ".join(f"{claim}={header}" for claim, header
                             in self.identity_headers.items()) or "none"
        return [
            f"token needed below: {', '.join(self._matcher.prefixes) or 'nothing'}",
            f"public: {', '.join(self.public_text) or 'none'}",
            f"algorithms: {', '.join(sorted(self.algorithms))}; keys: {' and '.join(keys)}",
            f"issuer: {self.issuer or 'any'}; audience: "
            + (", ".join(self.audience) if self.audience else "none (a token with aud is "
               "refused)"),
            f"required claims: {', '.join(self.required_claims) or 'none'}; leeway "
            f"{self.leeway:g}s",
            f"identity headers: {identity}",
            "preflights: " + ("pass without a token" if self.allow_preflights
                              else "need a token like any request"),
        ]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        # Forged identities go first, on every request, whatever happens next.
        for _, environ_key in self._identity_keys:
            environ.pop(environ_key, None)
        environ.pop(CLAIMS_KEY, None)

        path = environ.get("PATH_INFO") or "/"
        if not self.protects(path) or (self.allow_preflights and is_preflight(environ)):
            if not self.forward_authorization:
                environ.pop("HTTP_AUTHORIZATION", None)
            return self.app(environ, start_response)

        try:
            token = self._bearer_token(environ.get("HTTP_AUTHORIZATION"))
            claims = self.verify(token)
        except GatewayError as error:
            log.debug("refused %s %s: %s", environ.get("REQUEST_METHOD"), path, error.message)
            environ[AUTH_ERROR_KEY] = error.message  # for metrics (a fixed, token-free text)
            return error(environ, start_response)

        environ[CLAIMS_KEY] = claims
        for claim, environ_key in self._identity_keys:
            value = _claim_header_value(claims.get(claim))
            if value is not None:
                environ[environ_key] = value
        # Ours, not the client's: its Connection header cannot name them away (proxy).
        environ.setdefault(ADDED_HEADERS_KEY, set()).update(self._identity_names)
        if not self.forward_authorization:
            environ.pop("HTTP_AUTHORIZATION", None)
        return self.app(environ, start_response)

    def _unauthorized(self, message: str, token_given: bool = True) -> Unauthorized:
        return Unauthorized(message, token_given=token_given, realm=self.realm)

    def _bearer_token(self, header: str | None) -> str:
        if not header or not header.strip():
            raise self._unauthorized("missing bearer token", token_given=False)
        if len(header) > MAX_TOKEN_LENGTH + 16:
            raise self._unauthorized("authorization header too long")
        parts = header.split()
        if parts[0].lower() != "bearer":
            raise self._unauthorized("authorization scheme must be Bearer", token_given=False)
        if len(parts) == 1:
            raise self._unauthorized("missing bearer token", token_given=False)
        if len(parts) > 2:
            raise self._unauthorized("expected exactly one bearer token")
        token = parts[1]
        if not _B64TOKEN.match(token):
            raise self._unauthorized("malformed token")
        return token

    def protects(self, path: str) -> bool:
        """Whether a request for ``path`` needs a token (for status pages and tools)."""
        return self._matcher.covers(path) and self.public_rule(path) is None

    def public_rule(self, path: str) -> str | None:
        """The ``public`` template that lets ``path`` through without a token, if any."""
        found = self._public.find(path, "GET")
        return found[0].text if found is not None else None

    def policy_for(self, path: str, method: str = "GET") -> str:
        """This layer's part of a route's policy, for ``check`` and ``/status``."""
        if not self._matcher.covers(path):
            return "public (no protected prefix)"
        rule = self.public_rule(path)
        return f"public ({rule})" if rule is not None else "token"

    def verify(self, token: str) -> dict[str, t.Any]:
        """The verified claims of ``token``; raises :class:`Unauthorized` or
        :class:`KeysUnavailable`.

        A token verified before is taken from a small cache (same bytes, same key, not
        expired since): the signature check and PyJWT's parsing are most of this layer's cost.
        """
        cached = self._verified.get(token, self._key_for)
        if cached is not None:
            return cached
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise self._unauthorized("malformed token") from None
        alg = header.get("alg")
        # The token names its algorithm; only the configured list decides what is accepted.
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise self._unauthorized("algorithm not allowed")
        key = self._key_for(alg, header.get("kid"))

        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], options=self._options, leeway=self.leeway,
                issuer=self.issuer, audience=self.audience,
            )
        except jwt.PyJWTError as exc:
            raise self._unauthorized(self._reason(exc)) from None
        except (ValueError, TypeError):
            # cryptography may object to a garbled signature or key before PyJWT does.
            raise self._unauthorized("malformed token") from None

        if "sub" in claims:
            sub = claims["sub"]
            if isinstance(sub, bool) or not isinstance(sub, (str, int)):
                raise self._unauthorized("subject must be a string or an integer")
            if _claim_header_value(sub) is None:
                raise self._unauthorized("malformed subject")
        self._verified.put(token, claims, alg, header.get("kid"), key)
        return claims

    def _key_for(self, alg: str, kid: t.Any) -> t.Any:
        if alg in HMAC_ALGORITHMS:
            return self._secret
        assert self.jwks is not None  # __init__ guarantees it for asymmetric algorithms
        try:
            return self.jwks.signing_key(alg, kid)
        except KeyRefused as refused:
            raise self._unauthorized(str(refused)) from None

    def _reason(self, exc: Exception) -> str:
        """A fixed, token-free message for a PyJWT error."""
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"token has no {exc.claim} claim"
        if isinstance(exc, jwt.InvalidAudienceError):
            return "wrong audience" if self.audience else "token audience not accepted"
        for error_type, message in _REASONS:
            if isinstance(exc, error_type):
                return message
        if isinstance(exc, jwt.DecodeError):
            text = str(exc)
            for claim in ("exp", "nbf"):
                if f"({claim})" in text:
                    return f"bad {claim} claim"
            return "malformed token"
        return "invalid token"


#: PyJWT errors and what the client is told, most specific first (InvalidSignatureError is a
#: DecodeError, so it must come before the DecodeError fallback).
_REASONS = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidIssuedAtError, "bad iat claim"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "signing key does not match the algorithm"),
)


# -- ini ------------------------------------------------------------------------------------

def _claim_headers(value: str) -> dict[str, str]:
    """``sub=X-User-ID, email=X-User-Email`` → ``{"sub": "X-User-ID", …}``."""
    mapping = {}
    for item in as_list(value):
        claim, sep, header = item.partition("=")
        claim, header = claim.strip(), header.strip()
        if not sep or not claim or not is_token(header):
            raise ValueError(f"expected claim=Header-Name pairs, got {item!r}")
        mapping[claim] = header
    return mapping


_PARAMS = {
    "prefixes": as_list,
    "public": as_list,
    "secret": as_str,
    "algorithms": as_list,
    "jwks_url": as_optional_str,
    "jwks_ttl": as_positive_float,
    "jwks_cooldown": as_non_negative_float,
    "jwks_timeout": as_positive_float,
    "issuer": as_optional_str,
    "audience": as_optional_list,
    "leeway": as_non_negative_float,
    # Not "require": PasteDeploy reads that key as a distribution to install.
    "required_claims": as_list,
    "identity_headers": _claim_headers,
    "forward_authorization": as_bool,
    "realm": as_str,
    "allow_preflights": as_bool,
    "allow_weak_secret": as_bool,
    "jwks_allow_http": as_bool,
}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#auth``."""
    kwargs = cast_settings(local_conf, _PARAMS, global_conf)

    def make_filter(app):
        try:
            return AuthMiddleware(app, **kwargs)
        except ConfigError as exc:
            if exc.key == "secret":
                # Show the ini text (e.g. ${JWT_SECRET:-}), never the secret itself.
                exc.value = local_conf.get("secret")
            raise

    return make_filter
