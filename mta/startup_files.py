"""Every file ``mta serve`` loads at start, loaded once without serving: ``mta check-config``.

The configuration's validators see only that a file is readable; whether a
PEM key parses, a certificate matches its key or a credentials file is well
formed is found by the part that loads it, at start, when a rollout is
already crash-looping.  ``problems`` runs those same loaders — DKIM keys,
listener certificates and keys, credentials files, the HTTP API's keys
file and certificate, smart-host logins, the ESP event keys, the drain secret — so a bad
Secret is caught before it is mounted in a pod.

Failure: none raised; each file that would stop ``mta serve`` gives one
line naming its config key and the reason.
"""

from __future__ import annotations

from mta.api.esp_events import EspEvents
from mta.auth.credentials import Credentials, CredentialsError
from mta.config import Config
from mta.delivery.client import route_credentials
from mta.dkim.keys import DkimKeyError, SigningKey
from mta.drain import wire
from mta.feedback.actions import FeedbackActions
from mta.smtp.tls import ServerTls, TlsError


def problems(config: Config) -> list[str]:
    """``key: reason`` for each file that would stop ``mta serve``; [] when all load."""
    found: list[str] = []
    for n, listener in enumerate(config.listeners):
        if listener.tls is not None:
            try:
                ServerTls(listener.tls.cert_file, listener.tls.key_file)
            except TlsError as exc:
                found.append(f"listeners.{n}.tls: {exc}")
        if listener.auth is not None and listener.auth.credentials_file is not None:
            try:
                Credentials(listener.auth.credentials_file)
            except CredentialsError as exc:
                found.append(f"listeners.{n}.auth.credentials_file: {exc}")
    api = config.http_api
    if api.address is not None and api.keys_file is not None:
        try:
            Credentials(api.keys_file)
        except CredentialsError as exc:
            found.append(f"http_api.keys_file: {exc}")
    if api.address is not None and api.tls is not None:
        try:
            ServerTls(api.tls.cert_file, api.tls.key_file)
        except TlsError as exc:
            found.append(f"http_api.tls: {exc}")
    for n, key in enumerate(config.dkim.keys):
        try:
            SigningKey.load(key.domain, key.selector, key.key_file)
        except DkimKeyError as exc:
            found.append(f"dkim.keys.{n}.key_file: {exc}")
    for n, route in enumerate(config.routes):
        if route.auth_file is not None:
            try:
                route_credentials(route)
            except (OSError, ValueError) as exc:
                found.append(f"routes.{n}.auth_file: {exc}")
    if config.feedback.esp.providers:
        try:  # reads every provider's key file as mta serve does
            EspEvents(config.feedback.esp, FeedbackActions(config.bounces.classifier(), None, "global"))
        except ValueError as exc:
            found.append(str(exc))
        except OSError as exc:
            found.append(f"feedback.esp: {exc.filename}: {exc.strerror or exc}")
    # A missing drain secret only disables handoffs (mta serve warns); a bad one stops it.
    secret = config.drain.secret_file
    if secret is not None and secret.exists():
        try:
            wire.read_secret(secret)
        except (OSError, wire.WireError) as exc:
            found.append(f"drain.secret_file: {exc}")
    return found
