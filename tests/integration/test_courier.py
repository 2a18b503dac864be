"""The courier against a real SMTP server (aiosmtpd) on loopback.

Connections are kept open between deliveries, a kept-open connection the
server closed meanwhile is replaced without losing the message, the
per-connection transaction limit opens a new session, and an unreachable
next hop is reported as such.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
from aiosmtpd.controller import Controller

from mta.delivery.client import ClientSettings, Connector
from mta.delivery.courier import Courier, Parcel
from mta.delivery.mx import MxResolver
from mta.delivery.result import Kind
from mta.delivery.route import NextHop

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)  # the peers here; direct delivery must be let in

HOP = NextHop("mx", "[127.0.0.1]")
MESSAGE = b"Subject: courier\r\n\r\nbody\r\n"


@dataclass
class Receiver:
    """Counts sessions (by their EHLO) and stores each transaction's envelope."""

    sessions: list[int] = field(default_factory=list)
    mails: list[tuple[int, str, list[str]]] = field(default_factory=list)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.sessions.append(id(session))
        session.host_name = hostname  # a handler's EHLO hook does what aiosmtpd would
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((id(session), envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 Ok"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def courier_for(port: int) -> Courier:
    settings = ClientSettings(helo_name="mta.example.com", port=port, connect_timeout=5, command_timeout=10,
                              allowed_networks=LOOPBACK)
    connector = Connector(settings, MxResolver(dns.asyncresolver.Resolver(configure=False)))

    async def content(queue_id: str) -> bytes:
        return MESSAGE

    return Courier(connector.open, content)


def parcel(n: int) -> Parcel:
    return Parcel(f"Q{n:08d}", "app@example.com", [f"u{n}@example.net"], len(MESSAGE))


def start(receiver: Receiver, port: int) -> Controller:
    controller = Controller(receiver, hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def test_one_connection_carries_consecutive_messages() -> None:
    receiver, port = Receiver(), free_port()
    controller = start(receiver, port)
    try:
        async def main() -> None:
            courier = courier_for(port)
            for n in range(3):
                report = await courier.deliver(HOP, parcel(n), per_connection=100)
                assert [o.kind for o in report.outcomes.values()] == [Kind.DELIVERED], report
                assert report.reached and report.server == ""
            await courier.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        controller.stop()
    assert len(receiver.mails) == 3
    assert len(set(receiver.sessions)) == 1, "the three messages should share one session"


def test_transaction_limit_opens_a_new_session() -> None:
    receiver, port = Receiver(), free_port()
    controller = start(receiver, port)
    try:
        async def main() -> None:
            courier = courier_for(port)
            for n in range(4):
                await courier.deliver(HOP, parcel(n), per_connection=2)
            await courier.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        controller.stop()
    assert len(receiver.mails) == 4
    assert len(set(receiver.sessions)) == 2


def test_a_connection_the_server_closed_is_replaced_and_nothing_is_lost() -> None:
    receiver, port = Receiver(), free_port()
    controller = start(receiver, port)
    try:
        async def main() -> None:
            nonlocal controller
            courier = courier_for(port)
            first = await courier.deliver(HOP, parcel(1), per_connection=100)
            assert [o.kind for o in first.outcomes.values()] == [Kind.DELIVERED]
            # The server goes away while our session idles (a restart), and comes back.
            await asyncio.to_thread(controller.stop)
            controller = await asyncio.to_thread(start, receiver, port)
            await asyncio.sleep(0.1)
            second = await courier.deliver(HOP, parcel(2), per_connection=100)
            assert [o.kind for o in second.outcomes.values()] == [Kind.DELIVERED], second
            await courier.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        controller.stop()
    assert [rcpts for _, _, rcpts in receiver.mails] == [["u1@example.net"], ["u2@example.net"]]
    assert len(set(receiver.sessions)) == 2


def test_an_unreachable_hop_is_reported_as_such() -> None:
    port = free_port()  # nothing listens there

    async def main() -> None:
        courier = courier_for(port)
        report = await courier.deliver(HOP, parcel(1), per_connection=100)
        assert not report.reached and report.server is None
        [outcome] = report.outcomes.values()
        assert outcome.kind is Kind.TRANSIENT and outcome.reply.code == 451
        assert outcome.reply.enhanced == "4.4.1" and outcome.mx_ip == "127.0.0.1"
        await courier.close()

    asyncio.run(asyncio.wait_for(main(), 30))
