"""Delivery against DNS as it really is: a fault matrix.

A DNS server of the tests' own (tests.peers.faultdns) answers, refuses,
fails, times out, truncates, chains CNAMEs or hands out hundreds of MX
records per name and type; ``MxResolver``, ``Connector.open`` and
``Courier.deliver`` run against it, and real SMTP servers (aiosmtpd) on
127.0.0.x take the mail.  Every accepted message must end delivered,
deferred or bounced, and an attempt must end within its DNS deadline
however the DNS misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import selectors
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller

from mta.delivery.client import ClientSettings, ConnectFailed, Connector
from mta.delivery.courier import Courier, Parcel
from mta.delivery.mx import LookupFailed, MxResolver, make_resolver
from mta.delivery.result import Kind, Outcome
from mta.delivery.route import NextHop
from tests.peers.faultdns import ANY, Fault, FaultDns

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)  # the peers here; direct delivery must be let in

DNS_HOST = "127.0.0.53"
LIVE = ("127.0.0.21", "127.0.0.22")  # real receiving servers
DEAD = "127.0.0.29"  # nothing listens there: connections are refused at once
COUNTED = tuple(f"127.0.1.{i}" for i in range(1, 31))  # accept, count, hang up
MESSAGE = b"Subject: dns faults\r\n\r\nbody\r\n"
T = TypeVar("T")


@dataclass
class Receiver:
    mails: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Ok"


class HangUp:
    """Accepts on every COUNTED address and closes at once, counting the sessions per address."""

    def __init__(self, port: int) -> None:
        self.counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self._selector = selectors.DefaultSelector()
        self._sockets = []
        for address in COUNTED:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(64)
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, address)
            self._sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hangup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                with contextlib.suppress(BlockingIOError):
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    conn.close()
                    self.counts[key.data] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()
        self._selector.close()


def shared_port() -> int:
    """A port free on every address these tests use (the connector has one port for all MX hosts)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((LIVE[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in (*LIVE, DEAD, *COUNTED):
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test address")


@dataclass
class Net:
    dns: FaultDns
    port: int
    receivers: dict[str, Receiver]
    hangup: HangUp


@pytest.fixture
def net() -> Iterator[Net]:
    port = shared_port()
    with contextlib.ExitStack() as stack:
        dns = FaultDns(DNS_HOST)
        stack.callback(dns.stop)
        dns.start()
        receivers = {}
        for address in LIVE:
            receivers[address] = Receiver()
            controller = Controller(receivers[address], hostname=address, port=port)
            stack.callback(controller.stop)
            controller.start()
        hangup = HangUp(port)
        stack.callback(hangup.stop)
        yield Net(dns, port, receivers, hangup)


def connector(net: Net, *, query_timeout: float = 0.5, attempt_timeout: float = 5.0, max_mx_hosts: int = 10,
              max_mx_addresses: int = 20) -> Connector:
    settings = ClientSettings(helo_name="mta.kubemta.test", port=net.port, connect_timeout=2, command_timeout=5,
                              max_mx_hosts=max_mx_hosts, max_mx_addresses=max_mx_addresses,
                              dns_attempt_timeout=attempt_timeout, allowed_networks=LOOPBACK)
    return Connector(settings, MxResolver(make_resolver([net.dns.address], query_timeout)))


def run(coro: Coroutine[Any, Any, T], limit: float) -> T:
    """Run one attempt; on code that does not bound its lookups this fails at ``limit`` instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, limit))


@dataclass
class Attempt:
    outcome: Outcome
    reached: bool
    seconds: float


def deliver(connector: Connector, domain: str, limit: float = 20.0) -> Attempt:
    """One delivery attempt through the courier, as the scheduler makes it."""

    async def content(queue_id: str) -> bytes:
        return MESSAGE

    async def main() -> Attempt:
        courier = Courier(connector.open, content)
        started = time.monotonic()
        try:
            report = await courier.deliver(NextHop("mx", domain),
                                           Parcel("Q00000001", "app@kubemta.test", [f"user@{domain}"],
                                                  len(MESSAGE)), per_connection=10)
            seconds = time.monotonic() - started
        finally:
            await courier.close()
        [outcome] = report.outcomes.values()
        return Attempt(outcome, report.reached, seconds)

    return run(main(), limit)


def open_fails(connector: Connector, domain: str, limit: float = 20.0) -> tuple[Outcome, float]:
    """``Connector.open`` for a domain that must fail: the outcome and how long it took."""

    async def main() -> tuple[Outcome, float]:
        started = time.monotonic()
        try:
            connection = await connector.open(NextHop("mx", domain))
        except ConnectFailed as exc:
            return exc.outcome, time.monotonic() - started
        await connection.close()
        raise AssertionError(f"{domain}: a connection was opened to {connection.remote}")

    return run(main(), limit)


def assert_delivered(net: Net, attempt: Attempt, host: str, address: str, domain: str) -> None:
    assert attempt.outcome.kind is Kind.DELIVERED, attempt.outcome
    assert (attempt.outcome.mx_host, attempt.outcome.mx_ip) == (host, address)
    assert net.receivers[address].mails == [[f"user@{domain}"]]


# -- one family failing ----------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.REFUSED, Fault.SERVFAIL, Fault.TIMEOUT])
def test_a_failing_aaaa_lookup_leaves_the_a_address_in_use(net: Net, fault: Fault) -> None:
    net.dns.add("v4only.test", "MX", "10 mx.v4only.test.")
    net.dns.add("mx.v4only.test", "A", LIVE[0])
    net.dns.fault("mx.v4only.test", "AAAA", fault)
    # A query that times out would give up after 4 s: the A address must not wait for it.
    attempt = deliver(connector(net, query_timeout=2.0), "v4only.test")
    assert_delivered(net, attempt, "mx.v4only.test", LIVE[0], "v4only.test")
    assert attempt.seconds < 2.0, attempt.seconds


@pytest.mark.parametrize("fault", [Fault.REFUSED, Fault.SERVFAIL, Fault.TIMEOUT])
def test_a_failing_aaaa_lookup_of_an_implicit_mx_leaves_the_a_address_in_use(net: Net, fault: Fault) -> None:
    net.dns.add("implicit.test", "A", LIVE[1])  # no MX: the domain is its own mail exchanger
    net.dns.fault("implicit.test", "AAAA", fault)
    attempt = deliver(connector(net), "implicit.test")
    assert_delivered(net, attempt, "implicit.test", LIVE[1], "implicit.test")
    assert net.dns.asked("MX") and net.dns.asked("AAAA")


# -- one host failing ------------------------------------------------------


@pytest.mark.parametrize(("a_fault", "aaaa_fault"), [(Fault.SERVFAIL, Fault.REFUSED), (Fault.NXDOMAIN, Fault.NXDOMAIN),
                                                     (Fault.TIMEOUT, Fault.TIMEOUT), (Fault.REFUSED, Fault.TIMEOUT)])
def test_an_mx_host_that_cannot_be_resolved_gives_way_to_the_next(net: Net, a_fault: Fault, aaaa_fault: Fault) -> None:
    net.dns.add("second.test", "MX", "10 mx1.second.test.", "20 mx2.second.test.")
    net.dns.fault("mx1.second.test", "A", a_fault)
    net.dns.fault("mx1.second.test", "AAAA", aaaa_fault)
    net.dns.add("mx2.second.test", "A", LIVE[1])
    attempt = deliver(connector(net, query_timeout=0.5), "second.test")
    assert_delivered(net, attempt, "mx2.second.test", LIVE[1], "second.test")
    assert {q.name for q in net.dns.asked("A")} == {"mx1.second.test", "mx2.second.test"}


def test_a_host_that_refuses_connections_gives_way_to_one_whose_name_was_slow(net: Net) -> None:
    """The lookups run while the first host is tried, all inside the one deadline."""
    net.dns.add("slowname.test", "MX", "10 mx1.slowname.test.", "20 mx2.slowname.test.")
    net.dns.add("mx1.slowname.test", "A", DEAD)
    net.dns.add("mx2.slowname.test", "A", LIVE[0])
    net.dns.fault("mx2.slowname.test", "AAAA", Fault.TIMEOUT)
    attempt = deliver(connector(net), "slowname.test")
    assert_delivered(net, attempt, "mx2.slowname.test", LIVE[0], "slowname.test")


# -- the domain failing ----------------------------------------------------


def test_a_domain_that_does_not_exist_is_permanent(net: Net) -> None:
    attempt = deliver(connector(net), "nothere.test")
    assert attempt.outcome.kind is Kind.PERMANENT and not attempt.reached
    assert (attempt.outcome.reply.code, attempt.outcome.reply.enhanced) == (550, "5.1.2")
    assert "nothere.test" in attempt.outcome.reply.text


def test_a_null_mx_is_permanent(net: Net) -> None:
    net.dns.add("nullmx.test", "MX", "0 .")
    attempt = deliver(connector(net), "nullmx.test")
    assert attempt.outcome.kind is Kind.PERMANENT
    assert (attempt.outcome.reply.code, attempt.outcome.reply.enhanced) == (556, "5.1.10")
    assert not net.dns.asked("A")


@pytest.mark.parametrize("how", ["nxdomain", "no data"])
def test_mx_names_that_do_not_exist_are_permanent(net: Net, how: str) -> None:
    net.dns.add("deadnames.test", "MX", "10 mx1.deadnames.test.", "20 mx2.deadnames.test.")
    if how == "no data":  # the names exist, with neither A nor AAAA
        net.dns.add("mx1.deadnames.test", "TXT", '"nothing here"')
        net.dns.add("mx2.deadnames.test", "TXT", '"nothing here"')
    outcome, _ = open_fails(connector(net), "deadnames.test")
    assert outcome.kind is Kind.PERMANENT, outcome
    assert (outcome.reply.code, outcome.reply.enhanced) == (550, "5.1.2")
    assert "deadnames.test" in outcome.reply.text


def test_one_dead_name_and_one_failing_lookup_is_transient(net: Net) -> None:
    net.dns.add("half.test", "MX", "10 mx1.half.test.", "20 mx2.half.test.")  # mx1: NXDOMAIN
    net.dns.fault("mx2.half.test", ANY, Fault.SERVFAIL)
    outcome, _ = open_fails(connector(net), "half.test")
    assert outcome.kind is Kind.TRANSIENT, outcome
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.3")
    assert "half.test" in outcome.reply.text


@pytest.mark.parametrize("fault", [Fault.SERVFAIL, Fault.REFUSED])
def test_a_failing_mx_lookup_is_transient(net: Net, fault: Fault) -> None:
    net.dns.fault("broken.test", "MX", fault)
    net.dns.add("broken.test", "A", LIVE[0])  # not an implicit MX: the MX lookup did not say "none"
    attempt = deliver(connector(net), "broken.test")
    assert attempt.outcome.kind is Kind.TRANSIENT and not attempt.reached
    assert (attempt.outcome.reply.code, attempt.outcome.reply.enhanced) == (451, "4.4.3")
    assert "broken.test" in attempt.outcome.reply.text
    assert net.receivers[LIVE[0]].mails == []


# -- what dnspython does for us --------------------------------------------


def test_a_cname_chain_to_the_mx_host_is_followed(net: Net) -> None:
    net.dns.add("cname.test", "MX", "10 alias.cname.test.")
    net.dns.cname("alias.cname.test", "hop.elsewhere.test.")
    net.dns.cname("hop.elsewhere.test", "real.elsewhere.test.")
    net.dns.add("real.elsewhere.test", "A", LIVE[0])
    attempt = deliver(connector(net), "cname.test")
    assert_delivered(net, attempt, "alias.cname.test", LIVE[0], "cname.test")


def test_a_truncated_answer_is_asked_again_over_tcp(net: Net) -> None:
    net.dns.add("tc.test", "MX", "10 mx.tc.test.")
    net.dns.fault("tc.test", "MX", Fault.TRUNCATE)
    net.dns.add("mx.tc.test", "A", LIVE[1])
    attempt = deliver(connector(net), "tc.test")
    assert_delivered(net, attempt, "mx.tc.test", LIVE[1], "tc.test")
    assert [q.transport for q in net.dns.asked("MX")] == ["udp", "tcp"]


def test_an_answer_too_large_for_udp_is_asked_again_over_tcp(net: Net) -> None:
    # 100 MX records are far more than 512 octets: the server sets TC.
    net.dns.add("large.test", "MX", "0 mx.large.test.", *(f"{i} backup{i}.large.test." for i in range(1, 100)))
    net.dns.add("mx.large.test", "A", LIVE[0])
    attempt = deliver(connector(net), "large.test")
    assert_delivered(net, attempt, "mx.large.test", LIVE[0], "large.test")
    assert [q.transport for q in net.dns.asked("MX")] == ["udp", "tcp"]


# -- bounds ----------------------------------------------------------------


def test_hundreds_of_mx_records_are_bounded_in_hosts_and_time(net: Net) -> None:
    names = [f"mx{i:03}.many.test" for i in range(300)]
    net.dns.add("many.test", "MX", *(f"10 {name}." for name in names))  # one preference: shuffled
    for i, name in enumerate(names):
        net.dns.add(name, "A", COUNTED[i % len(COUNTED)])
    outcome, seconds = open_fails(connector(net, max_mx_hosts=5, attempt_timeout=3.0), "many.test", limit=30)
    assert outcome.kind is Kind.TRANSIENT, outcome
    assert net.hangup.total == 5, net.hangup.counts
    assert len({q.name for q in net.dns.asked("A")}) == 5
    assert len({q.name for q in net.dns.asked("AAAA")}) == 5
    assert seconds < 3.0, seconds


def test_addresses_tried_are_bounded(net: Net) -> None:
    net.dns.add("wide.test", "MX", "10 mx1.wide.test.", "20 mx2.wide.test.", "30 mx3.wide.test.")
    for n, name in enumerate(["mx1.wide.test", "mx2.wide.test", "mx3.wide.test"]):
        net.dns.add(name, "A", *COUNTED[n * 10:(n + 1) * 10])
    outcome, _ = open_fails(connector(net, max_mx_addresses=13), "wide.test")
    assert outcome.kind is Kind.TRANSIENT and outcome.reply.enhanced == "4.4.1", outcome
    assert net.hangup.total == 13, net.hangup.counts
    # Best first: all of mx1's ten addresses, then three of mx2's.
    assert all(net.hangup.counts[address] == 1 for address in COUNTED[:10])


def test_mx_names_that_never_resolve_are_transient_within_the_deadline(net: Net) -> None:
    net.dns.add("blackhole.test", "MX", *(f"{i} mx{i}.blackhole.test." for i in range(50)))
    for i in range(50):
        net.dns.fault(f"mx{i}.blackhole.test", ANY, Fault.TIMEOUT)
    # Each query would take 10 s to give up; the attempt has 1.5 s for all of them.
    deadline = 1.5
    attempt = deliver(connector(net, query_timeout=5.0, attempt_timeout=deadline), "blackhole.test",
                      limit=deadline + 5)
    assert attempt.outcome.kind is Kind.TRANSIENT and not attempt.reached
    assert (attempt.outcome.reply.code, attempt.outcome.reply.enhanced) == (451, "4.4.3")
    assert "blackhole.test" in attempt.outcome.reply.text
    assert deadline <= attempt.seconds < deadline + 1.0, attempt.seconds
    assert len({q.name for q in net.dns.asked("A")}) == 10  # the default max_mx_hosts


def test_an_mx_lookup_that_never_ends_is_transient_within_the_deadline(net: Net) -> None:
    net.dns.fault("silent.test", "MX", Fault.TIMEOUT)
    deadline = 1.5
    outcome, seconds = open_fails(connector(net, query_timeout=5.0, attempt_timeout=deadline), "silent.test",
                                  limit=deadline + 5)
    assert outcome.kind is Kind.TRANSIENT
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.3")
    assert "silent.test" in outcome.reply.text and "1.5s" in outcome.reply.text
    assert deadline <= seconds < deadline + 1.0, seconds


def test_servers_hands_out_addresses_in_order_within_the_limits(net: Net) -> None:
    net.dns.add("order.test", "MX", "20 b.order.test.", "10 a.order.test.", "30 c.order.test.")
    net.dns.add("a.order.test", "A", "127.0.2.1", "127.0.2.2")
    net.dns.fault("b.order.test", "A", Fault.SERVFAIL)
    net.dns.add("b.order.test", "AAAA", "::1")
    net.dns.add("c.order.test", "A", "127.0.2.3", "127.0.2.4")
    resolver = MxResolver(make_resolver([net.dns.address], 0.5))

    async def main() -> list[tuple[str, str]]:
        servers = resolver.servers("order.test", max_addresses=4, timeout=5)
        async with contextlib.aclosing(servers):
            return [(server.host.name, server.address) async for server in servers]

    found = run(main(), 10)
    # Hosts by preference; a record set has no order of its own.
    assert [name for name, _ in found] == ["a.order.test", "a.order.test", "b.order.test", "c.order.test"]
    assert {address for _, address in found[:2]} == {"127.0.2.1", "127.0.2.2"}
    assert found[2][1] == "::1" and found[3][1] in ("127.0.2.3", "127.0.2.4")


def test_addresses_leaves_out_a_family_that_fails(net: Net) -> None:
    net.dns.add("mixed.test", "A", "127.0.2.9")
    net.dns.fault("mixed.test", "AAAA", Fault.REFUSED)
    net.dns.fault("gone.test", "A", Fault.SERVFAIL)
    net.dns.fault("gone.test", "AAAA", Fault.REFUSED)
    resolver = MxResolver(make_resolver([net.dns.address], 0.5))

    async def main() -> tuple[list[str], LookupFailed]:
        found = await resolver.addresses("mixed.test")
        with pytest.raises(LookupFailed) as info:
            await resolver.addresses("gone.test")
        return found, info.value

    found, failed = run(main(), 10)
    assert found == ["127.0.2.9"]
    assert not failed.permanent and failed.reply.enhanced == "4.4.3" and "gone.test" in failed.reply.text
