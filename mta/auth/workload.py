"""ServiceAccount tokens as credentials: who a cluster workload is, checked, cached.

An app mounts a projected token (``audience: kubemta``) and sends it as the
password of SMTP AUTH with the user name ``serviceaccount``, or as
``Authorization: Bearer`` to the HTTP API.  Two ways to check it
(``service_accounts.verify``):

- ``tokenreview`` (default): a TokenReview through the API server
  (``mta.k8s.api``), audience included.  The API server knows what this
  process cannot: a bound token whose pod or ServiceAccount was deleted is
  refused at once, not when it expires.
- ``jwks``: offline, with PyJWT, against the issuer's public keys (OIDC
  discovery, ``<issuer>/.well-known/openid-configuration`` → ``jwks_uri``,
  keys cached and fetched again for an unknown ``kid``): signature,
  ``aud``, ``iss``, ``exp`` and ``nbf``.  No API call per token, but a
  revoked token works until it expires.

A token that passed is remembered by its SHA-256 until it expires, and at
most ``cache_ttl`` (so a revocation is seen within that time with
``tokenreview``); at most ``cache_size`` tokens, the least recently used
forgotten first.  Parallel logins with one token share one check.  A
refused token is remembered too, for ``REFUSED_TTL`` (at most
``cache_ttl``), so a client repeating a bad token costs the API server one
review a minute, not one per try; a token that could not be checked
(``TokenUnchecked``) is not remembered.

Failure: ``TokenRefused`` for a token that is not valid (AUTH answers
``535 5.7.8``, the API 401); ``TokenUnchecked`` when it cannot be checked now
(the API server or the key URL unreachable: ``454 4.7.0``, the API 503).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mta.config import ServiceAccountsConfig
from mta.keyed_lock import KeyedLock
from mta.policy.workloads import IdentityUnavailable, Workload

SMTP_USER = "serviceaccount"  # the AUTH user name that says "the password is a token"
_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
ALGORITHMS = ["RS256", "ES256", "RS384", "ES384", "RS512", "ES512"]
REFUSED_TTL = 60.0


class TokenRefused(Exception):
    """Not a valid token for this audience; the message says why (for the log, not the client)."""


class TokenUnchecked(IdentityUnavailable):
    """The token could not be checked now (the API server or the issuer's keys are unreachable)."""


@dataclass(frozen=True)
class Verified:
    workload: Workload
    expires: float  # wall-clock time the token stops being valid


class TokenCheck(Protocol):
    def check(self, token: str) -> Verified:
        """Blocking: ``Verified``, or ``TokenRefused`` / ``TokenUnchecked``."""
        ...


def looks_like_jwt(text: str) -> bool:
    return bool(_JWT.match(text))


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim without checking the signature: only for how long a review may be cached."""
    import jwt

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


class Reviewer(Protocol):
    def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]: ...


class TokenReviewCheck:
    """Ask the API server (``create tokenreviews``)."""

    def __init__(self, api: Reviewer, audience: str, clock: Callable[[], float] = time.time) -> None:
        self.api, self.audience, self.clock = api, audience, clock

    def check(self, token: str) -> Verified:
        from mta.k8s.api import KubeError

        try:
            status = self.api.token_review(token, [self.audience])
        except KubeError as exc:
            raise TokenUnchecked(str(exc)) from None
        if not status.get("authenticated"):
            raise TokenRefused(status.get("error") or "the API server did not authenticate it")
        if self.audience not in (status.get("audiences") or []):
            raise TokenRefused(f"not meant for audience {self.audience!r}")
        user = status.get("user") or {}
        pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or [None]
        workload = Workload.from_username(str(user.get("username") or ""), pods[0])
        if workload is None:
            raise TokenRefused(f"{user.get('username')!r} is not a ServiceAccount")
        expires = unverified_expiry(token)
        return Verified(workload, expires if expires is not None else float("inf"))


class JwksCheck:
    """Check the signature here, against the issuer's published keys."""

    def __init__(self, settings: ServiceAccountsConfig) -> None:
        self.settings = settings
        self._context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        self._client: Any = None

    def _headers(self) -> dict[str, str]:
        token_file = self.settings.token_file
        return {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file else {}

    def _keys(self) -> Any:
        import jwt

        if self._client is None:
            url = self.settings.jwks_url or self._discover()
            self._client = jwt.PyJWKClient(url, cache_keys=True, headers=self._headers(), timeout=5,
                                           ssl_context=self._context)
        return self._client

    def _discover(self) -> str:
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=5, context=self._context) as answer:
                document = json.load(answer)
        except (OSError, ValueError) as exc:
            raise TokenUnchecked(f"cannot read {url}: {exc}") from None
        jwks = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks, str):
            raise TokenUnchecked(f"{url} names no jwks_uri")
        return jwks

    def check(self, token: str) -> Verified:
        import jwt

        try:
            key = self._keys().get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenUnchecked(str(exc)) from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(str(exc)) from None
        try:
            claims = jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=self.settings.audience,
                                issuer=self.settings.issuer, options={"require": ["exp", "sub", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise TokenRefused(str(exc)) from None
        pod = ((claims.get("kubernetes.io") or {}).get("pod") or {}).get("name")
        workload = Workload.from_username(str(claims["sub"]), pod if isinstance(pod, str) else None)
        if workload is None:
            raise TokenRefused(f"sub {claims['sub']!r} is not a ServiceAccount")
        return Verified(workload, float(claims["exp"]))


class WorkloadTokens:
    """The async front: one check per token and lifetime, off the event loop."""

    def __init__(self, check: TokenCheck, cache_ttl: float, cache_size: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.check, self.cache_ttl, self.cache_size, self.clock = check, cache_ttl, cache_size, clock
        # digest -> (the workload, or the refusal to repeat; until when)
        self._cache: OrderedDict[bytes, tuple[Workload | TokenRefused, float]] = OrderedDict()
        self._same = KeyedLock()
        self.checks = 0  # made, not served from the cache (tests and metrics read it)

    def _cached(self, digest: bytes) -> Workload | TokenRefused | None:
        hit = self._cache.get(digest)
        if hit is None:
            return None
        if hit[1] <= self.clock():
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return hit[0]

    def _remember(self, digest: bytes, answer: Workload | TokenRefused, until: float) -> None:
        self._cache[digest] = (answer, until)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def verify(self, token: str) -> Workload:
        digest = hashlib.sha256(token.encode()).digest()
        async with self._same.hold(digest):
            known = self._cached(digest)
            if isinstance(known, TokenRefused):
                raise known
            if known is not None:
                return known
            self.checks += 1
            now = self.clock()
            try:
                verified = await asyncio.to_thread(self.check.check, token)
                if verified.expires <= now:
                    raise TokenRefused("expired")
            except TokenRefused as exc:
                self._remember(digest, exc, now + min(REFUSED_TTL, self.cache_ttl))
                raise
            self._remember(digest, verified.workload, min(verified.expires, now + self.cache_ttl))
            return verified.workload


def build(settings: ServiceAccountsConfig, reviewer: Reviewer | None) -> WorkloadTokens | None:
    """The verifier ``service_accounts`` asks for, or None when it is off."""
    if not settings.enabled:
        return None
    if settings.verify == "jwks":
        check: TokenCheck = JwksCheck(settings)
    else:
        assert reviewer is not None  # the config requires kubernetes.enabled for tokenreview
        check = TokenReviewCheck(reviewer, settings.audience)
    return WorkloadTokens(check, settings.cache_ttl, settings.cache_size)
