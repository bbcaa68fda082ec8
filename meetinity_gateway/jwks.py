"""The signing keys of a JSON Web Key Set (JWKS) URL: fetched, cached, chosen per token.

The auth layer verifies asymmetric tokens (``RS*``/``PS*``/``ES*``/``EdDSA``) with the key
their ``kid`` names in the key set of its ``jwks_url``; this module owns those keys, the
middleware owns everything else (tokens, claims, identity headers). The policy, in
:class:`JwksKeys`:

* **TTL**: the set is refetched after ``ttl`` seconds;
* **cooldown**: an unknown ``kid`` triggers at most one refetch per ``cooldown`` seconds,
  whoever asks (a flood of random ``kid``\\ s costs one fetch per window, not one per
  request), and so does a failed fetch;
* **single flight**: concurrent refetches are collapsed into one behind a lock;
* **stale keys serve**: while the key server is unreachable, cached keys keep working, even
  past their TTL; an unknown ``kid`` then answers :class:`KeysUnavailable` (503 with
  ``Retry-After``: the caller is not at fault);
* **key selection** (:meth:`JwksKeys.signing_key`): only signature keys (``use`` absent or
  ``sig``) of type RSA, EC or OKP are kept — a symmetric (``oct``) key from a URL is never
  used, HMAC takes the configured secret — and a key serves only the algorithms of its type,
  and only the one it declares in ``alg`` when it declares one.

Usable alone::

    from meetinity_gateway.jwks import JwksKeys
    keys = JwksKeys("https://id.example.com/.well-known/jwks.json", ttl=300, cooldown=30)
    key = keys.signing_key("RS256", jwt.get_unverified_header(token).get("kid"))
"""
from __future__ import annotations

import http.client
import logging
import math
import threading
import time
import typing as t

import jwt

from meetinity_gateway.problems import GatewayError

__all__ = ["KEY_TYPES", "JwksKey", "JwksKeys", "KeyRefused", "KeysUnavailable", "UnknownKey"]

# The auth layer's logger: operators filter its key-set messages under that name.
log = logging.getLogger("meetinity_gateway.auth")

# Asymmetric algorithm → the JWK key type (kty) its keys must have.
KEY_TYPES = {
    **dict.fromkeys(["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"], "RSA"),
    **dict.fromkeys(["ES256", "ES256K", "ES384", "ES512", "ES521"], "EC"),
    "EdDSA": "OKP",
}


class KeysUnavailable(GatewayError):
    """The key set could not be fetched and the token's key is not cached: 503."""

    code = 503
    message = "signing keys unavailable, try again later"

    def __init__(self, retry_after: int) -> None:
        super().__init__(headers=[("Retry-After", str(retry_after))])


class JwksKey(t.NamedTuple):
    """One usable key of the set: its type, the algorithm it declares (if any), the key."""

    kty: str
    alg: str | None
    key: t.Any


class KeyRefused(Exception):
    """The token's key cannot verify it; ``str()`` is a fixed, token-free reason."""


class UnknownKey(Exception):
    """The (freshly fetched or recently fetched) key set has no such ``kid``."""


class JwksKeys:
    """The signing keys of one JWKS URL, cached; PyJWT's ``PyJWKClient`` does the fetching.

    PyJWKClient alone would refetch the whole set for every unknown ``kid`` (older versions)
    and drop to an error when the server is down; here the policy is ours:

    * a set is fresh for ``ttl`` seconds after a successful fetch;
    * a fetch is *due* only if none was attempted in the last ``cooldown`` seconds, and is
      made only when needed (the key is unknown or the set is stale);
    * one lock collapses concurrent fetches: whoever waited for it finds the new set;
    * a failed fetch keeps the previous keys (served even when stale) and makes unknown
      ``kid``\\ s answer :class:`KeysUnavailable` until the cooldown is over.

    ``fetches`` counts fetch attempts; ``clock`` (monotonic seconds) can be replaced.
    """

    def __init__(self, url: str, *, ttl: float = 300.0, cooldown: float = 30.0,
                 timeout: float = 5.0) -> None:
        # The client's own caching is off: the policy above replaces it (and its cooldown is
        # bypassed without its cache, in the PyJWT versions that have one).
        self._client = jwt.PyJWKClient(
            url, cache_jwk_set=False, timeout=timeout,
            headers={"User-Agent": "meetinity-gateway", "Accept": "application/json"},
        )
        self.url = url
        self.ttl = ttl
        self.cooldown = cooldown
        self.clock: t.Callable[[], float] = time.monotonic
        self.fetches = 0
        self._lock = threading.Lock()
        self._keys: dict[str, t.Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._failed = False

    def _stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at >= self.ttl

    def _due(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.cooldown

    def _retry_after(self, now: float) -> int:
        waited = now - (self._attempted_at or now)
        return max(1, math.ceil(self.cooldown - waited))

    def _fetch(self) -> None:
        self.fetches += 1
        self._attempted_at = self.clock()
        try:
            data = self._client.fetch_data()
            if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
                raise ValueError("the response is not a JSON Web Key Set")
        except (jwt.PyJWTError, ValueError, OSError, http.client.HTTPException) as exc:
            # Older PyJWT lets some of these through unwrapped; all mean "no key set now".
            self._failed = True
            log.warning("cannot fetch signing keys from %s: %s", self.url, exc)
            return
        keys = {}
        for entry in data["keys"]:
            # Symmetric ("oct") keys from a URL are never used: HMAC takes the secret.
            if (not isinstance(entry, dict) or not isinstance(entry.get("kid"), str)
                    or entry.get("use", "sig") != "sig"
                    or entry.get("kty") not in ("RSA", "EC", "OKP")):
                continue
            try:
                key = jwt.PyJWK(entry).key
            except (jwt.PyJWTError, ValueError, TypeError):
                log.warning("ignoring unusable key %r from %s", entry["kid"], self.url)
                continue
            alg = entry.get("alg")
            keys[entry["kid"]] = JwksKey(entry["kty"], alg if isinstance(alg, str) else None,
                                         key)
        self._keys = keys
        self._fetched_at = self._attempted_at
        self._failed = False
        log.info("fetched %d signing keys from %s", len(keys), self.url)

    def get(self, kid: str) -> t.Any:
        """The :class:`JwksKey` for ``kid``.

        Raises :class:`UnknownKey`, or :class:`KeysUnavailable` when the last fetch failed.
        """
        now = self.clock()
        key = self._keys.get(kid)
        if key is not None and (not self._stale(now) or not self._due(now)):
            return key
        # Unknown, or stale with a refresh due: through the lock, so that a request arriving
        # while a fetch is in flight waits for its result instead of giving up.
        with self._lock:
            # Re-check under the lock: the thread we waited for may have just fetched.
            now = self.clock()
            if self._due(now) and (kid not in self._keys or self._stale(now)):
                self._fetch()
            key = self._keys.get(kid)
        if key is not None:
            return key
        if self._failed:
            raise KeysUnavailable(self._retry_after(self.clock()))
        raise UnknownKey(kid)

    def signing_key(self, alg: str, kid: t.Any) -> t.Any:
        """The key that verifies a token signed with the asymmetric ``alg`` naming ``kid``.

        Raises :class:`KeyRefused` when the token names no key, a key the set does not have,
        or a key of another type or algorithm; :class:`KeysUnavailable` when the set cannot
        be fetched and the key is not cached.
        """
        if not kid or not isinstance(kid, str):
            raise KeyRefused("token has no key id (kid)")
        try:
            jwk = self.get(kid)
        except UnknownKey:
            raise KeyRefused("unknown signing key") from None
        if jwk.kty != KEY_TYPES[alg] or (jwk.alg and jwk.alg != alg):
            raise KeyRefused("signing key does not match the algorithm")
        return jwk.key
