"""Delivery to the receivers that exist: every extension set, the bytes that arrived.

The courier (with its real connector and DKIM signer) delivers to receivers
that offer full or reduced extension sets — no 8BITMIME, no SMTPUTF8, no
PIPELINING, a small SIZE, STARTTLS with a certificate that does not verify
— to a real Postfix with SMTPUTF8 and DSN, and to chasquid (another make,
unpacked from its Debian package, on loopback ports of its own; its SPF
check asks a DNS server of the tests' on port 53 of a 127.x address).  Each case checks the bytes that
arrived: the MAIL parameters, 7-bit content where 8BITMIME is missing, line
lengths, the decoded text, and a DKIM signature that Perl's Mail::DKIM
accepts, asking a real DNS server (unbound) for the key.  Without
PIPELINING, the recorder sees each MAIL and RCPT come alone; without
ENHANCEDSTATUSCODES, a bare refusal still gets a DSN (from a real
``mta serve``) whose status is of the reply's class.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import random
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import pytest
import trustme

from mta.delivery.client import ClientSettings, Connector
from mta.delivery.courier import Courier, Parcel, Report
from mta.delivery.mx import MxResolver
from mta.delivery.result import Kind
from mta.delivery.route import NextHop
from mta.dkim import keys
from mta.dkim.signer import Signer
from mta.dsnrequest import MailRequest, RecipientRequest
from tests.ci import require
from tests.e2e.chasquid import Chasquid, fetch
from tests.harness import HOST, MtaServer, send_mail
from tests.obs.logs import wait_for_event
from tests.peers.dns import DnsServer
from tests.peers.net import free_port
from tests.peers.postfix import PostfixServer
from tests.peers.recorder import Received, Recorder

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)  # the peers here; direct delivery must be let in

VERIFIER = Path(__file__).parent.parent / "tools" / "dkimverify.pl"
HOP = NextHop("mx", "[127.0.0.1]")

TEXT = "Grüße aus Köln — ½ € ✓\n" * 3
EIGHT_BIT = (
    "From: App <app@sender.test>\r\nTo: <user@dest.test>\r\nSubject: Umlauts\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + TEXT.replace("\n", "\r\n")
    + "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
).encode("utf-8") + bytes(range(128, 256)) + b"\r\n--b1--\r\n"
HTML_LINE = "<p>" + "legacy report cell " * 400 + "</p>"  # one line of about 7,600 octets
LONG_LINE = (
    "From: App <app@sender.test>\r\nTo: <user@dest.test>\r\nSubject: Report\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=us-ascii\r\n\r\n" + HTML_LINE + "\r\n"
).encode("ascii")


@dataclass
class Signing:
    signer: Signer
    dns: DnsServer


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signing]:
    root = tmp_path_factory.mktemp("receivers")
    key = keys.generate("rsa")
    path = root / "key.pem"
    keys.write_private_key(key, path)
    value = keys.txt_record(key)
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    server = DnsServer([f"k1._domainkey.sender.test. IN TXT {chunks}"], ["sender.test"], root / "dns")
    server.start()
    try:
        yield Signing(Signer([keys.SigningKey.load("sender.test", "k1", path)]), server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bad_cert_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """STARTTLS with a certificate from a CA nobody trusts, for another name."""
    cert = trustme.CA().issue_cert("somewhere-else.example")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def deliver(signing: Signing, port: int, data: bytes, *, recipient: str = "user@dest.test",
            eight_bit: bool = False, smtputf8: bool = False, sender: str = "app@sender.test",
            dsn: MailRequest | None = None, recipient_dsn: RecipientRequest | None = None,
            recipients: list[str] | None = None) -> Report:
    settings = ClientSettings(helo_name="mta.sender.test", port=port, connect_timeout=5, command_timeout=15,
                              allowed_networks=LOOPBACK)
    connector = Connector(settings, MxResolver(dns.asyncresolver.Resolver(configure=False)))

    async def content(queue_id: str) -> bytes:
        return data

    async def main() -> Report:
        courier = Courier(connector.open, content, signing.signer)
        parcel = Parcel("Q0000000001", sender, recipients or [recipient], len(data), smtputf8=smtputf8,
                        eight_bit=eight_bit, dsn=dsn or MailRequest(),
                        recipient_dsn={recipient: recipient_dsn} if recipient_dsn else {})
        try:
            return await courier.deliver(HOP, parcel, per_connection=10)
        finally:
            await courier.close()

    return asyncio.run(asyncio.wait_for(main(), 60))


def verified(signing: Signing, data: bytes) -> str:
    verdict = subprocess.run(["perl", str(VERIFIER), signing.dns.host, str(signing.dns.port)], input=data,
                             capture_output=True, timeout=30, check=False)
    return verdict.stdout.decode() + verdict.stderr.decode()


def decoded_parts(data: bytes) -> list[bytes]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return [part.get_payload(decode=True) for part in message.walk() if not part.is_multipart()]


def only(recorder: Recorder) -> Received:
    [received] = recorder.wait_for(1)
    return received


def test_mail_parameters_are_sent_after_starttls(signing: Signing, bad_cert_tls: ssl.SSLContext) -> None:
    with Recorder(tls=bad_cert_tls) as recorder:
        report = deliver(signing, recorder.port, EIGHT_BIT, recipient="jürgen@dest.test", eight_bit=True,
                         smtputf8=True)
        received = only(recorder)
    assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], report
    assert received.tls, "opportunistic TLS with a certificate that does not verify still encrypts"
    options = {o.split("=")[0]: o for o in received.mail_options}
    assert "SMTPUTF8" in options and options.get("BODY") == "BODY=8BITMIME", received.mail_options
    assert options["SIZE"] == f"SIZE={len(received.data)}" or options["SIZE"].startswith("SIZE=")
    assert received.rcpt_tos == ["jürgen@dest.test"]
    assert "rsa-sha256 pass sender.test k1" in verified(signing, received.data)


def test_8bit_mail_to_a_7bit_receiver_is_converted_and_still_verifies(signing: Signing) -> None:
    with Recorder(hide=["8BITMIME"]) as recorder:
        report = deliver(signing, recorder.port, EIGHT_BIT, eight_bit=True)
        received = only(recorder)
    assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], report
    assert not any(o.upper().startswith("BODY=") for o in received.mail_options)
    assert received.data.isascii(), "a receiver without 8BITMIME must get 7-bit content"
    assert decoded_parts(received.data) == decoded_parts(EIGHT_BIT)
    # (the line end before a boundary belongs to the boundary, RFC 2046 §5.1.1)
    assert decoded_parts(received.data)[0].decode("utf-8").replace("\r\n", "\n") == TEXT.rstrip("\n")
    assert "rsa-sha256 pass sender.test k1" in verified(signing, received.data)


def test_8bit_mail_to_an_8bitmime_receiver_goes_unchanged_and_declared(signing: Signing) -> None:
    with Recorder(hide=["PIPELINING"]) as recorder:
        deliver(signing, recorder.port, EIGHT_BIT, eight_bit=True)
        received = only(recorder)
    assert "BODY=8BITMIME" in received.mail_options
    assert received.data.endswith(EIGHT_BIT), "only a signature is added"
    assert "rsa-sha256 pass sender.test k1" in verified(signing, received.data)


def test_long_lines_are_reencoded_before_signing(signing: Signing) -> None:
    with Recorder() as recorder:
        report = deliver(signing, recorder.port, LONG_LINE)
        received = only(recorder)
    assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], report
    assert max(len(line) for line in received.data.split(b"\r\n")) <= 998
    assert decoded_parts(received.data)[0].decode("ascii").rstrip("\r\n") == HTML_LINE
    assert "rsa-sha256 pass sender.test k1" in verified(signing, received.data)


def test_a_message_over_the_receivers_size_fails_at_once(signing: Signing) -> None:
    with Recorder(size=2000) as recorder:
        report = deliver(signing, recorder.port, LONG_LINE)
    [outcome] = report.outcomes.values()
    assert outcome.kind is Kind.PERMANENT and (outcome.reply.code, outcome.reply.enhanced) == (552, "5.3.4")
    assert "at most 2000" in outcome.reply.text and not outcome.answered
    assert recorder.messages == []


def test_a_receiver_without_smtputf8_gets_no_mail_and_the_failure_is_ours(signing: Signing) -> None:
    with Recorder(hide=["SMTPUTF8"]) as recorder:
        report = deliver(signing, recorder.port, EIGHT_BIT, recipient="jürgen@dest.test", eight_bit=True,
                         smtputf8=True)
    [outcome] = report.outcomes.values()
    assert outcome.kind is Kind.PERMANENT and outcome.reply.enhanced == "5.6.7"
    assert not outcome.answered, "the receiver said nothing wrong; we could not send"
    assert recorder.messages == []


def test_8bit_headers_cannot_go_to_a_7bit_receiver(signing: Signing) -> None:
    message = "Subject: Grüße\r\nFrom: <app@sender.test>\r\n\r\nä\r\n".encode()
    with Recorder(hide=["8BITMIME", "SMTPUTF8"]) as recorder:
        report = deliver(signing, recorder.port, message, eight_bit=True)
    [outcome] = report.outcomes.values()
    assert outcome.kind is Kind.PERMANENT and outcome.reply.enhanced == "5.6.3"
    assert "header" in outcome.reply.text and recorder.messages == []


def test_a_real_postfix_takes_internationalised_mail_over_starttls(signing: Signing, peer_dir: Path) -> None:
    with PostfixServer("127.0.0.1", free_port(), ["dest.test"], peer_dir / "postfix",
                       extra_main_cf={"smtputf8_enable": "yes"}) as postfix:
        report = deliver(signing, postfix.port, EIGHT_BIT, recipient="jürgen@dest.test", eight_bit=True,
                         smtputf8=True)
        assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], (report, postfix.log_text()[-2000:])
        new = postfix.mail_dir / "dest.test" / "new"
        deadline = time.monotonic() + 20
        while not (new.is_dir() and any(new.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        [path] = list(new.iterdir())
        stored = path.read_bytes()
        log = postfix.log_text()
    assert "TLS connection established from" in log or "Anonymous TLS connection established" in log, log[-2000:]
    assert "Delivered-To: jürgen@dest.test".encode() in stored
    # The Maildir copy has LF line ends; the signature is over CRLF.
    assert "rsa-sha256 pass sender.test k1" in verified(signing, stored.replace(b"\n", b"\r\n"))


DSN_REQUEST = MailRequest("HDRS", "env+id 1")
RCPT_REQUEST = RecipientRequest(frozenset({"SUCCESS", "FAILURE"}), "rfc822;Orig+Tag@Dest.test")


def test_a_receiver_without_dsn_gets_no_dsn_parameters(signing: Signing) -> None:
    # aiosmtpd offers no DSN and would answer 555 to any of its parameters.
    with Recorder() as recorder:
        report = deliver(signing, recorder.port, LONG_LINE, dsn=DSN_REQUEST, recipient_dsn=RCPT_REQUEST)
        received = only(recorder)
    [outcome] = report.outcomes.values()
    assert outcome.kind is Kind.DELIVERED and not outcome.dsn_passed, outcome
    assert not any(o.startswith(("RET=", "ENVID=")) for o in received.mail_options), received.mail_options
    assert received.rcpt_options == []


def test_a_real_postfix_takes_the_dsn_request_and_sends_the_delivered_notice(signing: Signing,
                                                                              peer_dir: Path) -> None:
    # The sender is in Postfix's own domain, so its success notice stays there to be read.
    with PostfixServer("127.0.0.1", free_port(), ["dest.test"], peer_dir / "postfix") as postfix:
        report = deliver(signing, postfix.port, LONG_LINE, sender="app@dest.test", dsn=DSN_REQUEST,
                         recipient_dsn=RCPT_REQUEST)
        [outcome] = report.outcomes.values()
        assert outcome.kind is Kind.DELIVERED and outcome.dsn_passed, (outcome, postfix.log_text()[-2000:])
        [raw] = postfix.wait_for_mail("app@dest.test", 1, timeout=30)
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert notice.get_content_type() == "multipart/report", raw[:2000]
    per_message, per_recipient = notice.get_payload()[1].get_payload()[:2]
    assert per_message["Original-Envelope-Id"] == "env+id 1"
    assert per_recipient["Action"] == "delivered"
    assert per_recipient["Original-Recipient"].replace(" ", "") == "rfc822;Orig+Tag@Dest.test"
    assert per_recipient["Final-Recipient"].replace(" ", "") == "rfc822;user@dest.test"


# chasquid: a receiving MTA of another make, on loopback ports of its own.
CHASQUID_USERS = ["eight", "jürgen", "long"]


@pytest.fixture(scope="module")
def chasquid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chasquid]:
    binary, reason = fetch()
    require(binary is not None, reason)
    assert binary is not None
    root = tmp_path_factory.mktemp("chasquid")
    # chasquid's resolver reads /etc/resolv.conf, which has no port: its DNS needs port 53 of an address of
    # its own.  The SPF record lets chasquid's check of the sender pass, which shows it asked this server.
    spf_dns: DnsServer | None = None
    for attempt in range(5):  # a random address, in case another test's server holds port 53 of one
        candidate = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        spf_dns = DnsServer(['sender.test. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"'], ["sender.test"],
                            root / f"dns{attempt}", host=candidate, port=53)
        try:
            spf_dns.start()
            break
        except RuntimeError:
            spf_dns = None
    require(spf_dns is not None, "no 127.x address with port 53 free for chasquid's DNS")
    assert spf_dns is not None
    ports = (free_port(), free_port(), free_port())
    server = Chasquid(binary, "127.0.0.1", "dest.test", CHASQUID_USERS, root / "mx", spf_dns.host, trustme.CA(),
                      ports=ports)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        spf_dns.stop()


def delivered_to_chasquid(chasquid: Chasquid, report: Report, user: str) -> bytes:
    assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], (report, chasquid.log_text()[-3000:])
    [stored] = chasquid.wait_for_mail(user)
    return stored


def crlf(stored: bytes) -> bytes:
    """The message with CRLF line ends, whichever chasquid's delivery agent got."""
    return stored if b"\r\n" in stored else stored.replace(b"\n", b"\r\n")


def test_chasquid_takes_8bit_mail_declared_over_starttls(signing: Signing, chasquid: Chasquid) -> None:
    report = deliver(signing, chasquid.port, EIGHT_BIT, recipient="eight@dest.test", eight_bit=True)
    stored = crlf(delivered_to_chasquid(chasquid, report, "eight"))
    log = chasquid.log_text()
    assert "jump to TLS was successful" in log, log[-3000:]
    mail_lines = re.findall(r"-> MAIL FROM:<app@sender\.test>(.*)", log)
    assert any("BODY=8BITMIME" in m and "SMTPUTF8" not in m for m in mail_lines), mail_lines
    assert stored.startswith(b"Received-SPF: pass"), "chasquid's SPF check asked the tests' DNS and passed"
    assert stored.endswith(EIGHT_BIT), "8BITMIME offered: the body arrives as it was, with headers added on top"
    assert "rsa-sha256 pass sender.test k1" in verified(signing, stored)


def test_chasquid_takes_smtputf8_mail_to_an_internationalised_address(signing: Signing,
                                                                     chasquid: Chasquid) -> None:
    report = deliver(signing, chasquid.port, EIGHT_BIT, recipient="jürgen@dest.test", eight_bit=True,
                     smtputf8=True)
    stored = crlf(delivered_to_chasquid(chasquid, report, "jürgen"))
    log = chasquid.log_text()
    mail_lines = re.findall(r"-> MAIL FROM:<app@sender\.test>(.*)", log)
    assert any("SMTPUTF8" in m and "BODY=8BITMIME" in m for m in mail_lines), mail_lines
    assert "-> RCPT TO:<jürgen@dest.test>" in log
    assert stored.endswith(EIGHT_BIT)
    assert decoded_parts(stored) == decoded_parts(EIGHT_BIT)
    assert "rsa-sha256 pass sender.test k1" in verified(signing, stored)


def test_chasquid_gets_a_long_line_reencoded(signing: Signing, chasquid: Chasquid) -> None:
    report = deliver(signing, chasquid.port, LONG_LINE, recipient="long@dest.test")
    stored = crlf(delivered_to_chasquid(chasquid, report, "long"))
    assert max(len(line) for line in stored.split(b"\r\n")) <= 998
    assert decoded_parts(stored)[0].decode("ascii").rstrip("\r\n") == HTML_LINE
    assert "rsa-sha256 pass sender.test k1" in verified(signing, stored)


def test_a_receiver_without_pipelining_gets_one_command_at_a_time(signing: Signing) -> None:
    recipients = ["one@dest.test", "two@dest.test", "gone@dest.test", "three@dest.test"]
    with Recorder(refuse={"gone@dest.test": "550 5.1.1 no such user"}) as recorder:
        report = deliver(signing, recorder.port, LONG_LINE, recipients=recipients)
        received = only(recorder)
    kinds = {address: outcome.kind for address, outcome in report.outcomes.items()}
    assert kinds == {"one@dest.test": Kind.DELIVERED, "two@dest.test": Kind.DELIVERED,
                     "gone@dest.test": Kind.PERMANENT, "three@dest.test": Kind.DELIVERED}, report
    refused = report.outcomes["gone@dest.test"]
    assert refused.answered and (refused.reply.code, refused.enhanced) == (550, "5.1.1"), refused
    assert received.rcpt_tos == ["one@dest.test", "two@dest.test", "three@dest.test"]
    commands = [(c.verb, c.address) for c in recorder.commands]
    assert commands == [("MAIL", "app@sender.test"), *[("RCPT", address) for address in recipients]]
    assert not any(c.pipelined for c in recorder.commands), "the receiver offered no PIPELINING"
    assert "rsa-sha256 pass sender.test k1" in verified(signing, received.data)


def test_the_recorder_sees_pipelined_commands() -> None:
    # The check above could fail: a client that pipelines is seen doing so.
    with Recorder() as recorder, socket.create_connection((recorder.host, recorder.port), timeout=10) as client:
        reader = client.makefile("rb")
        reader.readline()
        client.sendall(b"EHLO pipelining.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        client.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\n")
        replies = [reader.readline() for _ in range(3)]
        client.sendall(b"QUIT\r\n")
        reader.readline()
    assert all(reply.startswith(b"250") for reply in replies), replies
    assert [c.pipelined for c in recorder.commands] == [True, True, False]


def test_a_refusal_without_an_enhanced_code_still_gets_a_truthful_dsn(tmp_path: Path) -> None:
    # aiosmtpd offers no ENHANCEDSTATUSCODES; this refusal carries none either, as such receivers send.
    with Recorder(refuse={"gone@dest.test": "550 No such user here"}) as recorder:
        config = {"routes": [{"domains": ["*"], "relay": f"{HOST}:{recorder.port}", "tls": "none"}],
                  "queue": {"retry_initial": "1h", "retry_max": "2h"}}
        server = MtaServer(tmp_path / "mta", config)
        server.start()
        try:
            send_mail(server.port, "app@sender.test", ["gone@dest.test", "here@dest.test"])
            [bounced] = wait_for_event(server, "bounced", recipient="gone@dest.test", timeout=30)
            deadline = time.monotonic() + 30
            while not any(m.mail_from in ("", "<>") for m in recorder.messages):
                assert time.monotonic() < deadline, "no DSN arrived"
                time.sleep(0.1)
        finally:
            server.stop()
    [dsn] = [m for m in recorder.messages if m.mail_from in ("", "<>")]
    assert dsn.rcpt_tos == ["app@sender.test"]
    assert [m.rcpt_tos for m in recorder.messages if m.mail_from not in ("", "<>")] == [["here@dest.test"]]
    assert bounced["code"] == 550 and bounced["enhanced"] == "5.0.0", bounced
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    [block] = report.get_payload()[1].get_payload()[1:]
    assert str(block["Final-Recipient"]).replace(" ", "") == "rfc822;gone@dest.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.0.0", "no enhanced code came: the status is the reply's class, no more"
    assert " ".join(str(block["Diagnostic-Code"]).split()) == "smtp; 550 No such user here"
