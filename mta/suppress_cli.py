"""``mta suppress list|add|remove|show``: the suppression list for operators.

Works on the database file itself (``mta.suppression``), whether or not a
server is running: SQLite's WAL mode and busy timeout let the CLI and every
server process use it at once, and a change is seen by the next RCPT.
``--json`` prints machine-readable output; the text form escapes control
characters (entries hold remote servers' words).

Exit codes: 0 done, 1 nothing matched (``remove``, ``show``) or the list
cannot be used, 2 bad usage (a bad reason, scope or duration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mta.config import Config, parse_duration
from mta.suppression import GLOBAL, REASONS, Entry, SuppressionError, SuppressionList, valid_scope
from mta.terminal import escape


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("suppress", parents=[common], help="the suppression list: recipients never sent to again")
    actions = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="show the entries in force")
    listing.add_argument("--json", action="store_true", help="one JSON array of entries")
    listing.add_argument("--all", action="store_true", help="expired entries too")
    show = actions.add_parser("show", parents=[common], help="show an address's entries (expired ones too)")
    show.add_argument("address")
    show.add_argument("--json", action="store_true")
    add = actions.add_parser("add", parents=[common], help="suppress an address")
    add.add_argument("address")
    add.add_argument("--reason", default="manual", help=f"one of {', '.join(REASONS)} (default: manual)")
    add.add_argument("--scope", default=GLOBAL, help="global (default), domain:SENDING_DOMAIN or account:USER")
    add.add_argument("--expires", help="after this long (30d, 12h) or never; default: suppression.expiry")
    add.add_argument("--note", default="", help="why, for the record")
    add.add_argument("--json", action="store_true")
    remove = actions.add_parser("remove", parents=[common], help="let mail to an address through again")
    remove.add_argument("address")
    remove.add_argument("--scope", help="only this scope (default: every scope)")
    remove.add_argument("--json", action="store_true")


def _when(stamp: float | None) -> str:
    return "never" if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _print(entries: list[Entry]) -> None:
    if not entries:
        print("(no entries)")
        return
    print(f"{'ADDRESS':<36} {'SCOPE':<24} {'REASON':<18} {'SOURCE':<10} {'ADDED':<21} EXPIRES")
    for item in entries:
        print(f"{escape(item.address):<36} {escape(item.scope):<24} {item.reason:<18} {escape(item.source):<10} "
              f"{_when(item.created):<21} {_when(item.expires)}")
        if item.detail:
            print(f"    {escape(item.detail)}")


def run(config: Config, args: argparse.Namespace) -> int:
    suppressions = SuppressionList(config.suppression_path, config.suppression)
    try:
        suppressions.open()
        return _action(suppressions, args)
    except SuppressionError as exc:
        print(f"mta suppress: {exc}", file=sys.stderr)
        return 1
    finally:
        suppressions.close()


def _action(suppressions: SuppressionList, args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    if args.action in ("list", "show"):
        entries = suppressions.entries(include_expired=args.all) if args.action == "list" else \
            suppressions.entries(args.address, include_expired=True)
        if as_json:
            print(json.dumps([item.as_dict() for item in entries], indent=2))
        else:
            _print(entries)
        return 1 if args.action == "show" and not entries else 0
    if args.action == "add":
        if args.reason not in REASONS:
            print(f"mta suppress add: --reason {args.reason!r}: use one of {', '.join(REASONS)}", file=sys.stderr)
            return 2
        if not valid_scope(args.scope):
            print(f"mta suppress add: --scope {args.scope!r}: use global, domain:NAME or account:USER",
                  file=sys.stderr)
            return 2
        expires: float | str | None = "default"
        if args.expires is not None:
            try:
                expires = None if args.expires == "never" else parse_duration(args.expires)
            except ValueError as exc:
                print(f"mta suppress add: --expires: {exc}", file=sys.stderr)
                return 2
        if "@" not in args.address:
            print(f"mta suppress add: {args.address!r} is not an address", file=sys.stderr)
            return 2
        entry = suppressions.add(args.address, args.reason, "operator", args.note, args.scope, expires)
        print(json.dumps(entry.as_dict(), indent=2) if as_json else
              f"suppressed {escape(entry.address)} ({entry.scope}, {entry.reason}), expires {_when(entry.expires)}")
        return 0
    removed = suppressions.remove(args.address, args.scope)
    print(json.dumps({"address": args.address, "removed": removed}) if as_json else
          f"removed {removed} entr{'y' if removed == 1 else 'ies'} for {escape(args.address)}")
    return 0 if removed else 1
