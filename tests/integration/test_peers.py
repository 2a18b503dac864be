"""Self-tests for tests.peers: each real peer answers, stores and reports as promised.

Owns nothing but these checks; a failure here means a peer (or this
machine's unbound/postfix) is broken, not kubemta.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable, Sequence
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import dns.asyncresolver
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.peers import DnsServer, PostfixServer, SmtpSink
from tests.peers.sink import parse_dump

pytest_plugins = ["tests.peers.fixtures"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("peer_tools")]

DnsFactory = Callable[[Sequence[str], Sequence[str]], DnsServer]

RECORDS = [
    "example.test. 300 IN MX 10 mx1.example.test.",
    "example.test. 300 IN MX 20 mx2.example.test.",
    "mx1.example.test. IN A 127.0.0.2",
    "mx2.example.test. IN A 127.0.0.3",
    'example.test. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
    "nullmx.test. IN MX 0 .",
    "2.0.0.127.in-addr.arpa. IN PTR mx1.example.test.",
]
ZONES = ["example.test.", "nullmx.test.", "127.in-addr.arpa."]

# Lines that trip naive transports: a leading dot, an empty line, trailing
# spaces, a long line and UTF-8.
BODY_LINES = [
    "first line",
    ".a line starting with a dot",
    "..two dots",
    "",
    "trailing spaces   ",
    "x" * 900,
    "caf\u00e9 \u2603",
    "last line",
]


def _message(sender: str, to: str, subject: str) -> bytes:
    head = f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
    head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    return head.encode() + "\r\n".join(BODY_LINES).encode() + b"\r\n"


def _query(server: DnsServer, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, server.host, port=server.port, timeout=3)


def _answers(resp: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in resp.answer for rd in rrset)


# -- DNS ---------------------------------------------------------------------


def test_dns_serves_mx_a_txt_ptr(dns_server_factory: DnsFactory) -> None:
    server = dns_server_factory(RECORDS, ZONES)

    async def resolve_mx() -> list[tuple[int, str]]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        answer = await resolver.resolve("example.test", "MX", lifetime=5)
        return sorted((rd.preference, rd.exchange.to_text()) for rd in answer)

    assert asyncio.run(resolve_mx()) == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert _answers(_query(server, "mx1.example.test", "A")) == ["127.0.0.2"]
    assert _answers(_query(server, "example.test", "TXT", tcp=True)) == ['"v=spf1 ip4:127.0.0.0/8 -all"']
    assert _answers(_query(server, "2.0.0.127.in-addr.arpa", "PTR")) == ["mx1.example.test."]
    assert server.address == f"127.0.0.1:{server.port}"


def test_dns_negative_answers_and_null_mx(dns_server_factory: DnsFactory) -> None:
    server = dns_server_factory(RECORDS, ZONES)

    nx = _query(server, "nosuch.example.test", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.authority, "NXDOMAIN should carry the zone SOA"

    nodata = _query(server, "mx1.example.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert nodata.answer == []

    # A name in a zone of ours that shadows unbound's built-in 127.in-addr.arpa.
    assert _query(server, "1.0.0.127.in-addr.arpa", "PTR").rcode() == dns.rcode.NXDOMAIN

    null_mx = _query(server, "nullmx.test", "MX")
    assert _answers(null_mx) == ["0 ."]

    outside = _query(server, "example.com", "A", tcp=True)
    assert outside.rcode() in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN)
    assert outside.answer == []


def test_dns_replace_records_keeps_port(dns_server_factory: DnsFactory) -> None:
    server = dns_server_factory(RECORDS, ZONES)
    port = server.port
    server.replace_records(["example.test. IN MX 5 backup.example.test.", "backup.example.test. IN A 127.0.0.9"])
    assert server.port == port
    assert _answers(_query(server, "example.test", "MX")) == ["5 backup.example.test."]
    assert _query(server, "mx1.example.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_dns_refuses_records_outside_its_zones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside every zone"):
        DnsServer(["mx.elsewhere.test. IN A 127.0.0.1"], ["example.test."], tmp_path)


# -- smtp-sink ---------------------------------------------------------------


def test_sink_dumps_envelope_and_content(smtp_sink_factory: Callable[..., SmtpSink]) -> None:
    sink = smtp_sink_factory()
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.sendmail(
            "alice@sender.test",
            ["bob@example.test", "carol@example.test"],
            _message("alice@sender.test", "bob@example.test", "sink test"),
        )

    [msg] = sink.wait_for_messages(1, timeout=10)
    assert msg.sender == "alice@sender.test"
    assert msg.recipients == ["bob@example.test", "carol@example.test"]
    parsed = BytesParser(policy=compat32).parsebytes(msg.data)
    assert parsed["Subject"] == "sink test"
    # smtp-sink rewrites CRLF to LF; the lines themselves come back intact.
    assert parsed.get_payload(decode=True).decode().split("\n")[:-1] == BODY_LINES


def test_sink_soft_reject_then_accept_after_restart(smtp_sink_factory: Callable[..., SmtpSink]) -> None:
    sink = smtp_sink_factory(extra_args=["-r", "RCPT"])
    address = (sink.host, sink.port)
    with smtplib.SMTP(*address, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@sender.test", ["b@example.test"], b"Subject: x\r\n\r\nx\r\n")
        code, _ = refused.value.recipients["b@example.test"]
        assert 400 <= code < 500

    sink.restart(["-f", "RCPT"])
    with smtplib.SMTP(*address, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@sender.test", ["b@example.test"], b"Subject: x\r\n\r\nx\r\n")
        code, _ = refused.value.recipients["b@example.test"]
        assert 500 <= code < 600
    assert sink.messages() == []

    sink.restart([])
    assert (sink.host, sink.port) == address
    with smtplib.SMTP(*address, timeout=10) as client:
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: later\r\n\r\naccepted\r\n")
    [msg] = sink.wait_for_messages(1, timeout=10)
    assert msg.recipients == ["b@example.test"]
    assert msg.data.endswith(b"\n\naccepted\n")


def test_sink_dump_parser_on_known_sample() -> None:
    raw = (
        b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: client.test\n"
        b"X-Mail-Args: <> SIZE=20\nX-Rcpt-Args: <x@y.test> NOTIFY=NEVER\n"
        b"Received: from client.test ([127.0.0.1])\n\tby smtp-sink (smtp-sink) with ESMTP id 1;\n\tdate\n"
        b"Subject: s\n\nbody\n\n"
    )
    msg = parse_dump(raw)
    assert (msg.sender, msg.recipients, msg.helo) == ("", ["x@y.test"], "client.test")
    assert msg.rcpt_args == ["<x@y.test> NOTIFY=NEVER"]
    assert msg.data == b"Subject: s\n\nbody\n"


def test_sink_context_manager_stops_its_process(peer_workdir: Path) -> None:
    from tests.peers import free_port

    with SmtpSink("127.0.0.1", free_port(), peer_workdir / "sink") as sink:
        pid = sink.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{pid}").exists()


# -- Postfix -----------------------------------------------------------------


def _running(pid: int) -> bool:
    """Alive and not a zombie: a daemonized master is reaped by PID 1, whenever it gets to it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _body_lines(raw: bytes) -> list[str]:
    parsed = BytesParser(policy=compat32).parsebytes(raw)
    return parsed.get_payload(decode=True).decode().split("\n")[:-1]


def test_postfix_delivers_over_starttls_to_maildir(postfix_factory: Callable[..., PostfixServer]) -> None:
    server = postfix_factory(["example.test"])
    context = ssl.create_default_context(cafile=str(server.ca_path))
    with smtplib.SMTP(server.host, server.port, timeout=15) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)  # verified against the peer's CA
        client.ehlo("client.test")
        client.sendmail(
            "alice@sender.test", ["bob@example.test"], _message("alice@sender.test", "bob@example.test", "over tls")
        )

    [raw] = server.wait_for_mail("bob@example.test", 1, timeout=20)
    parsed = BytesParser(policy=compat32).parsebytes(raw)
    assert parsed["Subject"] == "over tls"
    assert parsed["Return-Path"] == "<alice@sender.test>"
    assert "ESMTPS" in parsed["Received"]
    assert _body_lines(raw) == BODY_LINES
    assert server.mailbox("carol@example.test") == []


def test_postfix_plain_smtp_refuses_relay_and_logs(postfix_factory: Callable[..., PostfixServer]) -> None:
    server = postfix_factory(["example.test", "other.test"])
    with smtplib.SMTP(server.host, server.port, timeout=15) as client:
        refused = client.sendmail(
            "alice@sender.test",
            ["bob@example.test", "dave@other.test", "eve@elsewhere.test"],
            _message("alice@sender.test", "bob@example.test", "plain"),
        )
    code, text = refused["eve@elsewhere.test"]
    assert code // 100 == 5, text
    assert set(refused) == {"eve@elsewhere.test"}

    assert _body_lines(server.wait_for_mail("bob@example.test", 1, timeout=20)[0]) == BODY_LINES
    assert len(server.wait_for_mail("dave@other.test", 1, timeout=20)) == 1
    log = server.log_lines()
    assert any("to=<bob@example.test>" in line and "status=sent" in line for line in log), log
    assert any("Relay access denied" in line for line in log), log


def test_postfix_context_manager_stops_master(peer_workdir: Path) -> None:
    from tests.peers import free_port

    with PostfixServer("127.0.0.1", free_port(), ["example.test"], peer_workdir / "postfix") as server:
        pid = int((server.queue_dir / "pid" / "master.pid").read_text().split()[0])
        assert _running(pid)
    assert not _running(pid)
    server.stop()  # a second stop is harmless
