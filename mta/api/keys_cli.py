"""``mta api-key add ACCOUNT``: a new HTTP API key, its hash written to ``http_api.keys_file``.

The key is printed once and kept nowhere; the file holds its scrypt hash
(``mta.api.keys``).  Failure: exit 2 when ``http_api.keys_file`` is not
configured, 1 when the account already has a key or the file cannot be
written (the previous file stays whole).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mta.auth.credentials import CredentialsError
from mta.config import Config


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("api-key", parents=[common], help="HTTP send API keys")
    actions = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common], help="make a key for an account and print it")
    add.add_argument("account", help="the account name whose policy (accounts.users) the key's mail gets")


def run(config: Config, args: argparse.Namespace) -> int:
    # Imported here: mta.api.keys brings in aiohttp (0.25 s), which every
    # other command of the CLI would pay for.
    from mta.api.keys import new_key

    path = config.http_api.keys_file
    if path is None:
        print("mta api-key: http_api.keys_file is not configured", file=sys.stderr)
        return 2
    try:
        key = new_key(path, args.account)
    except (CredentialsError, OSError) as exc:
        print(f"mta api-key: {exc}", file=sys.stderr)
        return 1
    print(key)
    return 0
