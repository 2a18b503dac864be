"""API keys: ``Authorization: Bearer <account>.<secret>``, checked against hashes at rest.

The keys file has the credentials file's format and code
(``mta.auth.credentials``: ``account:$scrypt$...``, re-read when it
changes): the part before the last ``.`` of a key names the account, the
rest is the secret whose scrypt hash the file holds.  The account's policy
(``accounts.users``) then applies as to an SMTP AUTH user of that name.
Checks run through the process's ``AuthGate`` — off the event loop, bounded
threads, and the same failure throttle per client address and per account
as SMTP AUTH; requests in parallel with one key share one check.  A key verified is
remembered by its SHA-256 for ``CACHE_TTL``, so scrypt runs once per key and
minute; a key removed from the file stops working within that time.  ``mta api-key add`` writes a new key's hash.

Failure: ``authenticate`` raises ``ApiError`` 401 for a missing, malformed
or wrong key and for a throttled client; the caller learns nothing about
which part was wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from pathlib import Path

from mta.api.errors import UNAUTHENTICATED, ApiError
from mta.auth.credentials import Credentials, set_password
from mta.auth.gate import AuthGate
from mta.keyed_lock import KeyedLock
from mta.obs.log import event

SECRET_BYTES = 32
CACHE_TTL = 60.0  # a key removed from the file keeps working this long at most
CACHE_SIZE = 1024
FAILURE_DELAY = 1.0  # seconds before a refusal, as limits.auth_failure_delay for SMTP


def split_key(key: str) -> tuple[str, str] | None:
    account, dot, secret = key.rpartition(".")
    return (account, secret) if dot and account and secret else None


def new_key(path: Path, account: str) -> str:
    """Add ``account`` to the keys file with a fresh key; returns the key (shown once, kept nowhere)."""
    secret = secrets.token_urlsafe(SECRET_BYTES)  # no "." in it: the account is what precedes the last one
    set_password(path, account, secret, create=True)
    return f"{account}.{secret}"


class ApiKeys:
    def __init__(self, credentials: Credentials | None, gate: AuthGate, failure_delay: float = FAILURE_DELAY) -> None:
        self.credentials = credentials
        self.gate = gate
        self.failure_delay = failure_delay
        # sha256 of a key verified lately -> (account, until): scrypt once per key and minute,
        # not per request (a digest, so the keys themselves are not kept in memory).
        self._verified: dict[bytes, tuple[str, float]] = {}
        self._same_key = KeyedLock()

    async def authenticate(self, header: str | None, client: str) -> str:
        """The account a request's ``Authorization`` header proves, or ``ApiError`` 401."""
        scheme, _, key = (header or "").partition(" ")
        parts = split_key(key.strip()) if scheme.lower() == "bearer" else None
        if parts is None or self.credentials is None:
            raise UNAUTHENTICATED
        account, secret = parts
        digest = hashlib.sha256(key.strip().encode()).digest()
        # Requests in parallel with one key wait for one check of it, so a
        # client sending many at once does not look like a guesser.
        async with self._same_key.hold(digest):
            cached = self._verified.get(digest)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            await self._check(account, secret, client)
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()  # a burst of distinct keys: start over rather than track age
            self._verified[digest] = (account, time.monotonic() + CACHE_TTL)
        return account

    async def _check(self, account: str, secret: str, client: str) -> None:
        """One scrypt check through the gate, as SMTP AUTH does it; ``ApiError`` 401 when it fails."""
        if await self.gate.client_locked(client):
            event("auth_throttled", level=logging.WARNING, listener="http_api", client=client, scope="client")
            raise ApiError(401, "unauthenticated", "4.7.0", "too many failed authentications, try again later")
        async with self.gate.attempt(client), self.gate.checking(account):
            if await self.gate.user_locked(account, client):
                event("auth_throttled", level=logging.WARNING, listener="http_api", client=client, user=account,
                      scope="user")
                raise ApiError(401, "unauthenticated", "4.7.0", "too many failed authentications, try again later")
            assert self.credentials is not None
            ok = await self.gate.verify(self.credentials.verify, account, secret)
            if ok:
                await self.gate.succeeded(account, client)
            else:
                await self.gate.failed(account, client)
        if not ok:
            event("auth_failed", level=logging.WARNING, listener="http_api", client=client, user=account,
                  mechanism="bearer")
            await asyncio.sleep(self.failure_delay)
            raise UNAUTHENTICATED
