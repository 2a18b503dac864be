"""``mta queue``: list, show, trace and act on queued messages.

Every action goes through the running server's control socket when a server
owns the spool, and works on the spool files itself (holding the spool
lock) when none does, so it never races a server.  ``trace`` prints the
attempt history the record keeps (the last rounds, older ones counted);
``show --body`` prints the stored message.

Everything in the output that a client or a remote server wrote (addresses,
replies, header and body) is escaped for the terminal (``mta.terminal``);
``show --body --raw`` writes the message's bytes unchanged, and only to a
pipe or file, never to a terminal.  Failure: exit 1 for an unknown id or an
unreachable server, 2 for ``--raw`` on a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from typing import Any

from mta import control
from mta.config import Config
from mta.terminal import escape, escape_block
from spool import Spool, SpoolLocked

QUEUE_ACTIONS = {
    "list": "show queued messages",
    "show": "show messages in full (header included; --body: the whole message)",
    "trace": "show each delivery attempt of messages: time, MX host and address, TLS, replies",
    "flush": "retry deferred mail now (all of it when no id is given)",
    "delete": "remove messages from the queue without a bounce",
    "hold": "keep messages queued but do not deliver them",
    "release": "end a hold; deliver now",
    "bounce": "return messages to their senders now",
}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", parents=[common], help="inspect and manage the queue")
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in QUEUE_ACTIONS.items():
        item = qsub.add_parser(action, parents=[common], help=text)
        item.add_argument("--timeout", type=float, default=control.DEFAULT_TIMEOUT, metavar="SECONDS",
                          help="how long to wait for a running server's answer (default 30)")
        if action == "list":
            item.add_argument("--json", action="store_true", help="one JSON array")
        elif action in ("show", "trace"):
            item.add_argument("ids", nargs="+", metavar="ID")
            item.add_argument("--json", action="store_true", help="JSON output")
            if action == "show":
                item.add_argument("--body", action="store_true",
                                  help="print the whole stored message (escaped for the terminal)")
                item.add_argument("--raw", action="store_true",
                                  help="with --body: the message's bytes unchanged (to a pipe or file only)")
        elif action == "flush":
            item.add_argument("ids", nargs="*", metavar="ID")
        else:
            item.add_argument("ids", nargs="+", metavar="ID")


def _offline(config: Config, action: str, ids: list[str]) -> Any:
    from mta.scheduler.operator import Operator
    from mta.scheduler.queue import assemble

    spool = Spool(config.spool_shard, config.spool.sync)
    loaded = spool.open()
    try:
        async def run() -> Any:
            # No courier: nothing is delivered, but a bounce queues its DSN.
            scheduler, _ = assemble(spool, config, courier=None)
            scheduler.load(loaded.records)
            # No background here: this process ends when it answers.
            response = await control.handle(Operator(scheduler), {"action": action, "ids": ids},
                                            answer_within=None)
            if not response["ok"]:
                raise control.ControlError(response["error"])
            return response["result"]

        return asyncio.run(run())
    finally:
        spool.close()


def queue_request(config: Config, action: str, ids: list[str], timeout: float = control.DEFAULT_TIMEOUT) -> Any:
    """Run a queue action through the server, or on the spool when none runs."""
    spool = Spool(config.spool_shard, config.spool.sync)
    if not spool.in_use():
        if action == "list" and not config.spool_shard.exists():
            return []
        try:
            return _offline(config, action, ids)
        except SpoolLocked:
            pass  # a server started meanwhile: ask it
    return control.request(control.socket_path(config.spool.path), action, ids, timeout)


def _print_list(records: list[dict[str, Any]]) -> None:
    if not records:
        print("queue is empty")
        return
    # Replies, addresses and headers come from remote peers and clients:
    # escaped, so they cannot drive the operator's terminal.
    for item in records:
        print(escape(f"{item['id']}  {item['size']:>8}  {item['created']}  {item['state']:<8}  "
                     f"attempts={item['attempts']}  next={item['next_attempt']}  from=<{item['sender']}>"))
        for rcpt in item["recipients"]:
            reply = f"  ({rcpt['last_reply']})" if rcpt["last_reply"] else ""
            print(escape(f"    {rcpt['state']:<9} <{rcpt['address']}>{reply}"))
    print(f"{len(records)} message(s)")


def _tls_words(tls: Any) -> str:
    if not isinstance(tls, dict):
        return "no TLS"
    return " ".join(str(part) for part in (tls.get("version"), tls.get("cipher")) if part)


def _print_trace(info: dict[str, Any]) -> None:
    _print_list([info])
    if info.get("history_dropped"):
        print(f"  ({info['history_dropped']} earlier attempt(s) not kept)")
    if not info.get("history"):
        print("  no delivery attempt recorded")
    for round_ in info.get("history", []):
        print(escape(f"  attempt {round_.get('attempt')} at {round_.get('at')}"))
        for result in round_.get("results", []):
            host = result.get("mx_host") or "-"
            where = f"{host} [{result['mx_ip']}]" if result.get("mx_ip") else host
            # Without the server's own reply there was no SMTP session to have TLS or not.
            tls = _tls_words(result.get("tls")) if result.get("tls") or result.get("answered") else "no session"
            print(escape(f"    <{result.get('address')}>  {where}  {tls}"))
            print(escape(f"      {result.get('reply')}"))
        if round_.get("more"):
            print(f"    ... and {round_['more']} more recipient(s)")


def _write_body(encoded: str, raw: bool) -> None:
    data = base64.b64decode(encoded)
    if raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        print(escape_block(data.decode("utf-8", errors="replace")))


def _show(config: Config, args: argparse.Namespace, result: dict[str, Any]) -> int:
    missing = [i for i, info in result.items() if info is None]
    bodies: dict[str, str | None] = {}
    if args.body:
        bodies = queue_request(config, "body", [i for i in result if result[i] is not None], args.timeout)
        missing += [i for i, encoded in bodies.items() if encoded is None]
    if args.json:
        if args.body:
            for i, encoded in bodies.items():
                if result.get(i) is not None and encoded is not None:
                    result[i]["message"] = base64.b64decode(encoded).decode("utf-8", errors="replace")
        print(json.dumps(result, indent=1))
    else:
        for record_id, info in result.items():
            if info is None:
                continue
            encoded = bodies.get(record_id)
            if args.body and encoded is not None:
                if not args.raw:
                    _print_list([info])
                _write_body(encoded, args.raw)
            elif not args.body:
                _print_list([info])
                print(escape_block(info.get("header") or ""))
    for i in dict.fromkeys(missing):
        print(f"mta queue show: {i}: unknown id (or its message is unreadable)", file=sys.stderr)
    return 1 if missing else 0


def run(config: Config, args: argparse.Namespace) -> int:
    ids = list(getattr(args, "ids", []) or [])
    if getattr(args, "raw", False):
        if not args.body or args.json:
            print("mta queue show: --raw goes with --body, without --json", file=sys.stderr)
            return 2
        if sys.stdout.isatty():
            print("mta queue show: --raw writes the message unescaped: send it to a pipe or file, "
                  "not a terminal", file=sys.stderr)
            return 2
    try:
        result = queue_request(config, args.action, ids, args.timeout)
        if args.action == "show":
            return _show(config, args, result)
    except control.StillRunning as exc:
        print(f"mta queue: {exc}")
        return 0
    except control.ControlError as exc:
        print(f"mta queue: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            _print_list(result)
        return 0
    if args.action == "trace":
        missing = [i for i, info in result.items() if info is None]
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            for info in result.values():
                if info is not None:
                    _print_trace(info)
        for i in missing:
            print(f"mta queue trace: {i}: unknown id", file=sys.stderr)
        return 1 if missing else 0
    failed = False
    for record_id, outcome in result.items():
        print(escape(f"{record_id}: {outcome}"))
        failed = failed or (outcome not in ("ok",) and not outcome.startswith("will be done"))
    return 1 if failed else 0
