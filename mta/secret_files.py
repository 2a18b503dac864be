"""Secret files others can read: found at start and warned about.

Owns the list of the configuration's files that hold secrets — TLS and
DKIM private keys, AUTH credentials, smart-host logins, the drain and
webhook secrets — and the check that none of them is readable by group or
others.  A Kubernetes Secret mounted with ``defaultMode: 0400`` passes; a
key left 0644 on a volume draws a warning naming the file, since anyone on
the node or in the pod who can read it can sign as the domain or log in.

Failure: none; a file that cannot be stat'ed is left to the part that
opens it, which reports it with its config key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mta.config import Config


def secret_files(config: Config) -> list[tuple[str, Path]]:
    """(config key, path) of every file that holds a secret."""
    found: list[tuple[str, Path]] = []
    for n, listener in enumerate(config.listeners):
        if listener.tls is not None:
            found.append((f"listeners.{n}.tls.key_file", listener.tls.key_file))
        if listener.auth is not None and listener.auth.credentials_file is not None:
            found.append((f"listeners.{n}.auth.credentials_file", listener.auth.credentials_file))
    for n, key in enumerate(config.dkim.keys):
        found.append((f"dkim.keys.{n}.key_file", key.key_file))
    for n, route in enumerate(config.routes):
        if route.auth_file is not None:
            found.append((f"routes.{n}.auth_file", route.auth_file))
    if config.http_api.keys_file is not None:
        found.append(("http_api.keys_file", config.http_api.keys_file))
    if config.http_api.tls is not None:
        found.append(("http_api.tls.key_file", config.http_api.tls.key_file))
    if config.drain.secret_file is not None:
        found.append(("drain.secret_file", config.drain.secret_file))
    if config.drain.tls is not None:
        found.append(("drain.tls.key_file", config.drain.tls.key_file))
    for n, endpoint in enumerate(config.webhooks.endpoints):
        found.append((f"webhooks.endpoints.{n}.secret_file", endpoint.secret_file))
    return found


def readable_by_others(config: Config) -> list[tuple[str, Path, int]]:
    """(config key, path, mode) of the secret files that group or others may read."""
    loose = []
    for key, path in secret_files(config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            loose.append((key, Path(path), mode))
    return loose
