"""``mta user``: AUTH users in a listener's credentials file, and lockouts in the running server.

``add``, ``passwd``, ``delete`` and ``list`` change or read the credentials
file (a running server re-reads it).  ``unlock NAME [--ip ADDR]`` clears an
AUTH lockout through the control socket: lockouts live only in the
server's memory, so with no server running there is nothing to unlock and
it says so (exit 0).  Failure: exit 1 with the reason (file errors, an
unreachable server), 2 for usage (which listener, a bad address).
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import sys
from typing import Any

from mta import control
from mta.auth.credentials import CredentialsError, set_password
from mta.config import Config
from mta.terminal import escape
from spool import Spool


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    user = sub.add_parser("user", parents=[common], help="manage AUTH users and lockouts")
    usub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "add a user"), ("passwd", "change a user's password"),
                         ("delete", "remove a user"), ("list", "list the users")):
        item = usub.add_parser(action, parents=[common], help=text)
        if action != "list":
            item.add_argument("name")
        item.add_argument("--listener", help="whose credentials file (default: the only one configured)")
    unlock = usub.add_parser("unlock", parents=[common],
                             help="clear an AUTH lockout in the running server (the user and the addresses "
                                  "that failed as it, or one --ip)")
    unlock.add_argument("name")
    unlock.add_argument("--ip", metavar="ADDRESS", help="clear only this client address's failures")
    unlock.add_argument("--timeout", type=float, default=control.DEFAULT_TIMEOUT, metavar="SECONDS")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise CredentialsError("the passwords do not match")
        return first
    # From a pipe or a Secret: the first line, without its line ending.
    return sys.stdin.readline().rstrip("\r\n")


def run(config: Config, args: argparse.Namespace) -> int:
    if args.action == "unlock":
        return _unlock(config, args)
    files = {item.name: item.auth.credentials_file for item in config.listeners
             if item.auth and item.auth.credentials_file}
    if args.listener:
        if args.listener not in files:
            print(f"mta user: listener {args.listener!r} has no auth.credentials_file", file=sys.stderr)
            return 2
        path = files[args.listener]
    elif len(set(files.values())) == 1:
        path = next(iter(files.values()))
    else:
        names = ", ".join(files) or "none"
        print(f"mta user: say which listener's credentials file with --listener (listeners with auth: {names})",
              file=sys.stderr)
        return 2
    if args.action in ("list", "delete"):
        return _user_file(path, args)
    try:
        password = _read_password()
        if len(password) < 8:
            raise CredentialsError("the password must have at least 8 characters")
        set_password(path, args.name, password, create=args.action == "add")
    except CredentialsError as exc:
        print(f"mta user: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if args.action == 'add' else 'changed the password of'} user {args.name} in {path}")
    return 0


def _user_file(path: Any, args: argparse.Namespace) -> int:
    """``mta user list`` and ``mta user delete``: the file only; a running server re-reads it."""
    from mta.auth.credentials import remove_user, user_names

    try:
        if args.action == "list":
            for name in user_names(path):
                print(name)
            return 0
        remove_user(path, args.name)
    except (CredentialsError, OSError) as exc:
        print(f"mta user: {exc}", file=sys.stderr)
        return 1
    print(f"deleted user {args.name} from {path}")
    return 0


def _unlock(config: Config, args: argparse.Namespace) -> int:
    ip = None
    if args.ip is not None:
        try:
            ip = str(ipaddress.ip_address(args.ip))  # the form the server counts failures under
        except ValueError:
            print(f"mta user unlock: --ip {args.ip!r} is not an IP address", file=sys.stderr)
            return 2
    if not Spool(config.spool_shard, config.spool.sync).in_use():
        print("mta user unlock: no server is running: nothing to unlock (lockouts live in the server's memory)")
        return 0
    try:
        result = control.request(control.socket_path(config.spool.path), "unlock", [args.name], args.timeout,
                                 extra={"ip": ip} if ip is not None else None)
    except control.ControlError as exc:
        print(f"mta user unlock: {exc}", file=sys.stderr)
        return 1
    addresses = ", ".join(result.get("addresses") or []) or "none"
    scope = f"address {ip}" if ip is not None else f"user {args.name}"
    locked = "was locked" if result.get("user_locked") else "was not locked"
    print(escape(f"unlocked {scope} (user {args.name} {locked}; addresses cleared: {addresses})"))
    return 0
