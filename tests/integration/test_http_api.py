"""The HTTP send API of a real ``mta serve``, from real HTTP clients (aiohttp, curl, a raw socket).

Mail goes through the API into the queue and out to a recording receiver
(``tests.peers.recorder``: the DATA octets as they came), so attachments are
checked byte for byte; refusals are checked by status, stable code and
SMTP-equivalent status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import os
import re
import select
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.conftest import World
from tests.harness import HOST, MtaServer
from tests.peers.net import free_port, wait_port
from tests.peers.recorder import Recorder

BLOB = bytes(range(256)) * 40 + b"\r\n.\r\n\x00\r" + os.urandom(3000)  # every byte value, a lone dot line, bare CR
README = Path(__file__).resolve().parents[2] / "README.md"


def api_mta(world: World, recorder: Recorder, extra: dict[str, Any] | None = None,
            accounts: tuple[str, ...] = ("billing",),
            tls: dict[str, str] | None = None, name: str = "mta") -> tuple[MtaServer, dict[str, str]]:
    """A real ``mta serve`` with the API on, relaying everything to ``recorder``; the keys by account."""
    api_port = free_port(HOST)
    config = {
        "http_api": {"address": f"{HOST}:{api_port}", "keys_file": "{keys}", **({"tls": tls} if tls else {})},
        "routes": [{"domains": ["*"], "relay": f"{HOST}:{recorder.port}", "tls": "none"}],
        "accounts": {"users": {"billing": {"senders": ["@billing.test"], "from_addresses": ["@billing.test"]}}},
        **(extra or {}),
    }
    server = world.mta(config, name=name, start=False)
    keys_file = server.workdir / "api-keys"
    keys_file.touch(mode=0o600)
    server.config["http_api"]["keys_file"] = str(keys_file)
    server.config_path.write_text(json.dumps(server.config))  # JSON is YAML
    keys = {}
    for name in accounts:
        done = server.cli("api-key", "add", name)
        assert done.returncode == 0, done.stderr
        keys[name] = done.stdout.strip()
        assert keys[name].startswith(f"{name}.")
    assert "$scrypt$" in keys_file.read_text() and keys["billing"].split(".")[1] not in keys_file.read_text()
    server.start()
    wait_port(HOST, api_port, timeout=10)
    server.api_url = f"{'https' if tls else 'http'}://{HOST}:{api_port}"  # type: ignore[attr-defined]
    return server, keys


def url(server: MtaServer) -> str:
    return str(server.api_url)  # type: ignore[attr-defined]


async def post(base: str, path: str, key: str | None, *, body: Any = None, data: bytes | None = None,
               headers: dict[str, str] | None = None, params: Any = None) -> tuple[int, dict[str, Any]]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.post(base + path, json=body if data is None else None, data=data, headers=sent,
                         params=params) as response:
        return response.status, await response.json()


def message_json(**extra: Any) -> dict[str, Any]:
    return {"from": "Billing <invoices@billing.test>", "to": ["alice@dest.test"], "cc": "carol@dest.test",
            "bcc": ["audit@dest.test"], "subject": "Rechnung für März", "text": "Grüße, see attached.\n",
            "html": "<p>Grüße</p>", "headers": {"X-Invoice": "2026-03"},
            "attachments": [{"filename": "invoice.bin", "content_type": "application/octet-stream",
                             "content": base64.b64encode(BLOB).decode()},
                            {"filename": "rows.csv", "content_type": "text/csv",
                             "content": base64.b64encode(b"a,b\r\n1,2\n3,4").decode()}], **extra}


def test_json_and_raw_submissions_arrive_byte_for_byte(world: World) -> None:
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder)
        status, answer = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=message_json()))
        assert status == 202, answer
        raw = (b"From: invoices@billing.test\r\nTo: bob@dest.test\r\nSubject: raw\r\n"
               b"Message-ID: <raw-1@billing.test>\r\n\r\nline one\r\n\xc3\xa4 eight bit\r\n")
        status2, answer2 = asyncio.run(post(url(server), "/v1/messages/raw", keys["billing"], data=raw,
                                            params=[("from", "invoices@billing.test"), ("to", "bob@dest.test"),
                                                    ("to", "dave@dest.test")],
                                            headers={"Content-Type": "message/rfc822"}))
        assert status2 == 202, answer2
        assert re.fullmatch(r"[A-Za-z0-9]+", answer["id"]) and answer["id"] != answer2["id"]
        received = recorder.wait_for(2, timeout=30)
    by_sender = {tuple(sorted(m.rcpt_tos)): m for m in received}
    built = by_sender[("alice@dest.test", "audit@dest.test", "carol@dest.test")]
    assert built.mail_from == "invoices@billing.test"
    parsed = email.message_from_bytes(built.data, policy=email.policy.default)
    assert parsed["Bcc"] is None, "bcc is envelope only"
    assert parsed["Subject"] == "Rechnung für März" and parsed["X-Invoice"] == "2026-03"
    assert f"id {answer['id']}" in parsed["Received"] and "HTTP" in parsed["Received"]
    assert "smtp.auth=billing" in parsed["Authentication-Results"]
    attachments = {part.get_filename(): part.get_payload(decode=True) for part in parsed.iter_attachments()}
    assert attachments == {"invoice.bin": BLOB, "rows.csv": b"a,b\r\n1,2\n3,4"}
    assert parsed.get_body(("plain",)).get_content() == "Grüße, see attached.\r\n"  # type: ignore[union-attr]
    raw_copy = by_sender[("bob@dest.test", "dave@dest.test")]
    header, body = raw.split(b"\r\n\r\n", 1)
    assert raw_copy.data.endswith(b"\r\n\r\n" + body), "the raw message's body goes as sent"
    assert header in raw_copy.data, "its header too, below the trace fields (and a Date: it lacked)"
    assert "BODY=8BITMIME" in raw_copy.mail_options


def _raw_request(port: int, head: bytes, timeout: float = 10.0) -> bytes:
    """Send ``head`` (a request without its body) and read the answer; the body is never sent."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(head)
        chunks = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in chunks or not chunks.rstrip().endswith(b"}"):
            if time.monotonic() > deadline:
                break
            piece = conn.recv(65536)
            if not piece:
                break
            chunks += piece
        return chunks


def test_refusals_are_json_with_a_code_and_an_smtp_status(world: World) -> None:
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder, {"limits": {"max_message_size": 100000}})
        base, key = url(server), keys["billing"]

        async def run() -> dict[str, tuple[int, dict[str, Any]]]:
            return {
                "bad_json": await post(base, "/v1/messages", key, data=b"{not json",
                                       headers={"Content-Type": "application/json"}),
                "no_from": await post(base, "/v1/messages", key, body={"to": ["a@dest.test"], "text": "x"}),
                "bad_key": await post(base, "/v1/messages", key[:-2] + "xx", body=message_json()),
                "unknown_account": await post(base, "/v1/messages", "nobody." + key.split(".")[1],
                                              body=message_json()),
                "no_key": await post(base, "/v1/messages", None, body=message_json()),
                "sender": await post(base, "/v1/messages", key, body=message_json(**{"from": "ceo@other.test"})),
                "bad_rcpt": await post(base, "/v1/messages", key, body=message_json(to=["not an address"])),
                "too_big": await post(base, "/v1/messages", key, body=message_json(
                    attachments=[{"filename": "x", "content": base64.b64encode(b"x" * 90000).decode()}])),
                "raw_no_to": await post(base, "/v1/messages/raw", key, data=b"Subject: x\r\n\r\nx\r\n",
                                        params={"from": "a@billing.test"}),
            }

        results = asyncio.run(run())
        expected = {"bad_json": (400, "invalid_json", "5.5.2"), "no_from": (400, "missing_field", "5.5.2"),
                    "bad_key": (401, "unauthenticated", "5.7.8"), "unknown_account": (401, "unauthenticated", "5.7.8"),
                    "no_key": (401, "unauthenticated", "5.7.8"), "sender": (403, "sender_not_allowed", "5.7.1"),
                    "bad_rcpt": (400, "invalid_address", "5.1.3"), "too_big": (413, "message_too_large", "5.3.4"),
                    "raw_no_to": (400, "missing_field", "5.5.2")}
        got = {name: (status, body["error"]["code"], body["error"]["status"]) for name, (status, body) in
               results.items()}
        assert got == expected
        assert all(body["error"]["message"] for _, body in results.values())

        # Over the limit by Content-Length: answered at once, while the body has not been sent at all.
        port = int(base.rsplit(":", 1)[1])
        started = time.monotonic()
        answer = _raw_request(port, (f"POST /v1/messages/raw?from=a@billing.test&to=b@dest.test HTTP/1.1\r\n"
                                     f"Host: {HOST}\r\nAuthorization: Bearer {key}\r\n"
                                     f"Content-Length: {50 * 1024 * 1024}\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b'"request_too_large"' in answer and time.monotonic() - started < 5
        # Chunked, with no length to check first: cut off at the limit, not read to the end.
        with socket.create_connection((HOST, port), timeout=10) as conn:
            conn.sendall((f"POST /v1/messages/raw?from=a@billing.test&to=b@dest.test HTTP/1.1\r\nHost: {HOST}\r\n"
                          f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
            chunk = b"x" * 65536
            sent, answer = 0, b""
            while sent < 50 * 1024 * 1024 and not answer:
                try:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except (TimeoutError, BrokenPipeError, ConnectionResetError):
                    break  # the server stopped reading
                sent += len(chunk)
                if select.select([conn], [], [], 0)[0]:
                    answer = conn.recv(65536)
            with contextlib.suppress(OSError):
                answer += conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # The limit is about 200 kB; what the loopback socket buffers hold (a few MB) is on top.
        assert sent < 16 * 1024 * 1024, f"{sent} of 50 MiB were taken before the refusal"
        time.sleep(0.5)
        assert recorder.messages == [], "nothing refused was queued"
        assert server.queue_list() == []


def test_parallel_posts_each_queue_once_and_the_rate_is_the_accounts(world: World) -> None:
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder, {"accounts": {"users": {
            "billing": {"senders": ["@billing.test"], "messages_per_minute": 12}}}}, accounts=("billing", "ops"))

        async def run() -> list[tuple[int, dict[str, Any]]]:
            bodies = [{"from": "a@billing.test", "to": [f"r{n}@dest.test"], "text": f"n={n}"} for n in range(10)]
            # Ten at once from one account, and ten from another with the default policy (no rate).
            first = [post(url(server), "/v1/messages", keys["billing"], body=b) for b in bodies]
            other = [post(url(server), "/v1/messages", keys["ops"], body={**b, "from": "x@ops.test"})
                     for b in bodies]
            return list(await asyncio.gather(*first, *other))

        results = asyncio.run(run())
        assert [status for status, _ in results] == [202] * 20, results
        ids = {body["id"] for _, body in results}
        assert len(ids) == 20
        received = recorder.wait_for(20, timeout=60)
        time.sleep(0.5)
        assert len(recorder.messages) == 20
        assert sorted(m.rcpt_tos[0] for m in received) == sorted([f"r{n}@dest.test" for n in range(10)] * 2)
        # 10 of billing's 12 a minute are used: SMTP AUTH of the same name would share them; the API sees 2 more.
        async def three() -> list[tuple[int, dict[str, Any]]]:
            return list(await asyncio.gather(*[post(url(server), "/v1/messages", keys["billing"],
                                                    body={"from": "a@billing.test", "to": ["z@dest.test"],
                                                          "text": "x"}) for _ in range(3)]))

        rated = asyncio.run(three())
        assert sorted(status for status, _ in rated) == [202, 202, 429], rated
        refused = next(body for status, body in rated if status == 429)
        assert refused["error"]["code"] == "rate_limited" and refused["error"]["status"] == "4.7.1"


def test_idempotency_key_survives_kill_9(world: World) -> None:
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder)
        body = {"from": "a@billing.test", "to": ["once@dest.test"], "text": "only once"}
        headers = {"Idempotency-Key": "order-4711"}
        status, first = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=body, headers=headers))
        assert status == 202, first
        recorder.wait_for(1, timeout=30)
        server.wait_queue_empty()  # delivered and done: a redelivery after kill -9 is not what is tested
        server.kill9()
        server.start()
        wait_port(HOST, int(url(server).rsplit(":", 1)[1]), timeout=10)
        status, again = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=body, headers=headers))
        assert (status, again) == (202, first)
        status, other = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=body,
                                         headers={"Idempotency-Key": "order-4712"}))
        assert status == 202 and other["id"] != first["id"]
        recorder.wait_for(2, timeout=30)
        time.sleep(1.0)
        assert [m.rcpt_tos for m in recorder.messages] == [["once@dest.test"], ["once@dest.test"]]


def test_status_of_a_deferred_message_per_recipient(world: World) -> None:
    with Recorder(refuse={"later@dest.test": "451 4.2.0 try again later"}) as recorder:
        server, keys = api_mta(world, recorder, accounts=("billing", "ops"))
        body = {"from": "a@billing.test", "to": ["now@dest.test", "later@dest.test"], "text": "x"}
        status, answer = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=body))
        assert status == 202
        recorder.wait_for(1, timeout=30)

        async def state(key: str) -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"{url(server)}/v1/messages/{answer['id']}",
                                headers={"Authorization": f"Bearer {key}"}) as response:
                return response.status, await response.json()

        deadline = time.monotonic() + 30
        while True:
            status, record = asyncio.run(state(keys["billing"]))
            states = {r["address"]: r["state"] for r in record.get("recipients", [])}
            if (states.get("now@dest.test") == "delivered" and record.get("state") == "deferred") \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200 and states == {"now@dest.test": "delivered", "later@dest.test": "pending"}, record
        assert record["state"] == "deferred"
        assert "4.2.0" in next(r for r in record["recipients"] if r["address"] == "later@dest.test")["last_reply"]
        status, other = asyncio.run(state(keys["ops"]))
        assert status == 404 and other["error"]["code"] == "not_found", "another account's mail is not visible"


def test_readme_curl_examples_work_as_written(world: World) -> None:
    text = README.read_text()
    section = text.split("<!-- http-api-examples -->")[1].split("<!-- /http-api-examples -->")[0]
    commands = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(commands) >= 3, "the README's HTTP API section has its curl examples"
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder)
        workdir = server.workdir / "curl"
        workdir.mkdir()
        (workdir / "report.pdf").write_bytes(BLOB)
        (workdir / "message.eml").write_bytes(b"From: app@billing.test\r\nTo: bob@dest.test\r\nSubject: eml\r\n\r\n"
                                              b"hello\r\n")
        env = {**os.environ, "MTA_API": url(server), "MTA_API_KEY": keys["billing"]}
        outputs = []
        for command in commands:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append(done.stdout)
        queued = [json.loads(line)["id"] for out in outputs for line in out.splitlines() if '"id"' in line]
        assert len(queued) >= 2, outputs
        received = recorder.wait_for(len(queued), timeout=30)
    pdfs = [part.get_payload(decode=True) for m in received
            for part in email.message_from_bytes(m.data, policy=email.policy.default).iter_attachments()]
    assert BLOB in pdfs, "the curl example's attachment arrives byte for byte"
    assert any(m.data.endswith(b"\r\nhello\r\n") for m in received)


def test_the_api_over_tls_with_curl(world: World) -> None:
    ca = trustme.CA()
    directory = world.root / "api-tls"
    directory.mkdir()
    cert = ca.issue_cert(HOST)
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    (directory / "tls.key").chmod(0o600)
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder, tls={"cert_file": str(directory / "tls.crt"),
                                                     "key_file": str(directory / "tls.key")})
        assert url(server).startswith("https://")
        body = json.dumps({"from": "a@billing.test", "to": "tls@dest.test", "text": "over TLS"})
        done = subprocess.run(["curl", "-sS", "--fail-with-body", "--cacert", str(directory / "ca.crt"),
                               f"{url(server)}/v1/messages", "-H", f"Authorization: Bearer {keys['billing']}",
                               "-H", "Content-Type: application/json", "-d", body],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (done.stdout, done.stderr)
        queue_id = json.loads(done.stdout)["id"]
        plain = subprocess.run(["curl", "-sS", f"http://{url(server).split('://')[1]}/v1/openapi.json"],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0 or "openapi" not in plain.stdout, "no plain HTTP on a TLS listener"
        [received] = recorder.wait_for(1, timeout=30)
    assert f"with HTTPS id {queue_id}".encode() in received.data


def test_suppressed_recipients_are_refused_or_held_as_at_smtp_rcpt(world: World) -> None:
    with Recorder() as recorder:
        server, keys = api_mta(world, recorder)
        base, key = url(server), keys["billing"]
        assert server.cli("suppress", "add", "gone@dest.test", "--reason", "complaint").returncode == 0
        json_body = {"from": "a@billing.test", "to": ["ok@dest.test", "Gone@dest.test"], "text": "x"}

        async def run() -> list[tuple[int, dict[str, Any]]]:
            # In parallel, so the refusal does not depend on the order of requests.
            return list(await asyncio.gather(
                *[post(base, "/v1/messages", key, body=json_body) for _ in range(4)],
                post(base, "/v1/messages/raw", key, data=b"Subject: x\r\n\r\nx\r\n",
                     params={"from": "a@billing.test", "to": "gone@dest.test"})))

        for status, body in asyncio.run(run()):
            assert (status, body["error"]["code"], body["error"]["status"]) == (422, "recipient_suppressed", "5.1.1")
            assert body["error"]["message"].lower().startswith("gone@dest.test: ") and "suppress" in \
                body["error"]["message"].lower(), body
        status, _ = asyncio.run(post(base, "/v1/messages", key, body={**json_body, "to": ["ok@dest.test"]}))
        assert status == 202
        [only] = recorder.wait_for(1, timeout=30)
        assert only.rcpt_tos == ["ok@dest.test"], "nothing of the refused requests was queued"
        server.wait_queue_empty(timeout=30)
        time.sleep(0.5)
        assert len(recorder.messages) == 1
        server.stop()

    with Recorder() as recorder:
        server, keys = api_mta(world, recorder, {"suppression": {"action": "hold"}}, name="hold")
        assert server.cli("suppress", "add", "gone@dest.test").returncode == 0
        status, answer = asyncio.run(post(url(server), "/v1/messages", keys["billing"], body=json_body))
        assert status == 202
        [item] = server.wait_for_queue(lambda items: len(items) == 1, what="the held message")
        assert item["id"] == answer["id"] and item["state"] == "hold", item
        assert recorder.messages == []
        server.stop()
