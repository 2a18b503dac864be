"""The credentials file: user names and salted scrypt hashes, one per line.

Format (a Kubernetes Secret can hold it as is)::

    # comment
    billing-app:$scrypt$ln=15,r=8,p=1$<salt, base64>$<hash, base64>

The file is re-read when its modification time or size changes, so a
rotated Secret takes effect without a restart; a file that fails to parse
keeps the previous users in force and logs why.  Verification is
constant-time, and an unknown user costs one scrypt computation like a
known one, so timing does not tell which names exist.

``set_password`` and ``remove_user`` rewrite the file atomically and
durably (``spool.safeio``); ``user_names`` lists it.

Failure: ``CredentialsError`` naming the file and line; ``OSError`` when
``set_password`` cannot write the file (the previous file stays whole).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
from pathlib import Path

from spool.safeio import write_file

log = logging.getLogger(__name__)

SCHEME = "scrypt"
LOG_N, R, P = 15, 8, 1  # 32 MiB, ~50-100 ms: slow for a guesser, fine per login
_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
FILE_MODE = 0o600  # password hashes: the owner only
_HASH = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class CredentialsError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, log_n: int = LOG_N) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << log_n, r=R, p=P, maxmem=256 << 20, dklen=32)
    return f"${SCHEME}$ln={log_n},r={R},p={P}${_b64(salt)}${_b64(digest)}"


def _check(password: str, encoded: str) -> bool:
    match = _HASH.match(encoded)
    if not match:
        return False
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt, expected = base64.b64decode(match.group(4)), base64.b64decode(match.group(5))
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << log_n, r=r, p=p, maxmem=256 << 20,
                            dklen=len(expected))
    return hmac.compare_digest(digest, expected)


def parse(text: str, source: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not _NAME.match(name):
            raise CredentialsError(f"{source}:{number}: expected 'name:$scrypt$...'")
        if not _HASH.match(encoded):
            raise CredentialsError(f"{source}:{number}: the hash for {name!r} is not a $scrypt$ hash")
        if name in users:
            raise CredentialsError(f"{source}:{number}: user {name!r} appears twice")
        users[name] = encoded
    return users


class Credentials:
    """The users of one credentials file, kept in step with the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._users: dict[str, str] = {}
        self._stamp: tuple[float, int] | None = None
        self._lock = threading.Lock()
        # Verifying against this keeps unknown names as slow as known ones.
        self._dummy = hash_password(secrets.token_hex(16))
        self.load()

    def load(self) -> None:
        """Read the file now; raises ``CredentialsError`` when it is unusable."""
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise CredentialsError(f"{self.path}: cannot read credentials: {exc.strerror}") from None
        users = parse(text, str(self.path))
        with self._lock:
            self._users, self._stamp = users, (stat.st_mtime, stat.st_size)

    def refresh(self) -> None:
        """Reload if the file changed; keep the old users if the new file is bad."""
        try:
            stat = self.path.stat()
        except OSError as exc:
            log.error("credentials file %s unreadable, keeping %d users: %s", self.path, len(self._users),
                      exc.strerror)
            return
        if (stat.st_mtime, stat.st_size) == self._stamp:
            return
        try:
            self.load()
            log.info("credentials file %s reloaded: %d users", self.path, len(self._users))
        except CredentialsError as exc:
            log.error("credentials file %s not reloaded, keeping %d users: %s", self.path, len(self._users), exc)

    def __contains__(self, user: str) -> bool:
        return user in self._users

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, user: str, password: str) -> bool:
        """Blocking (scrypt): call it from a worker thread."""
        self.refresh()
        encoded = self._users.get(user)
        ok = _check(password, encoded if encoded is not None else self._dummy)
        return ok and encoded is not None


def _current(path: Path) -> tuple[str, dict[str, str]]:
    """The file's text and its users; an empty file where there is none yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    return text, parse(text, str(path))


def _rewrite(path: Path, text: str, users: dict[str, str]) -> None:
    """The users written back with the old file's comments, atomically: readers (every pod,
    on each refresh) see the old file or the new, never a part."""
    lines = [line for line in text.splitlines() if line.strip().startswith("#")]
    lines += [f"{name}:{encoded}" for name, encoded in users.items()]
    write_file(path, ("\n".join(lines) + "\n").encode(), FILE_MODE)


def set_password(path: Path, user: str, password: str, *, create: bool) -> None:
    """Add or change a user's entry, rewriting the file atomically."""
    if not _NAME.match(user):
        raise CredentialsError(f"{user!r} is not a valid user name (letters, digits and . _ @ + -)")
    path = Path(path)
    text, users = _current(path)
    if create and user in users:
        raise CredentialsError(f"user {user!r} already exists in {path}; use 'mta user passwd'")
    if not create and user not in users:
        raise CredentialsError(f"user {user!r} is not in {path}; use 'mta user add'")
    users[user] = hash_password(password)
    _rewrite(path, text, users)


def user_names(path: Path) -> list[str]:
    """The users of a credentials file, in file order; [] when the file does not exist yet."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read credentials: {exc.strerror}") from None
    return list(parse(text, str(path)))


def remove_user(path: Path, user: str) -> None:
    """Delete a user's entry, rewriting the file atomically; comments stay."""
    path = Path(path)
    text, users = _current(path)
    if user not in users:
        raise CredentialsError(f"user {user!r} is not in {path}")
    del users[user]
    _rewrite(path, text, users)
