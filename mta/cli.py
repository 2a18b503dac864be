"""The ``mta`` command: serve, check-config, user, api-key, dkim, doctor, probe, tls, queue, suppress.

Every subcommand takes ``-c FILE`` (or ``$MTA_CONFIG``) and the same
``MTA__...`` environment overrides as the server.  ``mta queue`` talks to
the running server through its control socket when a server owns the
spool, and works on the spool files itself (holding the spool lock) when
none does, so it never races a server.

Exit codes: 0 done (a long queue action: going on in the server), 1 the
action failed (unknown id, server unreachable or silent past ``--timeout``;
``doctor``: a check failed, or with ``--strict`` warned), 2 bad
configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import ssl
import sys
from typing import Any

from mta import config as config_module
from mta import control, queue_cli, suppress_cli, user_cli
from mta.api import keys_cli
from mta.config import Config, ConfigError
from mta.hostport import parse_host_port
from mta.terminal import escape, escape_block
from spool import Spool, SpoolLocked


def _parser() -> argparse.ArgumentParser:
    help_text = "configuration file (default: $MTA_CONFIG, else the embedded default)"
    parser = argparse.ArgumentParser(prog="mta", description="kubemta: an SMTP mail transfer agent")
    parser.add_argument("-c", "--config", metavar="FILE", help=help_text)
    # Subcommands accept -c too; SUPPRESS keeps them from resetting a -c given before them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", help=help_text, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the MTA")
    worker = sub.add_parser("worker", help="(internal) a receiving process that mta serve starts (workers: N)")
    worker.add_argument("--channel-fd", type=int, required=True)
    sub.add_parser("check-config", parents=[common], help="validate the configuration and print it")
    send = sub.add_parser("send", parents=[common], help="send a test message through the local relay listener")
    send.add_argument("--to", required=True, action="append", metavar="ADDRESS", help="a recipient (repeatable)")
    send.add_argument("--from", dest="sender", metavar="ADDRESS", help="default: postmaster@<hostname>")
    send.add_argument("--subject", default="kubemta test message")
    send.add_argument("--body", default="This is a test message sent with mta send.\n",
                      help="the text; '-' reads it from standard input")
    send.add_argument("--wait", action="store_true", help="follow the message until it leaves the queue")
    send.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="for --wait")
    _drain_parser(sub, common)
    user_cli.add_parser(sub, common)
    _add_dkim_parser(sub, common)
    suppress_cli.add_parser(sub, common)
    keys_cli.add_parser(sub, common)
    queue_cli.add_parser(sub, common)
    probe = sub.add_parser("probe", parents=[common], help="send a tagged message through a listener and wait "
                           "for it in a mailbox over IMAP (-c names the probe's own file)")
    probe.add_argument("--json", action="store_true", help="one JSON object")
    doctor = sub.add_parser("doctor", parents=[common], help="run the deliverability self-checks once")
    doctor.add_argument("--json", action="store_true", help="one JSON array of {name, status, reason}")
    doctor.add_argument("--strict", action="store_true", help="exit 1 on a warning too, not only on a failure")
    tls = sub.add_parser("tls", parents=[common], help="outbound TLS policy")
    tsub = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = tsub.add_parser("check", parents=[common], help="print the TLS policy that would apply to a domain, "
                            "and why")
    check.add_argument("domain")
    check.add_argument("--json", action="store_true", help="one JSON object")
    tls_report = tsub.add_parser("report", parents=[common], help="print a day's TLS-RPT reports (RFC 8460), "
                                 "or with --send have the running server send them now")
    tls_report.add_argument("--date", help="the UTC day, YYYY-MM-DD (default: yesterday)")
    tls_report.add_argument("--send", action="store_true", help="send the day's unsent reports now")
    return parser


def _add_dkim_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dkim_cmd = sub.add_parser("dkim", parents=[common], help="DKIM key tools")
    dsub = dkim_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = dsub.add_parser("keygen", parents=[common], help="write a new key and print its DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", required=True, help="the private key file to create (PEM, PKCS#8)")


def _dkim(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from mta.config import DKIM_SELECTOR, dkim_domain
    from mta.dkim import keys

    try:
        domain = dkim_domain(args.domain)
    except ValueError as exc:
        print(f"mta dkim: --domain: {exc}", file=sys.stderr)
        return 2
    if not re.match(DKIM_SELECTOR, args.selector):
        print(f"mta dkim: --selector: {args.selector!r} is not a selector (letters, digits, . _ -; "
              f"at most 63 characters)", file=sys.stderr)
        return 2
    try:
        if args.type == "rsa" and args.bits < 2048:
            raise keys.DkimKeyError("use at least 2048 bits for new RSA keys")
        key = keys.generate(args.type, args.bits)
        keys.write_private_key(key, Path(args.out))
    except FileExistsError:
        print(f"mta dkim: {args.out} exists; not overwriting a key", file=sys.stderr)
        return 1
    except (OSError, keys.DkimKeyError) as exc:
        print(f"mta dkim: {exc}", file=sys.stderr)
        return 1
    value = keys.txt_record(key)
    # TXT strings hold at most 255 octets each; resolvers join them.
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    print(f"{args.selector}._domainkey.{domain}. IN TXT {chunks}")
    return 0


def _doctor(config: Config, as_json: bool, strict: bool) -> int:
    from mta.dkim.keys import DkimKeyError, SigningKey
    from mta.identity.checks import SelfChecks

    try:
        keys = [SigningKey.load(k.domain, k.selector, k.key_file) for k in config.dkim.keys]
    except DkimKeyError as exc:
        print(f"mta doctor: dkim.keys: {exc}", file=sys.stderr)
        return 2
    async def everything() -> list[Any]:
        checks = SelfChecks(config, keys)
        return await checks.run() + await checks.routes()
    results = asyncio.run(everything())
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for result in results:
            print(f"{result.status.upper():<5} {result.name}: {result.reason}")
    bad = ("fail", "warn") if strict else ("fail",)
    return 1 if any(r.status in bad for r in results) else 0


def _probe(path: str | None, as_json: bool) -> int:
    from mta import probe
    from mta.config import load_probe

    if path is None:
        print("mta probe: -c FILE: the probe's file (submit, sender, to, imap; see the README)", file=sys.stderr)
        return 2
    try:
        config = load_probe(path)
    except ConfigError as exc:
        print(f"mta probe: configuration error:\n{exc}", file=sys.stderr)
        return 2
    result = probe.run(config)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{'PASS' if result.success else 'FAIL'} probe {config.name}: {result.reason}"
              + (f" (queue id {result.queue_id})" if result.queue_id else "")
              + (f"; pushgateway: {result.pushed}" if result.pushed else ""))
    return 0 if result.success else 1


def _send(config: Config, args: argparse.Namespace) -> int:
    from mta import send

    sender = args.sender or f"postmaster@{config.hostname}"
    body = sys.stdin.read() if args.body == "-" else args.body
    try:
        queue_id = send.submit(config, sender, args.to, send.build(config, sender, args.to, args.subject, body))
        print(queue_id)
        sys.stdout.flush()
        if args.wait:
            def show(record_id: str) -> dict[str, Any] | None:
                return queue_cli.queue_request(config, "show", [record_id]).get(record_id)

            send.follow(queue_id, show, lambda line: print(escape(f"{queue_id}: {line}"), flush=True), args.timeout)
    except (send.SendError, control.ControlError) as exc:
        print(f"mta send: {exc}", file=sys.stderr)
        return 1
    return 0


def _drain_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    drain = sub.add_parser("drain", parents=[common], help="hand every queued message to another server")
    drain.add_argument("--to", required=True, metavar="HOST:PORT", help="the other server's handoff endpoint")
    drain.add_argument("--to-pod", metavar="NAME",
                       help="the other server's pod name, which requests are signed for "
                            "(default: the first label of the --to host name)")
    drain.add_argument("--spool", metavar="PATH", help="spool directory (default: spool.path)")
    drain.add_argument("--secret-file", metavar="FILE", help="handoff secret (default: drain.secret_file)")
    drain.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="give up after this long")


def _pod_of(host: str) -> str | None:
    """A pod's DNS name (``kubemta-0.kubemta-headless...``) starts with the pod's name; an IP names none."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.split(".", 1)[0] or None
    return None


def _drain(config: Config, args: argparse.Namespace) -> int:
    """``mta drain``: move a spool no server owns to a running server (the spool-rescue Job)."""
    import time
    from pathlib import Path

    from mta.drain import sender, wire

    secret_file = Path(args.secret_file) if args.secret_file else config.drain.secret_file
    if secret_file is None:
        print("mta drain: no secret: give --secret-file or set drain.secret_file", file=sys.stderr)
        return 2
    try:
        secret = wire.read_secret(secret_file)
        host, _ = parse_host_port(args.to)
    except (OSError, ValueError) as exc:
        print(f"mta drain: {exc}", file=sys.stderr)
        return 2
    pod = args.to_pod or _pod_of(host)
    if pod is None:
        print(f"mta drain: --to {args.to} names no pod: give --to-pod (requests are signed for the pod)",
              file=sys.stderr)
        return 2
    client_tls = None
    if config.drain.tls is not None:
        from mta.drain import tls

        try:
            client_tls = tls.client_context(config.drain.tls)
        except (OSError, ssl.SSLError) as exc:
            print(f"mta drain: drain.tls: {exc}", file=sys.stderr)
            return 2
    root = Path(args.spool) if args.spool else config.spool.path
    shard = root if (root / "msg").is_dir() else root / "0"  # a shard given directly, or a spool root
    if not (shard / "msg").is_dir():
        print(f"mta drain: {root} holds no spool", file=sys.stderr)
        return 1
    spool = Spool(shard, config.spool.sync)
    try:
        loaded = spool.open()
    except SpoolLocked as exc:
        print(f"mta drain: {exc}; stop that server first (or scale it down: it drains itself)", file=sys.stderr)
        return 1
    try:
        report = asyncio.run(sender.hand_over(spool, loaded.records, [sender.Target(args.to, pod)], secret,
                                              time.monotonic() + args.timeout, client_tls,
                                              config.drain.tls.server_name if config.drain.tls else None))
    finally:
        spool.close()
    print(f"moved={report.moved} duplicates={report.duplicates} left={len(report.left)} "
          f"quarantined={len(loaded.corrupt)}")
    for error in report.errors[-20:]:
        print(f"mta drain: {error}", file=sys.stderr)
    return 0 if report.complete else 1


def _load_config(path: str | None) -> Config:
    return config_module.load(path)


def _serve(config: Config) -> int:
    from mta.app import App, StartupError
    from mta.obs import log

    log.setup(config.log.level, config.log.format)
    try:
        asyncio.run(App(config).run())
    except StartupError as exc:
        print(f"mta: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker(channel_fd: int) -> int:
    from mta.workers.child import serve_worker

    # Its configuration comes from the main process, which validated it.
    asyncio.run(serve_worker(channel_fd))
    return 0


def _tls_check(config: Config, domain: str, as_json: bool) -> int:
    from mta.delivery import tlscheck, tlspolicy
    from mta.delivery.mx import MxResolver, make_resolver

    resolver = make_resolver(config.dns.servers, config.dns.timeout)
    policy = tlspolicy.build(config, resolver)
    report = asyncio.run(tlscheck.explain(policy, MxResolver(resolver), domain, config.delivery.max_mx_hosts))
    policy.close()
    print(json.dumps(report, indent=2) if as_json else escape_block(tlscheck.render(report)))
    return 1 if report.get("error") else 0


def _tls_report(config: Config, day: str | None, send_now: bool) -> int:
    import datetime

    from mta.tlsrpt import send as tlsrpt_send
    from mta.tlsrpt.record import SessionRecord

    if day is None:
        day = (datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)).isoformat()
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        print(f"mta tls report: --date {day!r} is not YYYY-MM-DD", file=sys.stderr)
        return 2
    if send_now:
        try:
            results = control.request(control.socket_path(config.spool.path), "tls-report", [], timeout=300,
                                      extra={"date": day})
        except control.ControlError as exc:
            print(f"mta tls report: {exc}", file=sys.stderr)
            return 1
        for domain, outcome in sorted(results.items()):
            print(escape_block(f"{domain}: {outcome}"))
        if not results:
            print(f"no TLS sessions recorded for {day}")
        return 0
    path = tlsrpt_send.record_path(config.spool.path)
    if not path.exists():
        print(f"mta tls report: no TLS-RPT record at {path} (tls_reports.enabled, and mail delivered?)",
              file=sys.stderr)
        return 1
    record = SessionRecord(path)
    try:
        reporter = tlsrpt_send.build(config, record, None)
        reports = [reporter.build(day, domain, record.sent(day, domain) or None) for domain in record.domains(day)]
    finally:
        record.close()
    print(json.dumps(reports, indent=2))
    return 0


def _check_config(config: Config) -> int:
    from mta.secret_files import readable_by_others
    from mta.startup_files import problems

    print(json.dumps(config.model_dump(mode="json"), indent=2))
    sys.stdout.flush()  # the configuration first, then what is wrong with it
    found = problems(config)
    for key, path, mode in readable_by_others(config):
        print(f"warning: {key}: {path} has mode {mode:04o}; group or others can read it (make it 0400 or 0600)",
              file=sys.stderr)
    if found:
        print("mta: these files would stop mta serve:\n" + "\n".join(found), file=sys.stderr)
        return 2
    print("configuration OK", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (mta check-config | head): not an error worth a traceback.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args.channel_fd)
    if args.command == "probe":
        return _probe(getattr(args, "config", None), args.json)
    try:
        config = _load_config(args.config)
    except ConfigError as exc:
        print(f"mta: configuration error:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(config)
    if args.command == "drain":
        return _drain(config, args)
    if args.command == "send":
        return _send(config, args)
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "user":
        return user_cli.run(config, args)
    if args.command == "dkim":
        return _dkim(args)
    if args.command == "suppress":
        return suppress_cli.run(config, args)
    if args.command == "api-key":
        return keys_cli.run(config, args)
    if args.command == "doctor":
        return _doctor(config, args.json, args.strict)
    if args.command == "tls" and args.action == "report":
        return _tls_report(config, args.date, args.send)
    if args.command == "tls":
        return _tls_check(config, args.domain, args.json)
    return queue_cli.run(config, args)


if __name__ == "__main__":
    sys.exit(main())
