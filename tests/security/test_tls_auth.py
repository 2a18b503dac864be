"""STARTTLS, implicit TLS, AUTH and its throttling, with real clients (smtplib, swaks)."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import warnings

import pytest
import trustme

from tests.conftest import World
from tests.obs.logs import events
from tests.obs.scrape import scrape
from tests.security.conftest import PASSWORD, Secure, make_secure, write_cert


def test_swaks_auth_over_starttls_is_delivered_with_authentication_results(secure: Secure) -> None:
    sink = secure.world.sink("dest")
    done = subprocess.run(["swaks", "--server", f"127.0.0.1:{secure.submission}", "--tls", "--auth", "PLAIN",
                           "--auth-user", "app", "--auth-password", PASSWORD, "--from", "app@sender.test",
                           "--to", "user@dest.test", "--helo", "app.kubemta.test"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0 Authentication successful" in done.stdout
    [message] = sink.wait_for_messages(1, timeout=20)
    assert b"Authentication-Results: mta.kubemta.test; auth=pass smtp.auth=app" in message.data
    assert b"with ESMTPSA id" in message.data
    assert PASSWORD not in secure.server.log()


def test_swaks_auth_login_over_implicit_tls(secure: Secure) -> None:
    sink = secure.world.sink("dest")
    done = subprocess.run(["swaks", "--server", f"127.0.0.1:{secure.submissions}", "--tls-on-connect",
                           "--auth", "LOGIN", "--auth-user", "app", "--auth-password", PASSWORD,
                           "--from", "app@sender.test", "--to", "user@dest.test"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sink.wait_for_messages(1, timeout=20)[0].recipients == ["user@dest.test"]


def test_auth_is_offered_only_after_starttls(secure_front: Secure) -> None:
    secure = secure_front
    with secure.client(secure.submission) as client:
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, text = client.docmd("AUTH PLAIN AGFwcABjb3JyZWN0")
        assert (code, text[:6]) == (538, b"5.7.11")
        client.starttls(context=secure.client_context())
        client.ehlo("app.kubemta.test")
        assert client.has_extn("auth") and "PLAIN" in client.esmtp_features["auth"]
        assert not client.has_extn("starttls")
        client.login("app", PASSWORD)


def test_plaintext_auth_only_where_configured_and_warned(secure: Secure) -> None:
    with secure.client(secure.legacy) as client:
        assert client.has_extn("auth")
        client.login("app", PASSWORD)
    assert "allows AUTH without TLS" in secure.server.log()
    with secure.client(secure.relay) as client:
        assert not client.has_extn("auth")


def test_tls_below_1_2_is_refused(secure_front: Secure) -> None:
    secure = secure_front
    context = secure.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    with secure.client(secure.submission) as client, pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected,
                                                                   ConnectionError)):
        client.starttls(context=context)
    with socket.create_connection(("127.0.0.1", secure.submissions), timeout=10) as raw:
        modern = secure.client_context()
        with modern.wrap_socket(raw, server_hostname="mta.kubemta.test") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_unauthenticated_submission_cannot_relay(secure_front: Secure) -> None:
    secure = secure_front
    with secure.client(secure.submission, tls=True) as client:
        client.mail("app@sender.test")
        code, text = client.rcpt("user@dest.test")
        assert (code, text) == (554, b"5.7.1 Relay access denied")


def test_wrong_password_is_refused_then_the_client_is_locked_out(world: World) -> None:
    secure = make_secure(world, {"limits": {"max_auth_failures": 3}})
    for _ in range(3):
        with secure.client(secure.submission, tls=True) as client:
            code, text = client.docmd("AUTH PLAIN " + _plain("app", "wrong password"))
            assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
    with secure.client(secure.submission, tls=True) as client:
        code, text = client.docmd("AUTH PLAIN " + _plain("app", PASSWORD))
        assert (code, text[:5]) == (421, b"4.7.0")
    assert len(events(secure.server, "auth_failed")) == 3
    assert events(secure.server, "auth_throttled")
    metrics = scrape(secure.server)
    assert metrics.get("kubemta_auth_failures_total", listener="submission") == 3
    assert metrics.get("kubemta_auth_throttled_total", scope="client") == 1
    assert "wrong password" not in secure.server.log()


def test_a_user_guessed_at_from_many_addresses_is_locked_for_the_guessers(world: World) -> None:
    secure = make_secure(world, {"limits": {"max_auth_failures": 3}})
    for n in range(3):
        with secure.client(secure.submission, tls=True, source=f"127.0.1.{n + 1}") as client:
            assert client.docmd("AUTH PLAIN " + _plain("app", "guess"))[0] == 535
    # Locked for the addresses that guessed, even with the right password ...
    with secure.client(secure.submission, tls=True, source="127.0.1.1") as client:
        code, text = client.docmd("AUTH PLAIN " + _plain("app", PASSWORD))
        assert (code, text[:5]) == (454, b"4.7.0")
    # ... but not for a client that has not failed: guessing must not lock the real user out.
    with secure.client(secure.submission, tls=True, source="127.0.1.9") as client:
        code, _ = client.docmd("AUTH PLAIN " + _plain("app", PASSWORD))
        assert code == 235
    # Another user from a fresh address is not affected.
    assert secure.add_user("other", "another password").returncode == 0
    with secure.client(secure.submission, tls=True, source="127.0.1.10") as client:
        client.login("other", "another password")


def test_users_added_while_running_can_log_in_and_passwd_changes(secure: Secure) -> None:
    assert secure.add_user("late", "late password 1").returncode == 0
    with secure.client(secure.submission, tls=True) as client:
        client.login("late", "late password 1")
    assert secure.add_user("late", "late password 2", action="passwd").returncode == 0
    with secure.client(secure.submission, tls=True) as client:
        client.login("late", "late password 2")
    again = secure.add_user("late", "x" * 10)
    assert again.returncode == 1 and "already exists" in again.stderr
    short = secure.add_user("shorty", "short")
    assert short.returncode == 1 and "at least 8" in short.stderr


def test_plaintext_pipelined_after_starttls_is_not_executed(secure_front: Secure) -> None:
    secure = secure_front
    sock = socket.create_connection(("127.0.0.1", secure.submission), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"EHLO x.kubemta.test\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    # STARTTLS with a command smuggled in behind it, in the same packet.
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
    assert reader.readline().startswith(b"220")
    tls = secure.client_context().wrap_socket(sock, server_hostname="mta.kubemta.test")
    tls.sendall(b"RCPT TO:<user@dest.test>\r\n")
    reply = tls.recv(1024)
    assert reply.startswith(b"503 5.5.1"), reply  # no EHLO, no MAIL: nothing carried over
    tls.close()


def test_certificate_is_reloaded_when_its_files_change(secure: Secure) -> None:
    def served_issuer() -> bytes:
        with socket.create_connection(("127.0.0.1", secure.submissions), timeout=10) as raw:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with context.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return der

    before = served_issuer()
    staging = secure.world.root / "tls-new"
    staging.mkdir()
    cert, key = write_cert(trustme.CA(), staging)
    time.sleep(0.05)
    shutil.copyfile(key, secure.key)
    shutil.copyfile(cert, secure.cert)
    after = served_issuer()
    assert after != before
    assert "TLS certificate" in secure.server.log() and "reloaded" in secure.server.log()


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_user_list_and_delete_take_effect_on_the_running_server(secure: Secure) -> None:
    def user(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["python3", "-P", "-m", "mta.cli", "user", *args, "-c", str(secure.server.config_path),
                               "--listener", "submission"], capture_output=True, text=True, timeout=60,
                              cwd=secure.server.workdir)

    assert secure.add_user("leaving", "leaving password").returncode == 0
    listed = user("list")
    assert listed.returncode == 0 and "leaving" in listed.stdout.split() and "app" in listed.stdout.split()
    with secure.client(secure.submission, tls=True) as client:
        client.login("leaving", "leaving password")
    deleted = user("delete", "leaving")
    assert deleted.returncode == 0, deleted.stderr
    assert "leaving" not in user("list").stdout.split()
    with secure.client(secure.submission, tls=True) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("leaving", "leaving password")
    again = user("delete", "leaving")
    assert again.returncode == 1 and "is not in" in again.stderr


def test_user_unlock_clears_a_lockout_from_parallel_guessers_and_ip_clears_only_that_address(world: World) -> None:
    from concurrent.futures import ThreadPoolExecutor

    secure = make_secure(world, {"limits": {"max_auth_failures": 3}})
    guessers = ["127.0.2.1", "127.0.2.2"]

    def guess(source: str) -> int:
        with secure.client(secure.submission, tls=True, source=source) as client:
            return client.docmd("AUTH PLAIN " + _plain("app", "wrong password"))[0]

    def login(source: str) -> int:
        with secure.client(secure.submission, tls=True, source=source) as client:
            return client.docmd("AUTH PLAIN " + _plain("app", PASSWORD))[0]

    with ThreadPoolExecutor(max_workers=8) as pool:  # four parallel guesses from each address
        codes = list(pool.map(guess, guessers * 4))
    assert set(codes) <= {535, 421, 454} and codes.count(535) >= 3
    assert login("127.0.2.1") != 235 and login("127.0.2.2") != 235

    def unlock(*args: str) -> subprocess.CompletedProcess[str]:
        return secure.server.cli("user", "unlock", "app", *args)

    done = unlock("--ip", "127.0.2.1")
    assert done.returncode == 0 and "127.0.2.1" in done.stdout, done.stdout + done.stderr
    assert login("127.0.2.2") != 235  # only the address named was cleared
    assert login("127.0.2.1") == 235
    done = unlock()
    assert done.returncode == 0 and "127.0.2.2" in done.stdout, done.stdout + done.stderr
    assert login("127.0.2.2") == 235
    assert unlock("--ip", "not-an-address").returncode == 2

    secure.server.terminate()
    stopped = unlock()
    assert stopped.returncode == 0 and "nothing to unlock" in stopped.stdout
