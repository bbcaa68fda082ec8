"""A real loopback JWKS server and signing keys, for the auth tests.

``KeyServer`` serves ``GET /jwks.json`` (the public half of its keys) on a free loopback port,
counts every fetch (``fetches``), can answer slowly (``delay``) or be stopped (then the port
refuses connections: the key server is down). ``SigningKey`` makes RSA, EC or Ed25519 keys,
signs tokens with them and gives their public JWK.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


class SigningKey:
    """A private key with a ``kid``; ``sign(claims)`` mints a token, ``jwk`` is the public key."""

    def __init__(self, kid: str, kind: str = "RSA", alg: str | None = None,
                 declare_alg: bool = True) -> None:
        self.kid = kid
        if kind == "RSA":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = alg or "RS256"
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind == "EC":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = alg or "ES256"
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind == "OKP":
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.alg = alg or "EdDSA"
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            raise ValueError(kind)
        jwk.update(kid=kid, use="sig")
        if declare_alg:
            jwk["alg"] = self.alg
        self.jwk = jwk

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, lifetime: int = 300, headers: dict | None = None, **claims) -> str:
        now = int(time.time())
        payload = {"sub": 42, "email": "ada@example.com", "iat": now, "exp": now + lifetime}
        payload.update(claims)
        return jwt.encode(payload, self.private, algorithm=self.alg,
                          headers={"kid": self.kid, **(headers or {})})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        owner = self.server.owner
        with owner.lock:
            owner.fetches += 1
            body = owner.body()
            status, delay = owner.status, owner.delay
        if delay:
            time.sleep(delay)
        if self.path.split("?")[0] != "/jwks.json":
            status, body = 404, b'{"error": "not found"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "KeyServer"


class KeyServer:
    """Serves the public JWKs of ``keys`` at ``url``; ``fetches`` counts GETs."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.lock = threading.Lock()
        self.fetches = 0
        self.delay = 0.0
        self.status = 200
        self.raw: bytes | None = None  # when set, served instead of the key set
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps({"keys": [key.jwk for key in self.keys]}).encode()

    def stop(self) -> None:
        """Close the listening socket: from now on connections are refused."""
        if self.running:
            self.running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    def __enter__(self) -> "KeyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
