"""The DSN extension (RFC 3461) end to end: what clients ask, what receivers see, what senders get back.

Real clients (smtplib) send NOTIFY, ORCPT, RET and ENVID to a real ``mta
serve``; Postfix's smtp-sink receives, offering DSN or not (``-N``), taking
the message, refusing it (``-f RCPT``) or answering 450 (``-r RCPT``); the
notices that come back land in the sender domain's smtp-sink and are read
with the standard library's ``email`` package, as a mail client would.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import smtplib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import World
from tests.harness import HOST, MtaServer
from tests.obs.logs import events, wait_for_event
from tests.peers.sink import SinkMessage

ENVID = "Q+2B1/app-42"  # xtext: "Q+1/app-42"
ORCPT = "rfc822;Original+2BTag@Example.test"  # xtext: "Original+Tag@Example.test"


def submit(server: MtaServer, recipients: dict[str, list[str]], mail_options: Sequence[str] = (),
           body: str = "the body text\r\n", subject: str = "dsn test") -> str:
    """One message; ``recipients`` maps each address to its RCPT parameters."""
    header = f"From: app@sender.test\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        code, text = client.mail("app@sender.test", list(mail_options))
        assert code == 250, text
        for rcpt, options in recipients.items():
            code, text = client.rcpt(rcpt, options)
            assert code == 250, text
        code, text = client.data((header + "\r\n" + body).encode())
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def notice(message: SinkMessage) -> tuple[email.message.EmailMessage, list[email.message.Message],
                                           email.message.Message]:
    """The report, its per-recipient status blocks (after the per-message one) and the returned part."""
    report = email.message_from_bytes(message.data, policy=email.policy.default)
    assert isinstance(report, email.message.EmailMessage)
    assert report.get_content_type() == "multipart/report", message.data
    _, status, returned = report.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    return report, status.get_payload(), returned


def test_ehlo_offers_dsn_and_bad_values_get_501_with_a_reason(world: World) -> None:
    server = world.mta()
    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        assert client.has_extn("dsn")
    bad_mail = {"RET=BODY": "RET", "ENVID=a+zz": "ENVID", "ENVID=" + "x" * 101: "ENVID",
                "RET=HDRS RET=FULL": "RET", "ENVID": "ENVID"}
    bad_rcpt = {"NOTIFY=NEVER,SUCCESS": "NOTIFY", "NOTIFY=SOMETIMES": "NOTIFY", "NOTIFY": "NOTIFY",
                "ORCPT=user@dest.test": "ORCPT", "ORCPT=rfc822;a+1": "ORCPT", "ORCPT=rfc822;": "ORCPT"}

    def attempt(command: str, options: str) -> tuple[int, str]:
        # Each case on a connection of its own, all at once.
        with smtplib.SMTP(HOST, server.port, timeout=20) as client:
            client.ehlo("app.kubemta.test")
            if command == "MAIL":
                code, text = client.docmd(f"MAIL FROM:<app@sender.test> {options}")
            else:
                assert client.mail("app@sender.test")[0] == 250
                code, text = client.docmd(f"RCPT TO:<user@dest.test> {options}")
            return code, text.decode()

    cases = [("MAIL", o, name) for o, name in bad_mail.items()] + [("RCPT", o, name) for o, name in bad_rcpt.items()]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: attempt(case[0], case[1]), cases))
    for (command, options, name), (code, text) in zip(cases, answers, strict=True):
        assert code == 501 and text.startswith("5.5.4 ") and name in text, (command, options, code, text)
    # A client that greeted with HELO has no extensions: the parameter is a syntax error.
    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.helo("app.kubemta.test")
        code, text = client.docmd("MAIL FROM:<app@sender.test> RET=HDRS")
        assert code == 501, text
    # Good values in any case of the keyword are taken.
    with smtplib.SMTP(HOST, server.port, timeout=20) as client:
        client.ehlo("app.kubemta.test")
        assert client.docmd(f"MAIL FROM:<app@sender.test> ret=hdrs envid={ENVID}")[0] == 250
        assert client.docmd(f"RCPT TO:<user@dest.test> notify=success,delay orcpt={ORCPT}")[0] == 250


def test_a_receiver_that_offers_dsn_gets_the_request_and_notifies_in_our_place(world: World) -> None:
    dest, sender = world.sink("dest"), world.sink("sender")
    server = world.mta()
    queue_id = submit(server, {"user@dest.test": ["NOTIFY=SUCCESS,FAILURE", f"ORCPT={ORCPT}"],
                               "other@dest.test": []}, ["RET=HDRS", f"ENVID={ENVID}"])
    [received] = dest.wait_for_messages(1, timeout=20)
    # On the wire as the client wrote it: xtext again, case kept, per recipient.
    assert "RET=HDRS" in received.mail_args.split() and f"ENVID={ENVID}" in received.mail_args.split()
    rcpt = {args.split()[0]: args.split()[1:] for args in received.rcpt_args}
    assert sorted(rcpt["<user@dest.test>"]) == sorted(["NOTIFY=SUCCESS,FAILURE", f"ORCPT={ORCPT}"])
    assert not any(o.startswith(("NOTIFY=", "ORCPT=")) for o in rcpt["<other@dest.test>"]), rcpt
    server.wait_queue_empty()
    assert len(events(server, "delivered", queue_id=queue_id)) == 2
    time.sleep(1)
    # The receiver took over the success notice (RFC 3461 §5.2.1): none from us.
    assert sender.messages() == [] and events(server, "queued") == []


def test_a_receiver_without_dsn_sees_none_and_the_sender_gets_a_relayed_notice(world: World) -> None:
    dest, sender = world.sink("dest", ["-N"]), world.sink("sender")
    server = world.mta()
    submit(server, {"user@dest.test": ["NOTIFY=SUCCESS", f"ORCPT={ORCPT}"], "quiet@dest.test": []},
           ["RET=FULL", f"ENVID={ENVID}"], body="the secret body\r\n")
    [received] = dest.wait_for_messages(1, timeout=20)
    assert not any(word.split("=")[0] in ("RET", "ENVID") for word in received.mail_args.split())
    assert not any("NOTIFY=" in args or "ORCPT=" in args for args in received.rcpt_args), received.rcpt_args
    [message] = sender.wait_for_messages(1, timeout=20)
    assert message.sender == "" and message.recipients == ["app@sender.test"]
    report, blocks, returned = notice(message)
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert blocks[0]["Original-Envelope-Id"] == "Q+1/app-42"
    [block] = blocks[1:]  # the recipient without NOTIFY=SUCCESS is not reported
    assert block["Original-Recipient"] == "rfc822; Original+Tag@Example.test"
    assert block["Final-Recipient"] == "rfc822; user@dest.test"
    assert block["Action"] == "relayed" and block["Status"].startswith("2.")
    assert block["Remote-MTA"] == "dns; mx.dest.test"
    # A success notice returns the header only, whatever RET asked (RFC 3461 §6.2).
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: dsn test" in returned.get_payload() and "secret body" not in returned.get_payload()
    server.wait_queue_empty()
    time.sleep(1)
    assert len(sender.messages()) == 1


def test_notify_never_to_a_refusing_receiver_sends_no_bounce(world: World) -> None:
    world.sink("reject", ["-f", "RCPT"])
    sender = world.sink("sender")
    server = world.mta()
    queue_id = submit(server, {"never@reject.test": ["NOTIFY=NEVER"]})
    server.wait_queue_empty()
    [bounced] = events(server, "bounced", queue_id=queue_id)
    assert bounced["recipient"] == "never@reject.test" and bounced["code"] == 500
    [suppressed] = events(server, "bounce_suppressed", queue_id=queue_id)
    assert suppressed["reason"] == "NOTIFY" and suppressed["recipients"] == 1
    time.sleep(1)
    assert sender.messages() == [] and events(server, "queued") == []
    # In one message with a recipient that asked nothing, only that one is reported.
    submit(server, {"never@reject.test": ["NOTIFY=NEVER"], "default@reject.test": [],
                    "success@reject.test": ["NOTIFY=SUCCESS"]})
    [message] = sender.wait_for_messages(1, timeout=20)
    report, blocks, _ = notice(message)
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; default@reject.test"]
    assert blocks[1]["Action"] == "failed" and "Original-Envelope-Id" not in blocks[0]
    server.wait_queue_empty()
    time.sleep(1)
    assert len(sender.messages()) == 1


def test_ret_hdrs_returns_the_header_only_and_ret_full_the_whole_message(world: World) -> None:
    world.sink("reject", ["-f", "RCPT"])
    sender = world.sink("sender")
    server = world.mta()
    submit(server, {"a@reject.test": [f"ORCPT={ORCPT}"]}, ["RET=HDRS", "ENVID=hdrs"], body="body of hdrs\r\n",
           subject="hdrs")
    submit(server, {"b@reject.test": []}, ["RET=FULL", "ENVID=full"], body="body of full\r\n", subject="full")
    messages = sender.wait_for_messages(2, timeout=20)
    by_envid = {}
    for message in messages:
        _, blocks, returned = notice(message)
        by_envid[blocks[0]["Original-Envelope-Id"]] = (blocks, returned)
    blocks, returned = by_envid["hdrs"]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: hdrs" in returned.get_payload() and "body of hdrs" not in returned.get_payload()
    assert blocks[1]["Original-Recipient"] == "rfc822; Original+Tag@Example.test"
    _, returned = by_envid["full"]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Subject"] == "full" and "body of full" in inner.get_content()


def test_notify_delay_gets_one_delay_notice_after_the_configured_wait(world: World) -> None:
    flaky = world.sink("flaky", ["-r", "RCPT"])  # 450 to every RCPT
    sender = world.sink("sender")
    server = world.mta({"queue": {"delay_warning": "2s", "retry_initial": "1s", "retry_max": "1s",
                                  "retry_jitter": 0}})
    queue_id = submit(server, {"wait@flaky.test": ["NOTIFY=DELAY,FAILURE"], "plain@flaky.test": []},
                      [f"ENVID={ENVID}"])
    [message] = sender.wait_for_messages(1, timeout=30)
    report, blocks, returned = notice(message)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert blocks[0]["Original-Envelope-Id"] == "Q+1/app-42"
    [block] = blocks[1:]  # the recipient without NOTIFY=DELAY gets no delay notice
    assert block["Final-Recipient"] == "rfc822; wait@flaky.test"
    assert block["Action"] == "delayed" and block["Status"] == "4.3.0"
    assert "450" in block["Diagnostic-Code"] and block["Will-Retry-Until"]
    assert returned.get_content_type() == "text/rfc822-headers"
    # The first attempt after the notice is counted from the log; more attempts, still one notice.
    [queued] = events(server, "queued")
    assert queued["action"] == "delayed"
    seen = len(events(server, "attempt", queue_id=queue_id))
    wait_for_event(server, "attempt", timeout=30, count=seen + 3, queue_id=queue_id)
    assert len(sender.messages()) == 1
    [item] = server.queue_list()
    assert item["id"] == queue_id and item["state"] == "deferred"
    flaky.restart([])
    assert len(flaky.wait_for_messages(1, timeout=30)[0].recipients) == 2
    server.wait_queue_empty()
    time.sleep(1)
    assert len(sender.messages()) == 1
